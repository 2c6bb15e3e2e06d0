"""Expert-compute benchmarks, each against its baseline in the same run.

1. **prefill GEMM** (one GPU): E_local=64 experts x 512 rows, K=7168, N=4096, NVFP4
   activations (swizzled scales, per-row global scale) x BF16 weights through
   ``grouped_gemm_masked``, vs ``torch.bmm`` in BF16 on the same shapes. TFLOP/s and ratio
   (target >= 70%). FP8 and BF16 activations through the same kernel for context.
2. **decode GEMM** (one GPU): E_local=64, a few experts with 1-16 rows, the rest empty;
   weight bytes of the *active* experts / time vs a device-to-device copy measured in the
   same run (read + write bytes / time: the practical HBM peak). Target >= 75%.
3. **EPMoE forward** (``torchrun``, one rank a GPU): DeepSeek-V3 layer (H=7168, I=2048,
   256 experts, top-8, 4096 tokens a rank, BF16 weights), NVFP4 vs BF16 dispatch, with the
   split route / dispatch / GEMMs / combine (CUDA events) and the total.

Usage::

    python benchmarks/bench_moe.py --out results/moe                  # 1 GPU: parts 1-2
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      torchrun --nproc-per-node=4 benchmarks/bench_moe.py --out results/moe   # part 3
    python benchmarks/bench_moe.py --smoke --out /tmp/moe              # CPU, tiny shapes
    ... --quick   # < 2 min on 4x H200 (< 3 on 1): fewer iterations; only the target rows
                  # (prefill nvfp4 x bf16, decode nvfp4 x bf16) autotune, the rest -- and the
                  # EPMoE GEMMs -- use the heuristic tile configs

Writes ``<out>/bench_moe[_ep].json`` and ``.csv`` and prints a table (rank 0).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _bench(fn, device, warmup=5, rep=20) -> float:
    """Mean milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    for _ in range(min(warmup, 1)):
        fn()
    ts = []
    for _ in range(max(1, min(rep, 2))):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.mean(ts)


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0].keys())
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    try:
        from tabulate import tabulate

        return tabulate([[r.get(k, "") for k in keys] for r in rows], headers=keys, floatfmt=".3g")
    except ImportError:
        return "\n".join(["\t".join(keys)] + ["\t".join(str(r.get(k, "")) for k in keys) for r in rows])


def _write(out: Path, name: str, rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------- GEMMs
def bench_prefill(device, E, M, K, N, quick=False) -> list[dict]:
    from fp4comm.moe import grouped_gemm_masked
    from fp4comm.quant import quantize_fp8_blockwise, quantize_nvfp4

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(E, M, K, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(E, N, K, device=device, generator=g) / K**0.5).to(torch.bfloat16)
    masked = torch.full((E,), M, dtype=torch.int32, device=device)
    out = torch.empty(E, M, N, dtype=torch.bfloat16, device=device)
    flops = 2.0 * E * M * N * K
    rows = []
    wt = w.transpose(1, 2)
    ms_bmm = _bench(lambda: torch.bmm(x, wt, out=out), device)
    rows.append(dict(bench="prefill", impl="torch.bmm bf16", E=E, m=M, K=K, N=N, ms=ms_bmm,
                     tflops=flops / ms_bmm / 1e9, vs_bmm=1.0))  # fmt: skip
    from fp4comm.moe import dequantize_masked

    nv = quantize_nvfp4(x, "per_token", scale_layout="swizzled")
    f8 = quantize_fp8_blockwise(x)
    # (label, activations, a_path): "auto" is what a caller gets (the two-pass BF16 route at
    # prefill sizes on Hopper); "registers" dequantizes inside the GEMM's main loop
    acts = [
        ("nvfp4 x bf16", nv, "auto"),
        ("nvfp4 x bf16 (in-register dequant)", nv, "registers"),
        ("fp8 x bf16", f8, "auto"),
        ("fp8 x bf16 (in-register dequant)", f8, "registers"),
        ("fp8(ue8m0) x bf16 (in-register dequant)", quantize_fp8_blockwise(x, ue8m0=True), "registers"),
        ("bf16 x bf16", x, "auto"),
    ]
    for name, a, path in acts:
        config = "heuristic" if quick and not name.startswith("nvfp4") else "auto"
        fn = lambda a=a, c=config, p=path: grouped_gemm_masked(a, w, masked, out=out, expected_m=M, config=c, a_path=p)  # noqa: E731
        fn()  # autotune outside the timing
        ms = _bench(fn, device)
        rows.append(dict(bench="prefill", impl=f"grouped_gemm_masked {name}", config=config, a_path=path, E=E, m=M,
                         K=K, N=N, ms=ms, tflops=flops / ms / 1e9, vs_bmm=ms_bmm / ms))  # fmt: skip
    # the first pass of the two-pass route on its own: bytes read (4.5 bits) + written (16 bits)
    a16 = torch.empty(E, M, K, dtype=torch.bfloat16, device=device)
    ms = _bench(lambda: dequantize_masked(nv, masked, out=a16), device)
    nbytes = E * M * K * (0.5 + 1 / 16 + 2)
    rows.append(dict(bench="prefill", impl="dequantize_masked nvfp4 -> bf16 (pass 1)", E=E, m=M, K=K, ms=ms,
                     GBps=nbytes / ms / 1e6))  # fmt: skip
    return rows


def bench_decode(device, E, K, N, active: dict[int, int], max_m=128, quick=False) -> list[dict]:
    from fp4comm.moe import grouped_gemm_masked, quantize_weights
    from fp4comm.quant import quantize_nvfp4

    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(E, max_m, K, device=device, generator=g).to(torch.bfloat16)
    a = quantize_nvfp4(x, "per_token", scale_layout="swizzled")
    w32 = torch.randn(E, N, K, device=device, generator=g) / K**0.5
    masked = torch.zeros(E, dtype=torch.int32, device=device)
    for e, m in active.items():
        masked[e] = m
    out = torch.empty(E, max_m, N, dtype=torch.bfloat16, device=device)
    rows = []
    # practical peak: a D2D copy of a buffer the size of all weights (>= 1 GiB on GPU)
    nbytes = max(E * N * K * 2, 1 << 30) if device.type == "cuda" else E * N * K * 2
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms_copy = _bench(lambda: dst.copy_(src), device)
    peak = 2 * nbytes / ms_copy / 1e6  # GB/s, read + write
    rows.append(dict(bench="decode", impl="D2D copy (read+write)", ms=ms_copy, GBps=peak, pct_of_copy=100.0))
    del src, dst
    expected = max(active.values())
    for fmt in ("bf16", "fp8", "nvfp4"):
        b = quantize_weights(w32, fmt)
        per_expert = {"bf16": N * K * 2, "fp8": N * K + (N // 128) * (K // 128) * 4, "nvfp4": N * K // 2 + N * K // 16}[fmt]
        wbytes = per_expert * len(active)
        config = "heuristic" if quick and fmt != "bf16" else "auto"
        fn = lambda b=b, c=config: grouped_gemm_masked(a, b, masked, out=out, expected_m=expected, config=c)  # noqa: E731
        fn()
        ms = _bench(fn, device)
        bw = wbytes / ms / 1e6
        rows.append(dict(bench="decode", impl=f"grouped_gemm_masked nvfp4 x {fmt}", config=config, E=E, active=len(active),
                         rows=sum(active.values()), K=K, N=N, ms=ms, GBps=bw, pct_of_copy=100 * bw / peak))  # fmt: skip
        del b
    return rows


# ----------------------------------------------------------------------------- EPMoE
class _PhaseTimer:
    """CUDA-event (or wall-clock) timing of named phases, summed over calls."""

    def __init__(self, device):
        self.device, self.events, self.cpu = device, [], {}

    @contextlib.contextmanager
    def __call__(self, name):
        if self.device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            yield
            e.record()
            self.events.append((name, s, e))
        else:
            t = time.perf_counter()
            yield
            self.cpu[name] = self.cpu.get(name, 0.0) + (time.perf_counter() - t) * 1e3

    def totals(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            out: dict[str, float] = {}
            for name, s, e in self.events:
                out[name] = out.get(name, 0.0) + s.elapsed_time(e)
            return out
        return dict(self.cpu)


def bench_epmoe(cfg, tokens, device, iters, group=None, warmup=2) -> list[dict]:
    import torch.distributed as dist

    from fp4comm.moe import EPMoE, random_moe_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    El = cfg.num_experts // world
    sd = random_moe_state_dict(cfg, seed=0, experts=range(rank * El, (rank + 1) * El), device=device,
                               dtype=torch.bfloat16)  # fmt: skip
    g = torch.Generator(device=device).manual_seed(100 + rank)
    x = torch.randn(tokens, cfg.hidden, device=device, generator=g).to(torch.bfloat16)
    rows = []
    for payload, inter, path in (("bf16", "none", "auto"), ("nvfp4", "none", "auto"), ("nvfp4", "none", "registers"),
                                 ("nvfp4", "nvfp4", "auto")):
        c = replace(cfg, payload=payload, intermediate_quant=inter, max_tokens_per_rank=tokens, act_path=path)
        layer = EPMoE(c, group, device=device).load_weights(sd)
        for _ in range(warmup):  # warm-up, autotune
            layer(x)
        _sync(device)
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            layer(x)
        _sync(device)
        total = (time.perf_counter() - t0) * 1e3 / iters
        timer = _PhaseTimer(device)
        for _ in range(iters):
            layer(x, timer=timer)
        phases = {k: v / iters for k, v in timer.totals().items()}
        row = dict(bench="epmoe", payload=payload, gemm2_in=inter, act_path=path, ranks=world, tokens_per_rank=tokens,
                   H=c.hidden, I=c.intermediate, E=c.num_experts, top_k=c.top_k, total_ms=total,
                   **{f"{k}_ms": v for k, v in phases.items()})  # fmt: skip
        if dist.is_initialized():
            t = torch.tensor([row[k] for k in _NUM_KEYS if k in row], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            for k, v in zip([k for k in _NUM_KEYS if k in row], t.tolist()):
                row[k] = v  # slowest rank
        rows.append(row)
        layer.destroy()
        del layer
    base = rows[0]["total_ms"]
    for r in rows:
        r["speedup_vs_bf16"] = base / r["total_ms"]
    return rows


_NUM_KEYS = ("total_ms", "route_ms", "dispatch_ms", "gemm_ms", "combine_ms")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/moe")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, every part (GPU if present, else CPU under the interpreter)")
    p.add_argument("--tokens", type=int, default=4096, help="EPMoE tokens per rank")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip-gemm", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="fewer iterations; autotune only the target GEMM rows; heuristic GEMM tiles in EPMoE")
    args = p.parse_args(argv)

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # --smoke: tiny shapes on whatever is here (the GPU when present, else CPU + interpreter)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    from fp4comm.moe import MoEConfig

    out = Path(args.out)
    results: dict[str, list[dict]] = {}
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", world_size=world,
                torch=torch.__version__, smoke=args.smoke, quick=args.quick)  # fmt: skip
    if world == 1 and not args.skip_gemm:
        if args.smoke:
            results["prefill"] = bench_prefill(device, E=2, M=32, K=128, N=64)
            results["decode"] = bench_decode(device, E=4, K=128, N=64, active={1: 3, 2: 16}, max_m=128)
        else:
            results["prefill"] = bench_prefill(device, E=64, M=512, K=7168, N=4096, quick=args.quick)
            active = {3: 1, 10: 4, 17: 16, 29: 2, 36: 8, 44: 16, 51: 1, 63: 12}  # 8 of 64 experts
            results["decode"] = bench_decode(device, E=64, K=7168, N=4096, active=active, quick=args.quick)
    if world > 1 or args.smoke:
        if args.smoke:
            cfg = MoEConfig(hidden=128, intermediate=64, num_experts=8, top_k=2, weight_format="bf16")
            tokens, iters = 16, 1
        else:
            cfg = MoEConfig(hidden=7168, intermediate=2048, num_experts=256, top_k=8, scoring="sigmoid",
                            num_expert_group=8, topk_group=4, correction_bias=True, routed_scaling_factor=2.5,
                            weight_format="bf16", gemm_config="heuristic" if args.quick else "auto")  # fmt: skip
            tokens, iters = args.tokens, (min(args.iters, 3) if args.quick else args.iters)
        results["epmoe"] = bench_epmoe(cfg, tokens, device, iters, warmup=1 if args.quick else 2)
    if rank == 0:
        for name, rows in results.items():
            print(f"\n== {name} ==")
            print(_table(rows))
            _write(out, f"bench_moe_{name}", rows, meta)
        print(f"\nwrote {out}/bench_moe_*.json|csv")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
