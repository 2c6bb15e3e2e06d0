"""A stack of expert-parallel MoE layers (DeepSeek-V3-like), timed per layer, with the
accuracy report against the dense FP32 reference.

    # GPUs (one rank a GPU)
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      torchrun --nproc-per-node=4 launch/moe_stack_demo.py
    # CPU, 2 gloo ranks, Triton interpreter, scaled-down shapes
    torchrun --nproc-per-node=2 launch/moe_stack_demo.py
    python launch/moe_stack_demo.py --dry-run      # print the plan and exit

Each layer is ``x = x + EPMoE(rms_norm(x))``. Shapes: GPU H=7168, I=2048, 64 experts
(every rank keeps all experts' weights for the FP32 reference, so not 256), top-8, groups
8/4, sigmoid + correction bias, shared expert I=2048; CPU H=256, I=128, 16 experts, top-4,
groups 4/2, shared I=128. Payload/weights via flags. Separate from ``launch/moe_demo.py``
(the dispatch/combine demo of the EP engineer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (GPU 4096, CPU 32)")
    p.add_argument("--experts", type=int, default=None, help="routed experts (GPU 64, CPU 16)")
    p.add_argument("--payload", default="nvfp4", choices=["nvfp4", "fp8", "bf16"])
    p.add_argument("--weights", default="bf16", choices=["bf16", "fp8", "nvfp4"])
    p.add_argument("--backend", default="torch")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="print the per payload x weights accuracy report")  # fmt: skip
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)

    import torch.distributed as dist

    from fp4comm.moe import EPMoE, MoEConfig, random_moe_state_dict
    from fp4comm.moe.accuracy import format_report, gaussian_input, max_rel_err, run_report, sqnr_db

    gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if gpu:
        cfg = MoEConfig(hidden=7168, intermediate=2048, num_experts=args.experts or 64, top_k=8, scoring="sigmoid",
                        num_expert_group=8, topk_group=4, correction_bias=True, routed_scaling_factor=2.5,
                        shared_intermediate=2048, max_tokens_per_rank=args.tokens or 4096)  # fmt: skip
    else:
        cfg = MoEConfig(hidden=256, intermediate=128, num_experts=args.experts or 16, top_k=4, scoring="sigmoid",
                        num_expert_group=4, topk_group=2, correction_bias=True, routed_scaling_factor=2.5,
                        shared_intermediate=128, max_tokens_per_rank=args.tokens or 32)  # fmt: skip
    cfg = replace(cfg, payload=args.payload, weight_format=args.weights, backend=args.backend)
    T = cfg.max_tokens_per_rank
    if args.dry_run:
        print(f"world_size={world} device={'cuda' if gpu else 'cpu (interpreter)'} layers={args.layers} T={T}\n{cfg}")
        return

    if world > 1:
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if gpu else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def log(*a):
        if rank == 0:
            print(*a, flush=True)

    log(f"MoE stack: {args.layers} layers, {world} rank(s), {T} tokens/rank, {cfg.num_experts} experts top-{cfg.top_k}, "
        f"H={cfg.hidden} I={cfg.intermediate}, payload={cfg.payload}, weights={cfg.weight_format}, "
        f"backend={cfg.backend}")  # fmt: skip
    sds = [random_moe_state_dict(cfg, seed=10 + i, device=device, dtype=torch.bfloat16) for i in range(args.layers)]
    layers = [EPMoE(cfg, device=device).load_weights(sd, keep_reference=True) for sd in sds]
    x0 = gaussian_input(T, cfg.hidden, seed=rank, device=device)

    # warm-up (autotune, compile), then time each layer
    x = x0
    for layer in layers:
        x = x + layer(rms_norm(x))
    sync()
    x, times = x0, []
    for layer in layers:
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        x = x + layer(rms_norm(x))
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    y = x

    # FP32 reference of the whole stack (each layer on the reference's own activations)
    xr = x0.float()
    per_layer = []
    xq = x0
    for layer in layers:
        h = rms_norm(xq)
        out = layer(h)
        ref = layer.reference_forward(h, routing=layer.last_routing)
        per_layer.append((sqnr_db(ref, out.float()), max_rel_err(ref, out.float())))
        xq = xq + out
        hr = rms_norm(xr.to(torch.bfloat16))
        xr = xr + layer.reference_forward(hr)
    stack_sqnr = sqnr_db(xr, y.float())

    t_all = torch.tensor(times, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t_all, op=dist.ReduceOp.MAX)
    log("\nlayer  time ms (slowest rank)  SQNR dB (layer vs FP32 ref, same input)  max rel err")
    for i, (ms, (s, m)) in enumerate(zip(t_all.tolist(), per_layer)):
        log(f"{i:5d}  {ms:22.3f}  {s:41.2f}  {m:11.4f}")
    log(f"stack output vs FP32 reference stack (rank 0): SQNR {stack_sqnr:.2f} dB "
        "(the reference routes on its own activations: near-tie tokens may pick other experts)")

    if args.report:
        rep_cfg = replace(cfg, shared_intermediate=0)
        rows = run_report(rep_cfg, sds[0], min(T, 256), device=device)
        log("\naccuracy report (layer 0 weights, rank 0 tokens; static = scale calibrated on Gaussian data):")
        log(format_report(rows))
    for layer in layers:
        layer.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
