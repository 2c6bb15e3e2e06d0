"""Small end-to-end MoE example: random tokens -> softmax top-k gate -> EPBuffer.dispatch ->
per-expert MLP on the masked layout -> EPBuffer.combine, checked against a single-process
reference that needs no communication (every rank rebuilds all experts from one seed).

    ./launch/run.sh launch/moe_demo.py --payload nvfp4          # torchrun, all GPUs (or 2 CPU ranks)
    NP=2 ./launch/mpirun.sh launch/moe_demo.py --payload fp8    # mpirun
    python launch/moe_demo.py                                    # no launcher: spawns 2 gloo ranks
    python launch/moe_demo.py --dry-run                          # print the resolved setup only

Check: the expert input is ``dequant(quant(x_t))`` (what the payload carries), so the
reference is ``sum_k w_k * mlp_{e_k}(bf16(dequant(quant(x_t))))`` in FP32 on the source
rank; the distributed result must agree within the BF16 roundings of the expert output
and of combine (``--rtol``, relative to the reference's RMS).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_env  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--payload", default="nvfp4", choices=["nvfp4", "fp8", "bf16"])
    p.add_argument("--backend", default="torch")
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=128, help="expert MLP width")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=2e-2)
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when started without a launcher")
    p.add_argument("--dry-run", action="store_true", help="print the environment -> process group resolution")
    return p.parse_args(argv)


def gate(x, w_gate, k):
    """Softmax top-k router: ids [T, k] int32, weights [T, k] fp32 renormalized to sum 1."""
    probs = torch.softmax(x.float() @ w_gate, dim=-1)
    w, ids = probs.topk(k, dim=-1)
    return ids.int(), w / w.sum(-1, keepdim=True)


def expert_weights(E, H, F, seed, device):
    g = torch.Generator().manual_seed(seed + 1)
    w1 = (torch.randn(E, H, F, generator=g) / H**0.5).bfloat16().to(device)
    w2 = (torch.randn(E, F, H, generator=g) / F**0.5).bfloat16().to(device)
    return w1, w2


def mlp(a, w1, w2):
    """One expert: a [M, H] bf16 -> [M, H] bf16 (SiLU MLP, FP32 accumulation)."""
    h = torch.nn.functional.silu(a.float() @ w1.float())
    return (h.bfloat16().float() @ w2.float()).bfloat16()


def dequant_payload(d):
    from fp4comm.reference.quant import dequantize_fp8_blockwise_ref, dequantize_nvfp4_ref

    if d.payload == "nvfp4":
        return dequantize_nvfp4_ref(d.activations)
    if d.payload == "fp8":
        return dequantize_fp8_blockwise_ref(d.activations)
    return d.x


def source_dequant(x, payload):
    from fp4comm.reference.quant import (
        dequantize_fp8_blockwise_ref,
        dequantize_nvfp4_ref,
        quantize_fp8_blockwise_ref,
        quantize_nvfp4_ref,
    )

    if payload == "nvfp4":
        return dequantize_nvfp4_ref(quantize_nvfp4_ref(x))
    if payload == "fp8":
        return dequantize_fp8_blockwise_ref(quantize_fp8_blockwise_ref(x))
    return x


def main(args) -> int:
    import torch.distributed as dist

    from fp4comm import EPBuffer

    env = dist_env.init_distributed()
    rank, R, dev = env.rank, env.world_size, env.device
    if rank == 0:
        print(f"[moe_demo] {env.describe()} payload={args.payload} backend={args.backend}", flush=True)
    E, K, H, F, T = args.experts, args.topk, args.hidden, args.ffn, args.tokens
    El = E // R
    g = torch.Generator().manual_seed(args.seed)
    w_gate = torch.randn(H, E, generator=g).to(dev) / H**0.5
    w1, w2 = expert_weights(E, H, F, args.seed, dev)
    gx = torch.Generator().manual_seed(args.seed + 100 + rank)
    x = torch.randn(T, H, generator=gx).bfloat16().to(dev)
    ids, w = gate(x, w_gate, K)

    with EPBuffer(None, H, E, K, T, payload=args.payload, backend=args.backend, timeout_s=dist_env.ep_timeout_s()) as buf:
        d = buf.dispatch(x, ids, w)
        a = dequant_payload(d)  # [El, max_m, H] bf16 (an FP4 grouped GEMM would read d.activations)
        out = torch.zeros(El, d.max_m, H, dtype=torch.bfloat16, device=dev)
        mm = d.masked_m.tolist()
        for e in range(El):
            out[e, : mm[e]] = mlp(a[e, : mm[e]], w1[rank * El + e], w2[rank * El + e])
        y = buf.combine(out, d.handle)

    # single-process reference for this rank's tokens
    xq = source_dequant(x.cpu(), args.payload).to(dev)
    ref = torch.zeros(T, H, dtype=torch.float32, device=dev)
    for k in range(K):
        for e in ids[:, k].unique().tolist():
            m = ids[:, k] == e
            ref[m] += w[m, k, None] * mlp(xq[m], w1[e], w2[e]).float()
    err = (y.float() - ref).norm() / ref.norm().clamp_min(1e-30)
    errs = [torch.zeros(1, device=dev) for _ in range(R)]
    dist.all_gather(errs, err.reshape(1))
    recv = torch.tensor([int(d.masked_m.sum())], device=dev)
    dist.all_reduce(recv)
    ok = all(float(e) <= args.rtol for e in errs)
    if rank == 0:
        rel = ", ".join(f"{float(e):.2e}" for e in errs)
        print(f"[moe_demo] {R} ranks x {T} tokens, {int(recv)} (token, expert) pairs moved; "
              f"relative error per rank: [{rel}] (rtol {args.rtol}) -> {'PASS' if ok else 'FAIL'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def _spawned(args):
    code = main(args)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    args = parse_args()
    if args.dry_run:
        print("[moe_demo] dry run:", dist_env.detect().describe())
        sys.exit(0)
    if dist_env.detect().launcher == "none" and args.nproc > 1:
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = "nccl" if n_gpu >= args.nproc else "gloo"
        print(f"[moe_demo] no launcher found: spawning {args.nproc} {backend} ranks", flush=True)
        dist_env.spawn_local(_spawned, args.nproc, args, backend=backend)
        sys.exit(0)
    sys.exit(main(args))
