"""Paged attention and KV-cache write benchmark: bf16 / fp8 / int8 caches side by side.

In one run (one GPU):
  * ``roofline``: a device-to-device copy (read + write bytes / time), the practical HBM
    ceiling, next to the spec peak (``--peak-gbps``, H200: 4800);
  * ``decode``: one query per sequence (GQA 32 q heads / 8 KV heads, head dim 128), batch x
    context sweep, for each cache format; effective GB/s = cache bytes read (K + V + scale
    caches) / time, % of peak and of the measured copy; against
    ``torch.nn.functional.scaled_dot_product_attention`` in BF16 on the same data gathered
    from the pages into contiguous ``[B, H, L, D]`` (gather not timed; reported on its own);
  * ``prefill``: one causal 8k-token sequence, TFLOP/s (masked pairs not counted) for bf16 and
    fp8 caches (bf16 and fp8 queries) vs SDPA (``is_causal``) in BF16;
  * ``write``: ``write_kv_cache`` bandwidth (bytes read + written / time).

Prints a table (``tabulate`` when installed) with each issue-6 target beside the measured
figure (``target`` / ``meets``) and writes ``<out>.json`` and ``<out>.csv``.
``--quick``: decode at batch 32 and 128, context 16k, plus fp8 decode variants at batch 32
(``tune`` rows, see :func:`decode_variants`: which :class:`AttentionTiles` to make the
default), prefill 8k (bf16, fp8, and ``tune`` rows of the generic and the
prefill-specialised ``fa`` kernel, see :func:`prefill_variants`), writes (32k and 128k tokens).
``--only decode,prefill`` (any of ``decode`` / ``prefill`` / ``write``) runs those sections.
``--smoke`` runs tiny shapes (on CPU through Triton's interpreter) to test the script itself.

    python benchmarks/bench_attention.py --quick         # GPU, ~2 min on one H200
    python benchmarks/bench_attention.py --quick --only decode   # decode + its tune rows
    python benchmarks/bench_attention.py --quick --only write --out results/kv_write
    python benchmarks/bench_attention.py                 # GPU, < 3 min on one H200
    python benchmarks/bench_attention.py --smoke         # anywhere
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import statistics
import sys
import time
from dataclasses import replace

import torch

if not torch.cuda.is_available():  # before triton is imported: kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from fp4comm.attention import (  # noqa: E402
    KVCache,
    paged,
    attention_tiles,
    write_kv_cache,
    write_tiles,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import gpu_kernel_us  # noqa: E402
from fp4comm.reference.attention import attention_flops  # noqa: E402

DECODE_FORMATS = ("bf16", "fp8", "int8", "fp8_dynamic")
#: issue 6 targets (H200): FP8-KV decode >= 80% of HBM peak on cache bytes at context >= 16k
#: and >= 1.6x BF16 SDPA; cache writes >= 80% of peak; BF16 prefill >= 0.8x SDPA at 8k.
TARGET_DECODE_PCT, TARGET_DECODE_VS_SDPA = 80.0, 1.6
TARGET_WRITE_PCT = 80.0
TARGET_PREFILL_VS_SDPA = 0.8


def decode_variants(Hq: int, Hkv: int, D: int, fmt: str, tune_batch: bool):
    """Decode candidates of ``--quick`` beside the default (``tune`` rows): ``(name, tiles,
    splits)``, fp8 at the tuning batch (32) only: the default (one warp, mode 3 = FP16
    operands, N = 16, 3 stages, block-table reads outside the pipeliner), ``4 warps`` (the
    session-6 default it replaced: N = 128, 2 stages), ``N32`` (one warp, 32 keys a step),
    ``cvt2`` (integer conversion to BF16, the runner-up mode) and ``splits8`` (8 splits; the
    heuristic picks 16 at b32). H200, b32 / 16k, GQA 32 / 8, D 128 (L2 flushed by a read):
    default 294-295 us, 4 warps 362, N32 307 (see ``paged.DECODE_ONE_WARP_BLOCK_N``);
    session 3: cvt2 494.3 vs 373.0 (the then default), splits8 376.4.

    Timed there and removed (commit f88ea2a has them), all slower than the then default: N = 64
    483.6 us (146 registers: 3 programs an SM), the same capped at 128 registers (an
    ``AttentionTiles.max_regs`` -> ptxas ``maxnreg`` knob: 4 an SM) 424.8, 8 warps 508.5,
    N = 256 at 8 warps and 2 stages 582.7; b128: default 1355.6, N = 64 capped 1570.7. The
    removed conversion mode 4 (8-bit QK dots): see ``paged.FP8_CONVERT_GPU``."""
    if fmt != "fp8" or not tune_batch:
        return []
    t = attention_tiles(D, Hq // Hkv, 1, fmt)
    return [("default", t, None), ("4 warps", replace(t, num_warps=4, block_n=128, num_stages=2), None),
            ("N32", replace(t, block_n=32), None), ("cvt2", replace(t, kv_convert=2), None), ("splits8", t, 8)]


def prefill_variants(Hq: int, Hkv: int, D: int, L: int, bs: int):
    """Prefill rows of ``--quick`` beside the defaults (``tune`` rows) as ``(name, format, fp8
    queries, tiles, splits, block size, stage_kv)`` (``tiles`` None: the default tiles of that
    block size): what the defaults replaced (the generic kernel; the fa kernel without
    ``fa_q_smem`` / ``bt_ldg``; unstaged pages; fp8 at N = 64) and the defaults at other
    page sizes (the other rows use ``bs``). H200, one 8k causal sequence, D 128, 32 / 8
    heads, pages of 16 (TFLOP/s; SDPA 586-613): generic 259 (N = 64) / 296 (N = 128); fa 299
    (N = 64) / 352 (N = 128; 2 / 4 stages 326 / 352); fa + q_smem 379, + bt_ldg 361, both
    379; both with pages of 128: 437; fp8 cache: fa N = 64 274, N = 128 with bt_ldg 338 (2
    stages, no ldg: 319). Session 9 (SDPA 618; block-table entries of a tile read as one
    vector, K/V by TMA where a page holds a tile): 446 at pages of 16, 452 at 32, 499 at 64
    (N = 64; N = 128 without TMA 485), 545 at 128 (no TMA 496), 537 at 256. Session 10:
    pages under 128 keys staged into 128-key pages (``stage_kv``, the default at this shape)."""
    t = attention_tiles(D, Hq // Hkv, L, "bf16")
    t8 = attention_tiles(D, Hq // Hkv, L, "fp8")
    plain = dict(fa_q_smem=False, bt_ldg=False)
    return [("generic", "bf16", False, replace(t, kernel="generic", **plain), None, bs, None),
            ("fa plain", "bf16", False, replace(t, **plain), None, bs, False),
            (f"no staging bs={bs}", "bf16", False, None, None, bs, False),
            ("default bs=32", "bf16", False, None, None, 32, None),
            ("no staging bs=32", "bf16", False, None, None, 32, False),
            ("default bs=64", "bf16", False, None, None, 64, None),
            ("no staging bs=64", "bf16", False, None, None, 64, False),
            ("no staging N=128 bs=64", "bf16", False, t, None, 64, False),
            ("default bs=128", "bf16", False, None, None, 128, None),
            ("no tma bs=128", "bf16", False, replace(t, fa_tma=False), None, 128, None),
            ("default bs=256", "bf16", False, None, None, 256, None),
            ("fa N=64 plain", "fp8", False, replace(t8, block_n=64, **plain), None, bs, None),
            ("default fp8 q", "fp8", True, None, None, bs, None)]


def bench(fn, smoke: bool) -> float:
    """Median time of ``fn()`` in microseconds: on GPU the kernels' time, as CUDA-graph replays
    after a 256 MB read that leaves L2 cold and clean (:func:`common.gpu_kernel_us`; fp4comm
    and SDPA alike)."""
    if smoke or not torch.cuda.is_available():
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return statistics.median(gpu_kernel_us(fn, reps=40))


def make_cache(fmt, num_seqs, context, Hkv, D, bs, device):
    """A cache holding ``num_seqs`` sequences of ``context`` tokens in shuffled blocks, filled
    with random codes directly (their values do not change the speed)."""
    per_seq = math.ceil(context / bs)
    nb = num_seqs * per_seq
    scale = torch.full((Hkv,), 0.02, device=device) if fmt in ("fp8", "int8") else None
    c = KVCache.allocate(nb, bs, Hkv, D, fmt, device=device, k_scale=scale, v_scale=scale)
    for t in (c.k_cache, c.v_cache):
        if fmt == "bf16":
            t.normal_()
        elif fmt.startswith("fp8"):
            t.view(torch.uint8).random_(0, 0x70)
        else:
            t.random_(-127, 128)
    for t in (c.k_scale_cache, c.v_scale_cache):
        if t is not None:
            t.uniform_(0.01, 0.03)
    bt = torch.randperm(nb, device=device, dtype=torch.int64).view(num_seqs, per_seq).to(torch.int32)
    return c, bt


def cache_bytes(c: KVCache, num_tokens: int) -> int:
    per_tok = 2 * c.num_kv_heads * c.head_dim * c.k_cache.element_size()
    if c.k_scale_cache is not None:
        per_tok += 2 * c.num_kv_heads * 4
    return per_tok * num_tokens


def gather_dense(c: KVCache, bt, context):
    """``[B, Hkv, L, D]`` BF16 K and V (dequantized) gathered from the pages."""
    B = bt.shape[0]
    bs = c.block_size
    pos = torch.arange(context, device=bt.device)
    blk = bt.long()[:, pos // bs]
    off = (pos % bs).expand(B, -1)
    out = []
    for cache, s, sc in ((c.k_cache, c.k_scale, c.k_scale_cache), (c.v_cache, c.v_scale, c.v_scale_cache)):
        x = cache[blk, off].to(torch.bfloat16)
        if s is not None:
            x = (x.float() * s.view(1, 1, -1, 1)).to(torch.bfloat16)
        if sc is not None:
            x = (x.float() * sc[blk, off][..., None]).to(torch.bfloat16)
        out.append(x.transpose(1, 2).contiguous())
    return out


def sdpa(q, k, v, causal):
    """BF16 SDPA ``q [B, Hq, M, D]`` over ``k, v [B, Hkv, L, D]`` (GQA via ``enable_gqa``)."""
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except (TypeError, RuntimeError):
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                              is_causal=causal)


def run_roofline(dev, smoke, peak):
    n = (1 << 16) if smoke else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src), smoke)
    gbps = 2 * n / us / 1e3
    return [dict(section="roofline", name="d2d copy", format="-", batch=0, context=0, us=us, gbps=gbps,
                 pct_peak=100 * gbps / peak, pct_copy=100.0)]


def run_decode(dev, smoke, peak, copy_gbps, configs, Hq, Hkv, D, bs, tune=False, tune_batch=32):
    rows = []
    for B, L in configs:
        q = torch.randn(B, Hq, D, device=dev).to(torch.bfloat16)
        cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
        seq_lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        sdpa_us = None
        for fmt in DECODE_FORMATS:
            c, bt = make_cache(fmt, B, L, Hkv, D, bs, dev)
            out = torch.empty(B, Hq, D, dtype=torch.bfloat16, device=dev)

            def fn(c=c, bt=bt, out=out):
                c.attend(q, bt, seq_lens, cu, softmax_scale=D ** -0.5, max_seqlen_q=1, check_indices=False, out=out)

            us = bench(fn, smoke)
            nbytes = cache_bytes(c, B * L)
            gbps = nbytes / us / 1e3
            rows.append(dict(section="decode", name="paged_attention", format=fmt, batch=B, context=L, us=us,
                             gbps=gbps, pct_peak=100 * gbps / peak, pct_copy=100 * gbps / copy_gbps))
            if fmt == "fp8" and L >= 16384:
                rows[-1]["target"] = f">={TARGET_DECODE_PCT:.0f}% peak, >={TARGET_DECODE_VS_SDPA}x sdpa"
            if fmt == "bf16":
                t0 = time.perf_counter()
                k, v = gather_dense(c, bt, L)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                gather_ms = (time.perf_counter() - t0) * 1e3
                q4 = q[:, :, None, :]
                sdpa_us = bench(lambda k=k, v=v: sdpa(q4, k, v, False), smoke)
                gbps_s = nbytes / sdpa_us / 1e3
                rows.append(dict(section="decode", name="sdpa (dense, gathered)", format="bf16", batch=B, context=L,
                                 us=sdpa_us, gbps=gbps_s, pct_peak=100 * gbps_s / peak,
                                 pct_copy=100 * gbps_s / copy_gbps, note=f"gather {gather_ms:.1f} ms, not timed"))
                del k, v
            r = rows[-1 if fmt != "bf16" else -2]
            r["speedup_vs_sdpa"] = sdpa_us / us
            if "target" in r:
                r["meets"] = r["pct_peak"] >= TARGET_DECODE_PCT and r["speedup_vs_sdpa"] >= TARGET_DECODE_VS_SDPA
            if tune:
                auto_splits = "auto"  # paged_attention's choice (wave-filling splits for bf16 / fp8 caches)
                for name, tiles, splits in decode_variants(Hq, Hkv, D, fmt, B == tune_batch):
                    def fv(c=c, bt=bt, out=out, tiles=tiles, splits=splits):
                        c.attend(q, bt, seq_lens, cu, softmax_scale=D ** -0.5, max_seqlen_q=1, check_indices=False,
                                 out=out, tiles=tiles, num_kv_splits=splits)

                    try:
                        us_v = bench(fv, smoke)
                    except Exception as e:  # noqa: BLE001 - a variant that does not compile / fit: say so, go on
                        rows.append(dict(section="tune", name=f"{fmt} decode {name}", format=fmt, batch=B, context=L,
                                         note=f"failed: {type(e).__name__}: {str(e)[:80]}"))
                        continue
                    g = nbytes / us_v / 1e3
                    rows.append(dict(section="tune", name=f"{fmt} decode {name}", format=fmt, batch=B, context=L,
                                     us=us_v, gbps=g, pct_peak=100 * g / peak, pct_copy=100 * g / copy_gbps,
                                     speedup_vs_sdpa=sdpa_us / us_v,
                                     note=f"N={tiles.block_n} w={tiles.num_warps} st={tiles.num_stages} "
                                          f"cvt={tiles.kv_convert} {'ldg ' if tiles.bt_ldg else ''}"
                                          f"splits={splits or auto_splits}"))
            del c, bt
    return rows


def run_prefill(dev, smoke, L, Hq, Hkv, D, bs, tune=False):
    rows = []
    flops = attention_flops([L], [L], Hq, D, causal=True)
    q = torch.randn(L, Hq, D, device=dev).to(torch.bfloat16)
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    seq_lens = torch.tensor([L], dtype=torch.int32, device=dev)
    sdpa_us = None
    variants = [("prefill", "", "bf16", False, None, None, bs, None), ("prefill", "", "fp8", False, None, None, bs, None),
                ("prefill", " fp8 q", "fp8", True, None, None, bs, None)]
    if tune:
        variants += [("tune", " " + name, *v) for name, *v in prefill_variants(Hq, Hkv, D, L, bs)]
    for section, suffix, fmt, q_fp8, tiles, splits, page, stage in variants:
        c, bt = make_cache(fmt, 1, L, Hkv, D, page, dev)
        qq = q.to(torch.float8_e4m3fn) if q_fp8 else q
        qd = torch.tensor(1.0, device=dev) if q_fp8 else None
        out = torch.empty(L, Hq, D, dtype=torch.bfloat16, device=dev)

        def fn(c=c, bt=bt, qq=qq, qd=qd, out=out, tiles=tiles, splits=splits, stage=stage):
            c.attend(qq, bt, seq_lens, cu, softmax_scale=D ** -0.5, q_descale=qd, max_seqlen_q=L,
                     check_indices=False, out=out, tiles=tiles, num_kv_splits=splits, stage_kv=stage)

        us = bench(fn, smoke)
        if fmt == "bf16" and sdpa_us is None:
            k, v = gather_dense(c, bt, L)
            q4 = q.view(1, L, Hq, D).transpose(1, 2)
            sdpa_us = bench(lambda k=k, v=v: sdpa(q4, k, v, True), smoke)
            rows.append(dict(section="prefill", name="sdpa (dense, causal)", format="bf16", batch=1, context=L,
                             us=sdpa_us, tflops=flops / sdpa_us / 1e6))
            del k, v
        t, staged = paged.launch_tiles(tiles, splits, stage, fmt, page, bt.shape[1], L, 1, Hq, Hkv, D, L)
        kv_page = paged.STAGE_PAGE if staged else page
        rows.append(dict(section=section, name="paged_attention" + suffix, format=fmt,
                         batch=1, context=L, us=us, tflops=flops / us / 1e6, speedup_vs_sdpa=sdpa_us / us,
                         note=f"{t.kernel} N={t.block_n} w={t.num_warps} st={t.num_stages} cvt={t.kv_convert} "
                              f"{'qsmem ' if t.fa_q_smem else ''}{'ldg ' if t.bt_ldg else ''}"
                              f"{'tma ' if t.fa_tma and t.kernel == 'fa' and kv_page >= t.block_n else ''}"
                              f"bs={page}{f' staged to {kv_page}' if staged else ''} "
                              f"splits={splits or ('1' if t.kernel == 'fa' else 'auto')}"))
        if fmt == "bf16" and not q_fp8:
            rows[-1].update(target=f">={TARGET_PREFILL_VS_SDPA}x sdpa",
                            meets=rows[-1]["speedup_vs_sdpa"] >= TARGET_PREFILL_VS_SDPA)
        del c, bt
    return rows


def run_write(dev, smoke, peak, copy_gbps, sizes, Hkv, D, bs):
    rows = []
    for T in sizes:
        k = torch.randn(T, Hkv, D, device=dev).to(torch.bfloat16)
        v = torch.randn(T, Hkv, D, device=dev).to(torch.bfloat16)
        for fmt in ("bf16", "fp8", "int8", "fp8_dynamic", "int8_dynamic"):
            nb = math.ceil(T / bs) + 1
            scale = torch.full((Hkv,), 0.02, device=dev) if fmt in ("fp8", "int8") else None
            c = KVCache.allocate(nb, bs, Hkv, D, fmt, device=dev, k_scale=scale, v_scale=scale)
            slots = torch.randperm(nb, device=dev)[: math.ceil(T / bs)].repeat_interleave(bs)[:T] * bs
            slots = slots + torch.arange(T, device=dev) % bs

            def fn(c=c, slots=slots):
                write_kv_cache(k, v, c.k_cache, c.v_cache, slots, kv_format=fmt, k_scale=c.k_scale, v_scale=c.v_scale,
                               k_scale_cache=c.k_scale_cache, v_scale_cache=c.v_scale_cache, check_indices=False)

            us = bench(fn, smoke)
            nbytes = 2 * k.numel() * 2 + cache_bytes(c, T) + slots.numel() * slots.element_size()
            gbps = nbytes / us / 1e3
            _, _, nw = write_tiles(Hkv, D)
            rows.append(dict(section="write", name="write_kv_cache", format=fmt, batch=T, context=0, us=us, gbps=gbps,
                             pct_peak=100 * gbps / peak, pct_copy=100 * gbps / copy_gbps,
                             target=f">={TARGET_WRITE_PCT:.0f}% peak", meets=100 * gbps / peak >= TARGET_WRITE_PCT,
                             note=f"one token a program, w={nw}"))
            del c
    return rows


COLUMNS = ["section", "name", "format", "batch", "context", "us", "gbps", "pct_peak", "pct_copy", "tflops",
           "speedup_vs_sdpa", "target", "meets", "note"]


def print_table(rows):
    table = [[_fmt(r.get(c)) for c in COLUMNS] for r in rows]
    try:
        from tabulate import tabulate

        print(tabulate(table, headers=COLUMNS))
    except ImportError:
        print("\t".join(COLUMNS))
        for t in table:
            print("\t".join(t))


def _fmt(x):
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter ok)")
    p.add_argument("--quick", action="store_true",
                   help="decode b32/b128 at 16k + fp8 decode tile sweep, prefill 8k (+ N=128), writes (~90 s)")
    p.add_argument("--out", default="results/attention", help="output path prefix (.json and .csv are added)")
    p.add_argument("--peak-gbps", type=float, default=4800.0, help="HBM spec peak in GB/s (H200: 4800)")
    p.add_argument("--batches", default="32,128")
    p.add_argument("--contexts", default="4096,16384,65536")
    p.add_argument("--max-tokens", type=int, default=1 << 21, help="skip decode configs above batch*context")
    p.add_argument("--prefill-len", type=int, default=8192)
    p.add_argument("--only", default="decode,prefill,write",
                   help="comma list of sections to run (the roofline always runs): e.g. --quick --only decode "
                        "times the decode rows and their tune variants alone (~60 s on one H200)")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= {"decode", "prefill", "write"}:
        p.error(f"--only: unknown section(s) {sorted(only - {'decode', 'prefill', 'write'})}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or dev.type != "cuda"
    tune = args.quick
    if smoke:
        Hq, Hkv, D, bs = 4, 2, 64, 16
        configs = [(2, 40)]
        prefill_len, write_T = 32, [64]
        tune_batch = 2
    elif args.quick:
        Hq, Hkv, D, bs = 32, 8, 128, 16
        configs = [(32, 16384), (128, 16384)]
        prefill_len, write_T = args.prefill_len, [32768, 131072]
        tune_batch = 32
    else:
        Hq, Hkv, D, bs = 32, 8, 128, 16
        configs = [(b, c) for b in map(int, args.batches.split(",")) for c in map(int, args.contexts.split(","))
                   if b * c <= args.max_tokens]
        prefill_len, write_T = args.prefill_len, [32768, 131072]
        tune_batch = 32
    rows = run_roofline(dev, smoke, args.peak_gbps)
    copy_gbps = rows[0]["gbps"]
    if "decode" in only:
        rows += run_decode(dev, smoke, args.peak_gbps, copy_gbps, configs, Hq, Hkv, D, bs, tune, tune_batch)
    if "prefill" in only:
        rows += run_prefill(dev, smoke, prefill_len, Hq, Hkv, D, bs, tune)
    if "write" in only:
        rows += run_write(dev, smoke, args.peak_gbps, copy_gbps, write_T, Hkv, D, bs)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    print(f"device: {device_name}  Hq={Hq} Hkv={Hkv} D={D} block_size={bs}  peak={args.peak_gbps:.0f} GB/s  "
          f"copy={copy_gbps:.0f} GB/s")
    print_table(rows)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device_name, Hq=Hq, Hkv=Hkv, head_dim=D, block_size=bs, peak_gbps=args.peak_gbps,
                copy_gbps=copy_gbps, torch=torch.__version__, smoke=smoke, quick=args.quick)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
