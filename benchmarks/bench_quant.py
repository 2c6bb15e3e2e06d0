"""Quantization throughput: NVFP4 (per-token gs, linear and swizzled scales) and FP8-block
quantize kernels beside a device-to-device copy of the same bytes, in one run.

GB/s counts bytes read + written: BF16 input read once, codes + scales (+ gs) written.
The copy baseline moves the same number of bytes (``torch.Tensor.copy_`` of a buffer half
that size: read + write). On a GPU each op is timed as a CUDA graph replay after an L2 flush
(kernel time without the host's launch overhead), the copy the same way. Target (issue 2): NVFP4 quantize >= 85% of the copy's bandwidth
for T >= 4096 at H = 7168.

    python benchmarks/bench_quant.py                       # GPU: T = 128, 4096, 16384, H = 7168
    python benchmarks/bench_quant.py --tokens 64 --hidden 512   # CPU smoke (interpreter or reference)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gpu_kernel_us  # noqa: E402


def _bench(fn, device: torch.device, iters: int) -> tuple[float, float]:
    """(median us, std us) of ``fn``."""
    if device.type == "cuda":
        t = torch.tensor(gpu_kernel_us(fn), dtype=torch.float64)
        return float(t.median()), float(t.std())
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    t = torch.tensor(ts, dtype=torch.float64)
    return float(t.median()), float(t.std()) if len(ts) > 1 else 0.0


def run(tokens: list[int], hidden: int, device: torch.device, iters: int = 5, ops=None) -> list[dict]:
    """Rows for each token count: the copy baseline and the quantize ops (``ops``: a subset of
    names to time, default all)."""
    import fp4comm

    rows = []
    for T in tokens:
        x = torch.randn(T, hidden, device=device, dtype=torch.bfloat16)
        in_bytes = x.numel() * 2
        cases = {
            "nvfp4 linear": (lambda: fp4comm.quantize_nvfp4(x), T * (hidden // 2 + hidden // 16 + 4)),
            "nvfp4 swizzled": (
                lambda: fp4comm.quantize_nvfp4(x, scale_layout="swizzled"),
                T * (hidden // 2 + 4) + ((T + 127) // 128 * 128) * (hidden // 16),
            ),
            "fp8 block": (lambda: fp4comm.quantize_fp8_blockwise(x), T * (hidden + 4 * (hidden // 128))),
        }
        results = {}
        for name, (fn, out_bytes) in cases.items():
            if ops is not None and name not in ops:
                continue
            us, sd = _bench(fn, device, iters)
            results[name] = (us, sd, in_bytes + out_bytes)
        # D2D copy moving the same number of bytes as the NVFP4 (linear) quantize
        moved = in_bytes + cases["nvfp4 linear"][1]
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        us, sd = _bench(lambda: dst.copy_(src), device, iters)
        copy_gbs = moved / us / 1e3
        rows.append({"op": "d2d copy", "tokens": T, "hidden": hidden, "us": us, "std_us": sd, "bytes": moved,
                     "GB/s": copy_gbs, "pct_of_copy": 100.0})  # fmt: skip
        for name, (us, sd, b) in results.items():
            gbs = b / us / 1e3
            rows.append({"op": name, "tokens": T, "hidden": hidden, "us": us, "std_us": sd, "bytes": b, "GB/s": gbs,
                         "pct_of_copy": 100.0 * gbs / copy_gbs})  # fmt: skip
    return rows


def print_table(rows: list[dict], title: str) -> None:
    headers = ["op", "tokens", "hidden", "us", "std_us", "bytes", "GB/s", "pct_of_copy"]
    body = [[r[h] if not isinstance(r[h], float) else round(r[h], 1) for h in headers] for r in rows]
    print(title)
    try:
        from tabulate import tabulate

        print(tabulate(body, headers=headers, tablefmt="github"))
    except ImportError:
        print("\t".join(headers))
        for b in body:
            print("\t".join(map(str, b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default: 128 4096 16384 on GPU)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default 7168 on GPU, 512 on CPU)")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations on CPU")
    ap.add_argument("--out", default="results/quant", help="folder for JSON + CSV")
    ap.add_argument(
        "--sweep-warps", type=int, nargs="*", default=None,
        help="also time the quantize kernels at these num_warps (tuning aid for fp4comm.quant._quant_warps)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokens = args.tokens or ([128, 4096, 16384] if cuda else [16, 64])
    hidden = args.hidden or (7168 if cuda else 512)
    if cuda:
        where = torch.cuda.get_device_name()
    else:
        mode = "Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "plain-torch reference"
        where = f"CPU ({mode}; timings are not GPU-representative)"
    rows = run(tokens, hidden, device, args.iters)
    print_table(rows, f"fp4comm quantize throughput on {where}")
    if args.sweep_warps:
        import fp4comm.quant as q

        default, default_q = q._launch_config, q._quant_warps
        sweep = []
        for w in args.sweep_warps:
            q._launch_config = lambda _n, w=w: w
            q._quant_warps = lambda w=w: w
            for r in run(tokens, hidden, device, args.iters):
                if r["op"].startswith("nvfp4") or r["op"] == "fp8 block":
                    sweep.append({**r, "op": f"{r['op']} warps={w}"})
        q._launch_config, q._quant_warps = default, default_q
        print_table(sweep, "num_warps sweep")
        rows += sweep
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": where, "torch": torch.__version__}
    (out / "bench_quant.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(out / "bench_quant.csv", "w") as f:
        f.write(",".join(rows[0]) + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r.values()) + "\n")
    print(f"wrote {out / 'bench_quant.json'} and {out / 'bench_quant.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
