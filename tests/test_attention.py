"""Paged attention over bf16 / fp8 / int8 caches vs the plain-torch FP32 reference.

Strictness:
  * ``bf16``: the kernel's max error vs the FP32 reference (same cache contents) must be at
    most 2x that of ``torch.nn.functional.scaled_dot_product_attention`` run in BF16 on the
    gathered data, plus ``ABS_SLACK`` (flash-attention's rule);
  * quantized formats: vs the FP32 reference that dequantizes the *same* cache, the only
    differences are BF16 rounding of the probabilities (and of ``p * v_scale`` for dynamic
    scales) and of the output: ``max|err| <= KERNEL_TOL * max|ref| + ABS_SLACK``;
  * end to end (quantization included) vs attention on the unquantized K/V:
    ``QUANT_TOL[format]`` relative to ``max|ref|``.
All scales and descales differ from 1 (and from each other, per head and per sequence).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from fp4comm.attention import (
    AttentionTiles,
    KVCache,
    attention_tiles,
    calibrate_kv_scales,
    paged_attention,
    select_num_kv_splits,
)
from fp4comm.attention import paged as paged_mod
from fp4comm.attention.paged import effective_convert_mode, kv_convert_mode
from fp4comm.reference import attention as ref
from tests.sm90 import compile_calls

ABS_SLACK = 2e-3
KERNEL_TOL = 1.5e-2
#: end-to-end error of quantized caches (relative to max|out|): E4M3 keeps 3 mantissa bits
#: (<= 6.25% per element, averaging down over keys), int8 7 bits.
QUANT_TOL = {"bf16": 2e-2, "fp8": 8e-2, "int8": 3e-2, "fp8_dynamic": 8e-2, "int8_dynamic": 3e-2}
FORMATS = list(ref.KV_FORMATS)
#: where the non-``gpu`` tests run: the GPU when present, else CPU through the interpreter
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(seq_lens, q_lens, Hq, Hkv, D, bs, fmt, *, seed=0, device=DEV, spare_blocks=3, k_mag=1.0,
          q_fp8=False, descale_kind="tensor", zero_head=False):
    """Random K/V written through ``write_kv_cache`` into a shuffled paged cache.

    Returns a dict with the cache, queries, block table, lengths and the unquantized K/V.
    Static formats get calibrated per-head scales times a per-head factor (never 1).
    """
    g = torch.Generator().manual_seed(seed)
    S = len(seq_lens)
    maxb = max(1, max(math.ceil(L / bs) for L in seq_lens))
    nb = S * maxb + spare_blocks
    bt = torch.randperm(nb, generator=g)[: S * maxb].view(S, maxb).to(torch.int32)
    ks_raw, vs_raw = [], []
    head_mag = torch.linspace(0.5, 2.0, Hkv).view(1, Hkv, 1)
    for L in seq_lens:
        k = torch.randn(L, Hkv, D, generator=g) * head_mag * k_mag
        v = torch.randn(L, Hkv, D, generator=g) * head_mag.flip(1)
        if zero_head and L:
            k[:, 0] = 0
            v[:, 0] = 0
        ks_raw.append(k)
        vs_raw.append(v)
    k_scale = v_scale = None
    if fmt in ("fp8", "int8"):
        allk = torch.cat(ks_raw) if sum(seq_lens) else torch.ones(1, Hkv, D)
        allv = torch.cat(vs_raw) if sum(seq_lens) else torch.ones(1, Hkv, D)
        k_scale, v_scale = calibrate_kv_scales(allk, allv, fmt)
    cache = KVCache.allocate(nb, bs, Hkv, D, fmt, k_scale=k_scale, v_scale=v_scale)
    cache = KVCache(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in (
        cache.k_cache, cache.v_cache)), fmt,
        *(t.to(device) if t is not None else None for t in (cache.k_scale, cache.v_scale, cache.k_scale_cache,
                                                           cache.v_scale_cache)))
    bt = bt.to(device)
    for i, L in enumerate(seq_lens):
        if L:
            pos = torch.arange(L, device=device)
            slots = bt[i].long()[pos // bs] * bs + pos % bs
            cache.write(ks_raw[i].to(device), vs_raw[i].to(device), slots, impl="reference")
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    T = int(cu[-1])
    q = torch.randn(T, Hq, D, generator=g).to(device)
    q_descale = None
    if q_fp8:
        qs = q.abs().amax().clamp_min(1e-6) / 448.0 * 1.7  # not the tightest scale: exercises it
        q_descale = qs.reshape(())
        qq = ref.quantize_values(q, qs, "fp8")
        q_true = qq.float() * qs
        q = qq
    else:
        q = q.to(torch.bfloat16)
        q_true = q.float()
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return dict(cache=cache, q=q, q_true=q_true, q_descale=q_descale, bt=bt, seq_lens=sl, cu=cu,
                k_raw=ks_raw, v_raw=vs_raw, S=S, Hq=Hq, Hkv=Hkv, D=D, fmt=fmt)


#: kernels the prefill tests run, as ``AttentionTiles`` overrides: the generic one, the
#: prefill-specialised one and its opt-in variants (see ``paged_prefill_kernel``)
KERNEL_TILES = {
    "generic": dict(kernel="generic"),
    "fa": dict(kernel="fa", fa_q_smem=False, bt_ldg=False),
    "fa_qsmem": dict(kernel="fa", fa_q_smem=True, bt_ldg=False),  # BF16 queries unmodified, the sign in the score scale
    "fa_ldg": dict(kernel="fa", fa_q_smem=True, bt_ldg=True),  # + block-table reads outside the pipeliner
}
#: ``fa_ldg`` differs from ``fa_qsmem`` on the GPU only (the interpreter reads the block table
#: with ``tl.load`` either way)
KERNELS = ["generic", "fa", "fa_qsmem",
           pytest.param("fa_ldg", marks=pytest.mark.skipif(DEV.type != "cuda", reason="GPU-only variant"))]


def skip_inert(kernel, fmt, q_fp8=False):
    """``fa_qsmem`` acts on BF16 queries with BF16 operands only; with an fp8/int8 cache the
    default conversion (FP16 operands) or FP8 queries build the same kernel as ``fa``."""
    if kernel == "fa_qsmem" and (fmt != "bf16" or q_fp8):
        pytest.skip("same kernel build as fa (fa_q_smem needs BF16 queries and BF16 operands)")


def default_tiles(case):
    return attention_tiles(case["D"], case["Hq"] // case["Hkv"], int((case["cu"][1:] - case["cu"][:-1]).max()),
                           case["fmt"])


def run(case, impl="triton", kernel=None, **kw):
    """``paged_attention`` on ``case``; ``kernel`` forces ``AttentionTiles.kernel`` (on the
    given ``tiles`` or the default ones), also for decode-shaped tiles."""
    c = case["cache"]
    kw.setdefault("softmax_scale", case["D"] ** -0.5)
    kw.setdefault("q_descale", case["q_descale"])
    if kernel is not None:
        kw["tiles"] = dataclasses.replace(kw.get("tiles") or default_tiles(case), **KERNEL_TILES.get(kernel, {"kernel": kernel}))
    return c.attend(case["q"], case["bt"], case["seq_lens"], case["cu"], impl=impl, **kw)


def reference(case, **kw):
    """FP32 reference over the same (dequantized) cache."""
    c = case["cache"]
    kw.setdefault("softmax_scale", case["D"] ** -0.5)
    kw.setdefault("q_descale", case["q_descale"])
    kw.setdefault("k_descale", c.k_scale)
    kw.setdefault("v_descale", c.v_scale)
    return ref.paged_attention(case["q"], c.k_cache, c.v_cache, case["bt"], case["seq_lens"], case["cu"],
                               c.kv_format, kw.pop("softmax_scale"), k_scale_cache=c.k_scale_cache,
                               v_scale_cache=c.v_scale_cache, **kw)


def unquantized(case, causal=True, sliding_window=None):
    """FP32 attention on the original K/V (before any cache quantization)."""
    Hq, Hkv = case["Hq"], case["Hkv"]
    out = torch.zeros(case["q_true"].shape)
    cu = case["cu"].tolist()
    for i, L in enumerate(case["seq_lens"].tolist()):
        qs, qe = cu[i], cu[i + 1]
        if qe == qs:
            continue
        k = case["k_raw"][i].repeat_interleave(Hq // Hkv, 1).transpose(0, 1)
        v = case["v_raw"][i].repeat_interleave(Hq // Hkv, 1).transpose(0, 1)
        allowed = ref.attention_mask(qe - qs, L, causal, sliding_window, "cpu")
        o = ref.masked_softmax_attention(case["q_true"][qs:qe].cpu().transpose(0, 1), k, v, allowed,
                                         case["D"] ** -0.5)
        out[qs:qe] = o.transpose(0, 1)
    return out


def sdpa_bf16(case, causal=True):
    """torch SDPA in BF16 on the K/V gathered from the bf16 cache, per sequence."""
    c = case["cache"]
    Hq, Hkv = case["Hq"], case["Hkv"]
    out = torch.zeros(case["q"].shape, dtype=torch.float32, device=case["q"].device)
    cu = case["cu"].tolist()
    for i, L in enumerate(case["seq_lens"].tolist()):
        qs, qe = cu[i], cu[i + 1]
        if qe == qs or L == 0:
            continue
        k = ref.gather_kv(c.k_cache, case["bt"][i], L).to(torch.bfloat16).repeat_interleave(Hq // Hkv, 1)
        v = ref.gather_kv(c.v_cache, case["bt"][i], L).to(torch.bfloat16).repeat_interleave(Hq // Hkv, 1)
        mask = ref.attention_mask(qe - qs, L, causal, None, k.device)
        o = F.scaled_dot_product_attention(case["q"][qs:qe].transpose(0, 1), k.transpose(0, 1),
                                           v.transpose(0, 1), attn_mask=mask, scale=case["D"] ** -0.5)
        out[qs:qe] = o.transpose(0, 1).float().cpu()
    return out


def assert_close_to_ref(out, want, tol=KERNEL_TOL, what=""):
    assert not out.isnan().any(), f"{what}: NaN in output"
    err = (out.float().cpu() - want.float().cpu()).abs().max().item()
    bound = tol * want.abs().max().item() + ABS_SLACK
    assert err <= bound, f"{what}: max err {err:.3e} > {bound:.3e}"


# (seq_lens, q_lens): awkward lengths, decode, chunked prefill, prefill, an empty sequence,
# a padded decode row (seq_len 0, q_len 1) and a long one
SHAPES = {
    "prefill": ([1, 15, 17], [1, 15, 17]),
    "decode": ([1, 15, 17, 300, 0], [1, 1, 1, 1, 0]),
    "chunked": ([15, 17, 300], [5, 17, 33]),
    "padded": ([0, 17, 0], [1, 3, 2]),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_formats_vs_reference(fmt, shape, kernel):
    if kernel != "generic" and shape == "decode":
        pytest.skip("decode runs the generic kernel")
    skip_inert(kernel, fmt)
    seq_lens, q_lens = SHAPES[shape]
    case = build(seq_lens, q_lens, Hq=4, Hkv=2, D=64, bs=16, fmt=fmt)
    out = run(case, kernel=kernel)
    want = reference(case)
    assert_close_to_ref(out, want, what=f"{fmt}/{shape}")
    # rows of padded sequences (nothing to attend) are exactly zero
    cu = case["cu"].tolist()
    for i, L in enumerate(seq_lens):
        if L == 0:
            assert torch.equal(out[cu[i]:cu[i + 1]].float(), torch.zeros_like(out[cu[i]:cu[i + 1]].float()))
    # end to end vs unquantized attention
    assert_close_to_ref(out, unquantized(case), tol=QUANT_TOL[fmt], what=f"{fmt}/{shape} vs unquantized")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", ["prefill", "chunked"], ids=["prefill", "chunked"])
def test_bf16_within_2x_sdpa(shape, kernel):
    seq_lens, q_lens = SHAPES[shape]
    case = build(seq_lens, q_lens, Hq=4, Hkv=2, D=64, bs=16, fmt="bf16", seed=1)
    want = reference(case)
    out = run(case, kernel=kernel)
    err_kernel = (out.float() - want).abs().max().item()
    err_sdpa = (sdpa_bf16(case) - want).abs().max().item()
    assert err_kernel <= 2 * err_sdpa + 1e-4, f"kernel {err_kernel:.3e} vs SDPA-bf16 {err_sdpa:.3e}"


@pytest.mark.parametrize(
    "Hq,Hkv", [(4, 4), (6, 2), (8, 1), (3, 1)], ids=["mha", "gqa3", "mqa8", "mqa3"]
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_gqa_mqa(Hq, Hkv, kernel):
    skip_inert(kernel, "fp8_dynamic")
    case = build([17, 40], [17, 1], Hq=Hq, Hkv=Hkv, D=64, bs=8, fmt="fp8_dynamic", seed=2)
    assert_close_to_ref(run(case, kernel=kernel), reference(case), what=f"Hq={Hq} Hkv={Hkv}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("D", [128, 256], ids=["d128", "d256"])
def test_head_dims(D, kernel):
    skip_inert(kernel, "int8")
    case = build([17, 33], [17, 2], Hq=2, Hkv=1, D=D, bs=16, fmt="int8", seed=3)
    assert_close_to_ref(run(case, kernel=kernel), reference(case), what=f"D={D}")


@pytest.mark.parametrize("splits", [2, 4], ids=["split2", "split4"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8_dynamic"])
def test_split_kv(fmt, splits):
    case = build([300, 17, 0, 1], [1, 2, 1, 1], Hq=4, Hkv=2, D=64, bs=16, fmt=fmt, seed=4)
    out = run(case, num_kv_splits=splits)
    assert_close_to_ref(out, reference(case), what=f"splits={splits}")
    one = run(case, num_kv_splits=1)
    assert (out.float() - one.float()).abs().max().item() <= 0.02 * one.float().abs().max().item() + ABS_SLACK
    assert torch.equal(out[3].float(), torch.zeros_like(out[3].float()))  # padded row (seq_len 0): zeros


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8_dynamic"])
def test_fused_split_combine(fmt):
    """Split-KV with the merge in the kernel (the last split program of a tile merges the
    workspace rows, ``fuse_combine``) equals the separate combine pass bit for bit, for split
    counts that are not powers of two too; above FUSE_COMBINE_MAX_SPLITS the separate pass
    runs. Rows of an empty sequence stay zero; the counters are zero again after the launch
    (a second call gives the same result)."""
    case = build([300, 17, 0, 1000], [1, 2, 1, 1], Hq=4, Hkv=2, D=64, bs=16, fmt=fmt, seed=14)
    want = reference(case)
    tiles = default_tiles(case)
    assert tiles.fuse_combine
    for splits in (2, 3, 6, 7):
        fused = run(case, num_kv_splits=splits, tiles=tiles)
        sep = run(case, num_kv_splits=splits, tiles=dataclasses.replace(tiles, fuse_combine=False))
        assert torch.equal(fused, sep), splits
        assert torch.equal(run(case, num_kv_splits=splits, tiles=tiles), fused), splits
        assert_close_to_ref(fused, want, what=f"{fmt} fused splits={splits}")
        assert torch.equal(fused[3].float(), torch.zeros_like(fused[3].float()))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", [1, 7, 40], ids=["w1", "w7", "w40"])
def test_sliding_window(window, kernel):
    """The fa kernel also with 8-key tiles (16 on the GPU): tiles inside every row's window run unmasked,
    the window's leading edge and the diagonal masked."""
    case = build([60, 17], [20, 1], Hq=2, Hkv=2, D=64, bs=8, fmt="bf16", seed=5)
    out = run(case, sliding_window=window, kernel=kernel)
    assert_close_to_ref(out, reference(case, sliding_window=window), what=f"window={window}")
    full = run(case, kernel=kernel)
    assert not torch.equal(out, full)
    if kernel != "generic":  # tl.dot needs K >= 16 when compiled: 16-key tiles on the GPU
        small = AttentionTiles(block_q=16, group_pad=1, block_n=8 if DEV.type == "cpu" else 16, num_warps=4,
                               num_stages=2)
        out = run(case, sliding_window=window, tiles=small, kernel=kernel)
        assert_close_to_ref(out, reference(case, sliding_window=window), what=f"window={window} small tiles")


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_causal(kernel):
    skip_inert(kernel, "int8_dynamic")
    case = build([17, 30], [17, 5], Hq=2, Hkv=1, D=64, bs=8, fmt="int8_dynamic", seed=6)
    out = run(case, causal=False, kernel=kernel)
    assert_close_to_ref(out, reference(case, causal=False), what="non-causal")
    assert_close_to_ref(out, unquantized(case, causal=False), tol=QUANT_TOL["int8_dynamic"], what="non-causal e2e")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["tensor", "per_head", "per_seq_head"])
def test_fp8_queries_and_descales(kind, kernel):
    """FP8 queries with q_descale; every descale element is honoured (a kernel that read only
    the first element would fail: the values differ per sequence and head)."""
    skip_inert(kernel, "fp8", q_fp8=True)
    case = build([17, 40, 5], [3, 1, 5], Hq=4, Hkv=2, D=64, bs=8, fmt="fp8", seed=7, q_fp8=True)
    c = case["cache"]
    S, Hkv = case["S"], case["Hkv"]
    base_k = c.k_scale.view(1, Hkv).expand(S, Hkv)
    base_v = c.v_scale.view(1, Hkv).expand(S, Hkv)
    f = torch.tensor([[1.0, 1.5], [0.7, 1.2], [1.3, 0.9]], device=DEV)
    if kind == "tensor":
        kd, vd = torch.tensor(0.031, device=DEV), torch.tensor([0.017], device=DEV)
    elif kind == "per_head":
        kd, vd = c.k_scale * torch.tensor([0.8, 1.3], device=DEV), c.v_scale * torch.tensor([1.1, 0.6], device=DEV)
    else:
        kd, vd = (base_k * f).contiguous(), (base_v * f.flip(1)).contiguous()
    qd = case["q_descale"] if kind != "per_seq_head" else case["q_descale"] * f.flip(0).contiguous()
    out = run(case, q_descale=qd, k_descale=kd, v_descale=vd, kernel=kernel)
    want = reference(case, q_descale=qd, k_descale=kd, v_descale=vd)
    assert_close_to_ref(out, want, what=kind)
    if kind != "tensor":  # using only element [0] would give a different answer
        first = run(case, q_descale=qd.reshape(-1)[:1], k_descale=kd.reshape(-1)[:1], v_descale=vd.reshape(-1)[:1],
                    kernel=kernel)
        assert (first.float() - want).abs().max() > 10 * ((out.float() - want).abs().max() + ABS_SLACK)
    if kind == "tensor":
        # fp8 queries: the q scale really is folded in (vs the dequantized-query reference)
        base = run(case, q_descale=None, k_descale=kd, v_descale=vd, kernel=kernel)
        assert (base.float() - want).abs().max() > 1e-2
        # a negative descale (the fa kernel moves its sign into the queries) is honoured too
        neg = run(case, q_descale=qd, k_descale=-kd, v_descale=vd, kernel=kernel)
        assert_close_to_ref(neg, reference(case, q_descale=qd, k_descale=-kd, v_descale=vd), what="negative")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt,mode", [("bf16", 0), ("fp8_dynamic", 0), ("int8", 3)], ids=["bf16", "fp8dyn-cvt0", "int8"])
def test_negative_descale_bf16_queries(fmt, mode, kernel):
    """BF16 queries and a negative ``k_descale`` (per sequence and head, mixed signs): the fa
    kernel either moves the sign into the queries or (``fa_q_smem``, BF16 operands) runs
    every tile of a negative program through the masked step, which scales before its max;
    prefill and chunked rows, 16-token q tiles over 8-key tiles (16 on the GPU; most of them unmasked). The
    scores span more than 128 (base 2), so a running max taken on the wrong side overflows."""
    case = build([40, 23], [40, 9], Hq=4, Hkv=2, D=64, bs=8, fmt=fmt, seed=9)
    kd = torch.tensor([[-1.3, 0.8], [0.9, -0.6]], device=DEV) * 40  # score ranges beyond exp2's (2^128)
    tiles = AttentionTiles(block_q=16, group_pad=2, block_n=8 if DEV.type == "cpu" else 16, num_warps=4, num_stages=2,
                           kv_convert=mode)  # tl.dot needs K >= 16 when compiled
    out = run(case, k_descale=kd, tiles=tiles, kernel=kernel)
    assert_close_to_ref(out, reference(case, k_descale=kd), what=f"{fmt} negative")
    assert_close_to_ref(run(case, k_descale=kd.abs(), tiles=tiles, kernel=kernel), reference(case, k_descale=kd.abs()),
                        what=f"{fmt} positive")


@pytest.mark.parametrize("fmt", ["fp8", "int8", "fp8_dynamic", "int8_dynamic"])
def test_huge_values_saturate(fmt):
    """K/V far beyond the range saturate in the cache (static: at +-QMAX * scale; dynamic: the
    scale follows the finite amax, Inf saturates); the cache and the attention stay finite."""
    case = build([17], [2], Hq=2, Hkv=1, D=64, bs=8, fmt=fmt, seed=8)
    c = case["cache"]
    big = 3e38 if fmt in ("fp8", "int8") else 1e6  # dynamic: the true K is this big, keep q.k finite
    k = torch.full((17, 1, 64), big, device=DEV)
    k[:, :, ::2] = -float("inf")
    v = torch.full((17, 1, 64), -big, device=DEV)
    pos = torch.arange(17, device=DEV)
    slots = case["bt"][0].long()[pos // 8] * 8 + pos % 8
    c.write(k, v, slots, impl="triton")
    out = run(case)
    assert out.isfinite().all()
    assert_close_to_ref(out, reference(case), what=fmt)
    codes = c.k_cache.float()
    assert codes.isfinite().all()
    qmax = ref.QMAX[ref.base_format(fmt)]
    assert codes.abs().max() == qmax


def test_all_zero_heads_dynamic():
    case = build([17, 5], [3, 5], Hq=4, Hkv=2, D=64, bs=8, fmt="int8_dynamic", seed=9, zero_head=True)
    out = run(case)
    assert out.isfinite().all()
    assert_close_to_ref(out, reference(case), what="zero head")
    # heads 0,1 (kv head 0) read only zero values -> zero output
    assert out[:, :2].abs().max() == 0
    sc = case["cache"].k_scale_cache
    assert sc.isfinite().all() and (sc > 0).all()


def test_reference_impl_path():
    case = build([17, 3], [2, 3], Hq=2, Hkv=1, D=64, bs=8, fmt="fp8", seed=10)
    out = run(case, impl="reference")
    assert out.dtype == torch.bfloat16
    assert_close_to_ref(out, reference(case), tol=2**-8, what="reference impl")  # BF16 output rounding


def test_empty_batch_and_out_buffer():
    case = build([0, 0], [0, 0], Hq=2, Hkv=1, D=64, bs=8, fmt="bf16")
    assert run(case).shape == (0, 2, 64)
    case = build([9], [9], Hq=2, Hkv=1, D=64, bs=8, fmt="bf16")
    buf = torch.full((9, 2, 64), float("nan"), dtype=torch.bfloat16, device=DEV)
    out = run(case, out=buf)
    assert out.data_ptr() == buf.data_ptr() and not buf.isnan().any()


def test_tile_and_split_heuristics(monkeypatch):
    t = attention_tiles(128, 8, 1, "fp8")
    assert t.block_m == 16 and t.group_pad == 8 and t.num_warps == 1
    assert t.block_n == paged_mod.DECODE_ONE_WARP_BLOCK_N
    assert attention_tiles(128, 4, 1, "int8_dynamic").block_n == paged_mod.DECODE_ONE_WARP_BLOCK_N_DYNAMIC
    # one warp only for M = 16 at head dim <= 128: 32 rows or head dim 256 keep 4 warps
    t = attention_tiles(128, 8, 4, "fp8")
    assert t.block_m == 32 and t.num_warps == 4 and t.block_n == 128
    assert t.num_stages == paged_mod.DECODE_ONE_BYTE_STAGES
    assert attention_tiles(256, 4, 1, "fp8").num_warps == 4
    t = attention_tiles(128, 1, 8192, "bf16")
    assert t.block_m == 128 and t.num_warps == 8
    t = attention_tiles(256, 3, 4096, "bf16")
    assert t.group_pad == 4 and t.block_m == 64
    assert select_num_kv_splits(32 * 8, 65536, 132) > 1  # long-context decode splits
    assert select_num_kv_splits(512 * 8, 65536, 132) == 1  # enough programs already
    assert select_num_kv_splits(128 * 8, 16384, 132) == 4  # b128 x 8 KV heads: 4096 programs, 31 an SM
    assert select_num_kv_splits(8, 600, 132) == 1  # too short to split
    s = select_num_kv_splits(1, 1 << 20, 132)
    assert s & (s - 1) == 0 and 1 < s <= 32
    # batch 32 x 8 KV heads at 16k on 132 SMs: >= 16 programs an SM, each >= 64 KB of fp8 K+V
    s = select_num_kv_splits(32 * 8, 16384, 132)
    assert s == 16 and 32 * 8 * s >= 16 * 132 and (16384 // s) * 2 * 128 >= 64 * 1024
    # wave-filling splits (bf16 / fp8 caches): slots = resident programs an SM x SMs
    sfs = paged_mod.splits_for_slots
    assert sfs(32 * 8, 16384, 12 * 132) == 6  # 1536 of 1584 slots: one wave
    assert sfs(128 * 8, 16384, 12 * 132) == 3  # 3072: two full waves (1 split: 65% of one)
    assert sfs(32 * 8, 16384, 7 * 132) == 3  # fewer resident programs, fewer splits
    assert sfs(64, 16384, 12 * 132) == 24 and sfs(8, 600, 1584) == 1 and sfs(1, 1 << 20, 1584) == 32
    assert sfs(64 * 8, 4096, 12 * 132) == 3  # <= 4096 // MIN_KEYS_PER_SPLIT = 8 splits allowed
    for P, L, slots in [(256, 16384, 1584), (1024, 16384, 1320), (7, 3000, 400), (5000, 1 << 16, 396)]:
        got = sfs(P, L, slots)  # the chosen count minimizes the model over the allowed counts
        allowed = [c for c in paged_mod.SPLIT_CHOICES if c <= max(1, L // paged_mod.MIN_KEYS_PER_SPLIT)]
        cost = {c: -(-P * c // slots) * (1 / c + paged_mod.SPLIT_WAVE_COST) for c in allowed}
        assert got in allowed and cost[got] <= min(cost.values()) + 1e-9, (P, L, slots, got)
    assert attention_tiles(128, 4, 1, "fp8").fuse_combine and not attention_tiles(128, 4, 8192, "bf16").fuse_combine
    assert attention_tiles(128, 4, 1, "fp8").kv_convert == kv_convert_mode("fp8")
    assert attention_tiles(128, 4, 1, "bf16").kv_convert == 0
    assert attention_tiles(64, 4, 8192, "bf16").block_n == 128
    assert attention_tiles(128, 4, 8192, "bf16").block_n == 128 and attention_tiles(128, 4, 8192, "fp8").block_n == 128
    assert attention_tiles(128, 4, 8192, "int8").block_n == 64  # N = 128 timed for fp8 only
    # TMA-fed fa tiles (2-byte caches): N = 64 where a page of 64 keys then holds a tile
    assert attention_tiles(128, 4, 8192, "bf16", 64).block_n == 64 and attention_tiles(128, 4, 8192, "bf16").fa_tma
    assert [attention_tiles(128, 4, 8192, "bf16", bs).block_n for bs in (16, 32, 128, 256, 48)] == [128] * 5
    assert attention_tiles(128, 4, 8192, "fp8", 64).block_n == 128 and not attention_tiles(128, 4, 8192, "fp8").fa_tma
    assert attention_tiles(128, 4, 1, "bf16", 64) == attention_tiles(128, 4, 1, "bf16")  # decode: no change
    assert not attention_tiles(128, 4, 1, "bf16", 64).fa_tma
    t = attention_tiles(128, 4, 8192, "bf16")
    assert t.fa_q_smem and t.bt_ldg and not attention_tiles(128, 4, 1, "bf16").fa_q_smem
    # the kernel knob: prefill tiles follow PREFILL_KERNEL, decode tiles stay generic
    assert attention_tiles(128, 4, 8192, "bf16").kernel == paged_mod.PREFILL_KERNEL == "fa"
    monkeypatch.setattr(paged_mod, "PREFILL_KERNEL", "generic")
    assert attention_tiles(128, 4, 8192, "bf16").kernel == "generic"
    assert attention_tiles(128, 4, 1, "bf16").kernel == "generic"
    case = build([9], [9], Hq=2, Hkv=1, D=64, bs=8, fmt="bf16")
    with pytest.raises(ValueError, match="tiles.kernel"):
        run(case, kernel="flash")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bs", [12, 64, 128], ids=["bs12_runtime", "bs64_page_per_tile", "bs128_page_per_tile"])
def test_block_sizes_and_unmasked_tiles(bs, kernel):
    """Whole tiles below the causal diagonal run unmasked; pages of a power-of-two size that
    hold whole tiles are read with one block-table entry a tile; other sizes at run time."""
    case = build([300, 130, 1], [300, 1, 1], Hq=4, Hkv=2, D=64, bs=bs, fmt="int8_dynamic", seed=12)
    assert_close_to_ref(run(case, kernel=kernel), reference(case), what=f"bs={bs}")


def poison_unused_slots(case):
    """Every cache slot no sequence of ``case`` uses (the tails of last pages, spare pages)
    set to NaN (bf16: 0x7FC0, E4M3: 0x7F) or, int8, +127: a kernel that reads them and
    relies on ``p = 0`` alone (``0 * NaN`` is NaN) gives NaN."""
    c, bs, fmt = case["cache"], case["cache"].k_cache.shape[1], case["fmt"]
    used = torch.zeros(c.k_cache.shape[:2], dtype=torch.bool)
    for i, L in enumerate(case["seq_lens"].tolist()):
        pos = torch.arange(L)
        used[case["bt"][i].cpu().long()[pos // bs], pos % bs] = True
    for t in (c.k_cache, c.v_cache):
        bits = t.view(torch.int16 if fmt == "bf16" else torch.int8)
        bits[~used.to(t.device)] = 0x7FC0 if fmt == "bf16" else 0x7F


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8_dynamic"])
def test_fa_tma_matches_pointer_loads(fmt):
    """fa kernel, pages holding whole tiles: K/V tiles read through TMA descriptors give bit
    for bit the answer of the pointer loads, and both match the reference, with the unused
    slots of each sequence's last page (and the spare pages) full of NaN / extreme codes
    (TMA reads whole pages: those rows must be zeroed, not merely given p = 0)."""
    case = build([15, 17, 300, 40], [5, 17, 33, 40], Hq=4, Hkv=2, D=64, bs=32, fmt=fmt, seed=17)
    c = case["cache"]
    poison_unused_slots(case)
    tiles = AttentionTiles(block_q=8, group_pad=2, block_n=16, num_warps=4, num_stages=2, kernel="fa", fa_tma=True)
    assert paged_mod.fa_tensor_descriptors(c.k_cache, c.v_cache, 32, 16) is not None
    out_tma = run(case, tiles=tiles)
    out_ptr = run(case, tiles=dataclasses.replace(tiles, fa_tma=False))
    assert torch.equal(out_tma, out_ptr)
    assert_close_to_ref(out_tma, reference(case), what=f"{fmt} tma")


@pytest.mark.parametrize("bs,causal,window", [(8, True, None), (4, False, None), (16, True, 40)])
def test_stage_kv_matches_unstaged(bs, causal, window):
    """Pages smaller than a tile staged into 128-key pages (read by TMA) give bit for bit the
    answer of the unstaged launch (pointer loads through the block table), with NaN in every
    slot no sequence uses, garbage (-1, out of range) in the block-table columns past each
    sequence's pages, and empty / 1- / 15- / 17-token sequences."""
    case = build([15, 17, 300, 1, 0], [5, 17, 33, 1, 0], Hq=4, Hkv=2, D=64, bs=bs, fmt="bf16", seed=23)
    bt = case["bt"]
    poison_unused_slots(case)
    for i, L in enumerate(case["seq_lens"].tolist()):
        pages = -(-L // bs)
        spare = torch.arange(bt.shape[1] - pages, device=bt.device)
        bt[i, pages:] = torch.where(spare % 2 == 0, -1, 10**6).to(torch.int32)  # never read, staged or not
    tiles = AttentionTiles(block_q=8, group_pad=2, block_n=16, num_warps=4, num_stages=2, kernel="fa", fa_tma=True)
    kw = dict(tiles=tiles, causal=causal, sliding_window=window, check_indices=False, max_seqlen_q=33)
    staged = run(case, stage_kv=True, **kw)
    assert torch.equal(staged, run(case, stage_kv=False, **kw))
    assert_close_to_ref(staged, reference(case, causal=causal, sliding_window=window), what=f"staged bs={bs}")


def test_stage_kv_pages():
    """The staged caches hold each sequence's pages in order, 128-key pages one sequence
    after the other, for packed and padded (non-contiguous) caches; unused entries may be
    anything."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(10, 16, 2, 8, generator=g).to(torch.bfloat16)
    padded = torch.randn(10, 17, 2, 8, generator=g).to(torch.bfloat16)[:, :16]  # not contiguous
    bt = torch.tensor([[3, 1, 7, -5, 99, 0, 2, 2, 4], [9, 8, 6, 5, 4, 3, 2, 1, 0]], dtype=torch.int32)
    ks, vs, sbt = paged_mod.stage_kv_pages(k, padded, bt)
    assert ks.shape == vs.shape == (2 * 2, 128, 2, 8) and ks.is_contiguous() and vs.is_contiguous()
    assert sbt.tolist() == [[0, 1], [2, 3]] and sbt.dtype == torch.int32
    assert paged_mod.fa_tensor_descriptors(ks, vs, 128, 128) is not None  # what staging is for: TMA tiles
    for i in range(2):
        for j in range(9):
            e = int(bt[i, j])
            if 0 <= e < 10:
                for src, dst in ((k, ks), (padded, vs)):
                    assert torch.equal(dst.view(2, 256, 2, 8)[i, 16 * j:16 * j + 16], src[e])
    with pytest.raises(ValueError, match="page"):
        paged_mod.stage_kv_pages(k, k, bt, page=24)


def test_stages_kv_rule():
    """Automatic staging from shapes alone: long prefill runs yes; many short runs, a block
    table much wider than the sequences, small sliding windows or staged caches over
    STAGE_MAX_BYTES no."""
    def rule(T, S, cols, bs=16, Hq=32, Hkv=8, D=128, causal=True, window=None):
        return paged_mod.stages_kv(None, True, "bf16", bs, cols, T, S, Hq, Hkv, D, causal, window)

    assert rule(8192, 1, 512)  # the benchmark's 8k prefill: 16k pairs a slot
    assert rule(8192, 2, 256) and rule(8192, 1, 512, Hq=8, Hkv=8)  # two 4k runs; MHA at 4096
    assert not rule(8192, 64, 8)  # 64 runs of 128 queries: the copy would cost more than it saves
    assert not rule(8192, 1, 8192)  # a table sized for 128k keys
    assert not rule(8192, 1, 512, window=256)
    assert not rule(0, 0, 0) and rule(4096, 1, 256, causal=False, Hq=8)  # non-causal: twice the keys a query
    assert not rule(131072, 1, 8192, Hkv=32, Hq=128)  # 2 GiB of staged K/V
    assert not rule(4096, 1, 256, Hq=8) and rule(4096, 1, 256, Hq=16)


def test_stage_kv_bad_input():
    """``stage_kv=True`` where staging cannot apply, or not a bool: an error naming it."""
    for fmt, bs, tiles in [("fp8", 16, None), ("bf16", 128, None), ("bf16", 16, "generic")]:
        case = build([40], [40], Hq=4, Hkv=2, D=64, bs=bs, fmt=fmt, seed=5)
        kw = dict(tiles=dataclasses.replace(default_tiles(case), kernel=tiles)) if tiles else {}
        with pytest.raises(ValueError, match="stage_kv"):
            run(case, stage_kv=True, **kw)
    with pytest.raises(TypeError, match="stage_kv"):
        run(case, stage_kv="yes")


def test_attention_tiles_bad_input():
    """``attention_tiles`` (public: benchmarks and callers build tiles with it) names the
    argument it rejects."""
    for args, err, name in [((0, 4, 1, "bf16"), ValueError, "head_dim"), ((128, 0, 1, "bf16"), ValueError, "group"),
                            ((128, 4, -1, "bf16"), ValueError, "max_seqlen_q"),
                            ((128.0, 4, 1, "bf16"), TypeError, "head_dim"),
                            ((128, 4, 1, "fp4"), ValueError, "kv_format"),
                            ((128, 4, 8192, "bf16", 0), ValueError, "block_size"),
                            ((128, 4, 8192, "bf16", "64"), TypeError, "block_size")]:
        with pytest.raises(err, match=name):
            attention_tiles(*args)


def test_fa_tma_layouts():
    """TMA descriptors only where a page holds whole tiles and the cache is a stack of
    [block_size, heads * dim] pages (16-byte aligned); every other layout keeps the pointer
    loads (None)."""
    c = KVCache.allocate(6, 32, 2, 64, "bf16")
    descs = paged_mod.fa_tensor_descriptors(c.k_cache, c.v_cache, 32, 32)
    assert descs is not None and [list(d.block_shape) for d in descs] == [[32, 64], [32, 64]]
    assert list(descs[0].shape) == [6 * 32, 2 * 64] and list(descs[0].strides) == [2 * 64, 1]
    assert paged_mod.fa_tensor_descriptors(c.k_cache, c.v_cache, 16, 32) is None  # a tile spans two pages
    assert paged_mod.fa_tensor_descriptors(c.k_cache, c.v_cache, 0, 32) is None  # runtime block size
    both = torch.zeros(6, 32, 2, 2, 64, dtype=torch.bfloat16)  # K and V interleaved per head: heads not packed
    assert paged_mod.fa_tensor_descriptors(both[:, :, :, 0], both[:, :, :, 1], 32, 32) is None
    wide = torch.zeros(6, 33, 2, 64, dtype=torch.bfloat16)[:, :32]  # pages padded: not one 2-D array of slots
    assert paged_mod.fa_tensor_descriptors(wide, wide, 32, 32) is None


def test_block_table_vector_reads():
    """Whole 2-, 4- or 8-page tiles whose entries are 8- / 16-byte aligned in every row, and a
    row long enough for the read-ahead of a whole tile's entries."""
    bt = torch.zeros(3, 64, dtype=torch.int32)
    assert paged_mod._block_table_vector_reads(bt, 16, 128)  # 8 entries
    assert paged_mod._block_table_vector_reads(bt, 32, 128) and paged_mod._block_table_vector_reads(bt, 64, 128)
    assert not paged_mod._block_table_vector_reads(bt, 128, 128)  # one page a tile: one entry anyway
    assert not paged_mod._block_table_vector_reads(bt, 8, 128)  # 16 entries
    assert not paged_mod._block_table_vector_reads(bt, 0, 128)  # runtime block size
    odd = torch.zeros(3, 65, dtype=torch.int32)  # rows of 65 entries: row 1's tiles are not 16-byte aligned
    assert not paged_mod._block_table_vector_reads(odd, 16, 128)
    assert paged_mod._block_table_vector_reads(torch.zeros(3, 66, dtype=torch.int32), 64, 128)  # 8 bytes suffice
    assert not paged_mod._block_table_vector_reads(torch.zeros(3, 4, dtype=torch.int32), 16, 128)  # 4 < 8 columns
    assert not paged_mod._block_table_vector_reads(torch.zeros(3, 65, dtype=torch.int32)[:, 1:], 16, 128)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_tiles_override(fmt, kernel):
    """Small explicit tiles: many unmasked tiles below the diagonal and several diagonal
    tiles per q tile (chunked prefill, decode), vs the reference; and the same answer as
    the default tiles up to BF16 rounding of p."""
    case = build([15, 17, 300], [5, 17, 33], Hq=4, Hkv=2, D=64, bs=16, fmt=fmt, seed=13)
    small = AttentionTiles(block_q=8, group_pad=2, block_n=16, num_warps=4, num_stages=2, kv_convert=2)
    out = run(case, tiles=small, kernel=kernel)
    assert_close_to_ref(out, reference(case), what=f"{fmt} small tiles")
    with pytest.raises(ValueError, match="tiles"):
        run(case, tiles=AttentionTiles(block_q=4, group_pad=1, block_n=16, num_warps=4, num_stages=2))


def test_convert_mode_selection():
    """fp8 and int8 default to mode 3 (FP16 operands) on the GPU; the interpreter runs modes
    0 and 3 (1/2 are inline PTX: they fall back to 0); bf16 caches never convert."""
    assert kv_convert_mode("fp8") == kv_convert_mode("fp8_dynamic") == paged_mod.FP8_CONVERT_GPU == 3
    assert kv_convert_mode("int8") == kv_convert_mode("int8_dynamic") == paged_mod.INT8_CONVERT_GPU == 3
    assert kv_convert_mode("bf16") == 0
    for mode in (0, 1, 2, 3):
        assert effective_convert_mode(mode, "fp8", False) == mode
        assert effective_convert_mode(mode, "int8_dynamic", True) == (mode if mode in (0, 3) else 0)
        assert effective_convert_mode(mode, "bf16", False) == 0
    with pytest.raises(ValueError, match="kv_convert"):
        effective_convert_mode(4, "fp8", False)


def _with_mode(case, mode, kernel="generic"):
    return dataclasses.replace(default_tiles(case), kv_convert=mode, **KERNEL_TILES[kernel])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", ["fp8", "int8", "fp8_dynamic", "int8_dynamic"])
def test_convert_modes_agree(fmt, kernel):
    """Mode 3 (FP16 operands, per-row power-of-two query rescale, per-tile rescale of
    ``p * v_scale``) and mode 0 (BF16) both match the reference, with queries spanning a
    range FP16 could not hold unscaled (rows of magnitude 1e-6 and 1e6) and, for dynamic
    formats, V scales far below FP16's range."""
    case = build([40, 300, 17], [1, 1, 17], Hq=4, Hkv=2, D=64, bs=16, fmt=fmt, seed=31)
    q = case["q"].float()
    q[:, 0] *= 1e-6
    q[:, 1] *= 1e6
    case["q"] = q.to(torch.bfloat16)
    if case["cache"].v_scale_cache is not None:
        case["cache"].v_scale_cache.mul_(1e-12)
    want = reference(case)
    outs = {m: run(case, tiles=_with_mode(case, m, kernel)) for m in (0, 3)}
    for m, o in outs.items():
        assert_close_to_ref(o, want, what=f"{fmt} cvt={m}")


@pytest.mark.parametrize("fmt", ["fp8", "fp8_dynamic", "int8"])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_nan_codes_read_as_nan(fmt, mode):
    """A NaN E4M3 code (0x7F / 0xFF) in K or V reads as NaN (never as a finite +-480): the
    query rows attending to it (the KV head's whole group of the sequence) come out NaN,
    exactly where the reference has NaN; every other row is finite and matches. int8 has no
    NaN code: its bytes 0x7F / 0xFF are 127 / -1."""
    if mode in (1, 2) and DEV.type != "cuda":
        pytest.skip("modes 1 and 2 are inline PTX (GPU only)")
    case = build([40, 33], [1, 1], Hq=4, Hkv=2, D=64, bs=16, fmt=fmt, seed=32)
    c = case["cache"]
    key, blk = 5, int(case["bt"][0, 0])
    c.k_cache.view(torch.uint8)[blk, key, 1, 3] = 0x7F  # sequence 0, KV head 1 (query heads 2, 3)
    blk1 = int(case["bt"][1, 1])
    c.v_cache.view(torch.uint8)[blk1, 2, 0, 7] = 0xFF  # sequence 1 (key 18), KV head 0 (query heads 0, 1)
    want = reference(case).float().cpu()
    out = run(case, tiles=_with_mode(case, mode)).float().cpu()
    if fmt == "int8":
        assert_close_to_ref(out, want, what="int8 0x7F/0xFF bytes are finite codes")
        return
    nan_rows = torch.zeros(2, 4, dtype=torch.bool)
    nan_rows[0, 2:] = True
    nan_rows[1, :2] = True
    assert torch.equal(want.isnan().any(-1), nan_rows)  # the reference's reading
    assert torch.equal(out.isnan().any(-1), nan_rows), out.isnan().sum(-1)
    assert out[0, 2:].isnan().all() and out[1, :2, 7].isnan().all()  # a NaN key: whole rows; a NaN value: its column
    assert torch.equal(out.isnan(), want.isnan())
    assert_close_to_ref(out[~nan_rows], want[~nan_rows], what=f"{fmt} cvt={mode} finite rows")


# ----------------------------------------------------------------------------- bad inputs
def _valid():
    return build([9, 4], [2, 1], Hq=4, Hkv=2, D=64, bs=8, fmt="fp8", seed=11)


def _call(case, **over):
    c = case["cache"]
    args = dict(q=case["q"], k_cache=c.k_cache, v_cache=c.v_cache, block_table=case["bt"],
                seq_lens=case["seq_lens"], cu_seqlens_q=case["cu"], kv_format="fp8", softmax_scale=0.125,
                k_descale=c.k_scale, v_descale=c.v_scale)
    args.update(over)
    pos = [args.pop(k) for k in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "cu_seqlens_q")]
    return paged_attention(*pos, **args)


BAD = {
    "q_dtype": (TypeError, "q", lambda c: dict(q=c["q"].float())),
    "q_ndim": (ValueError, "q", lambda c: dict(q=c["q"][0])),
    "head_dim": (ValueError, "head_dim", lambda c: dict(q=torch.zeros(3, 4, 96, dtype=torch.bfloat16, device=DEV))),
    "gqa": (ValueError, "num_heads", lambda c: dict(q=torch.zeros(3, 3, 64, dtype=torch.bfloat16, device=DEV))),
    "cache_dtype": (TypeError, "k_cache", lambda c: dict(k_cache=c["cache"].k_cache.view(torch.int8))),
    "format": (ValueError, "kv_format", lambda c: dict(kv_format="fp4")),
    "bt_dtype": (TypeError, "block_table", lambda c: dict(block_table=c["bt"].long())),
    "bt_range": (ValueError, "block_table", lambda c: dict(block_table=c["bt"] + 1000)),
    "seq_lens_shape": (ValueError, "seq_lens", lambda c: dict(seq_lens=c["seq_lens"][:1])),
    "seq_too_long": (ValueError, "seq_lens", lambda c: dict(seq_lens=c["seq_lens"] * 100)),
    "cu_end": (ValueError, "cu_seqlens_q", lambda c: dict(cu_seqlens_q=c["cu"] * 2)),
    "descale_shape": (ValueError, "k_descale", lambda c: dict(k_descale=torch.ones(3, device=DEV))),
    "descale_dtype": (TypeError, "v_descale", lambda c: dict(v_descale=torch.ones(2, dtype=torch.float64, device=DEV))),
    "scale_cache_static": (ValueError, "k_scale_cache", lambda c: dict(k_scale_cache=torch.ones(1, 1, 1, device=DEV))),
    "softmax_scale": (ValueError, "softmax_scale", lambda c: dict(softmax_scale=float("nan"))),
    "window": (ValueError, "sliding_window", lambda c: dict(sliding_window=0)),
    "splits": (ValueError, "num_kv_splits", lambda c: dict(num_kv_splits=paged_mod.MAX_KV_SPLITS + 1)),
    "out": (ValueError, "out", lambda c: dict(out=torch.empty(1, 4, 64, dtype=torch.bfloat16, device=DEV))),
}


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_inputs(name):
    exc, arg, over = BAD[name]
    case = _valid()
    with pytest.raises(exc, match=arg):
        _call(case, **over(case))


def test_dynamic_needs_scale_caches():
    case = build([9], [1], Hq=2, Hkv=1, D=64, bs=8, fmt="fp8_dynamic")
    c = case["cache"]
    with pytest.raises(ValueError, match="k_scale_cache"):
        paged_attention(case["q"], c.k_cache, c.v_cache, case["bt"], case["seq_lens"], case["cu"],
                        kv_format="fp8_dynamic", softmax_scale=0.1)


# ----------------------------------------------------------------------------- benchmark smoke
def _bench_module():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_smoke(tmp_path):
    mod = _bench_module()
    rows = mod.main(["--smoke", "--quick", "--out", str(tmp_path / "res")])
    assert rows and all(r["us"] > 0 for r in rows)
    n_tune = sum(len(mod.decode_variants(4, 2, 64, f, True)) for f in ("fp8", "int8"))
    n_tune += len(mod.prefill_variants(4, 2, 64, 32, 16))
    assert sum(r["section"] == "tune" for r in rows) == n_tune and n_tune >= 8
    assert not any("failed" in r.get("note", "") for r in rows)
    only = mod.main(["--smoke", "--only", "decode", "--out", str(tmp_path / "only")])
    assert {r["section"] for r in only} == {"roofline", "decode"}
    assert all("meets" in r for r in rows if r["section"] == "write")
    assert (tmp_path / "res.json").exists() and (tmp_path / "res.csv").exists()


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D", [64, 128, 256], ids=["d64", "d128", "d256"])
def test_gpu_prefill_and_decode(fmt, D, kernel):
    case = build([1, 17, 300, 1000, 0], [1, 17, 64, 1000, 1], Hq=8, Hkv=2, D=D, bs=16, fmt=fmt, device="cuda",
                 seed=20)
    out = run(case, kernel=kernel)
    assert_close_to_ref(out, reference(case), what=f"gpu {fmt} D={D}")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8_dynamic"])
def test_gpu_long_context_decode(fmt):
    """Long-context decode takes the split-KV path by heuristic; checked against the reference."""
    case = build([16384, 9000, 1], [1, 1, 1], Hq=8, Hkv=1, D=128, bs=32, fmt=fmt, device="cuda", seed=21)
    out = run(case)
    assert_close_to_ref(out, reference(case), what=f"gpu long {fmt}")
    one = run(case, num_kv_splits=1)
    assert_close_to_ref(one, reference(case), what=f"gpu long {fmt} unsplit")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "fp8_dynamic"])
def test_gpu_wave_splits(fmt):
    """Automatic splits of bf16 / fp8 caches come from the compiled split kernel's resident
    programs (its registers and shared memory); the result matches the reference."""
    case = build([16384, 9000, 1], [1, 1, 1], Hq=32, Hkv=8, D=128, bs=16, fmt=fmt, device="cuda", seed=43)
    paged_mod._RESIDENT.clear()
    out = run(case)
    assert_close_to_ref(out, reference(case), what=f"gpu wave splits {fmt}")
    (resident,) = paged_mod._RESIDENT.values()
    assert 1 <= resident <= paged_mod.MAX_CTAS_PER_SM
    if fmt == "fp8":  # one-warp fp8 decode: <= 168 registers -> 12 an SM (65536 / (168 * 32))
        assert resident >= 10, resident


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp8_dynamic"])
def test_gpu_decode_variants(fmt):
    """Every decode variant the benchmark times (``decode_variants``: conversion mode 2,
    forced splits; fp8 only) gives the reference's answer on the GPU, at the benchmark's head
    shape (GQA 32 / 8, head dim 128), ragged lengths, static and dynamic scales."""
    mod = _bench_module()
    case = build([3000, 1000, 17, 4096], [1, 1, 1, 1], Hq=32, Hkv=8, D=128, bs=16, fmt=fmt, device="cuda", seed=41)
    want = reference(case)
    variants = mod.decode_variants(32, 8, 128, "fp8", True) + mod.decode_variants(32, 8, 128, "fp8", False)
    assert variants
    for name, tiles, splits in variants:
        assert_close_to_ref(run(case, tiles=tiles, num_kv_splits=splits), want, what=f"{fmt} {name}")


@pytest.mark.gpu
def test_gpu_prefill_variants():
    """Every prefill variant the benchmark times (``prefill_variants``: kernels, tiles, stages,
    the fa kernel's ``fa_q_smem`` / ``bt_ldg``, fp8 caches and queries, 16- to 256-key
    pages, staged or not) gives the reference's answer on the GPU at the benchmark's head shape (GQA 32 / 8,
    head dim 128), ragged prefill and chunked lengths."""
    mod = _bench_module()
    cases = {}
    for name, fmt, q_fp8, tiles, splits, bs, stage in mod.prefill_variants(32, 8, 128, 2048, 16):
        if (fmt, q_fp8, bs) not in cases:
            case = build([1500, 700, 33], [1500, 300, 33], Hq=32, Hkv=8, D=128, bs=bs, fmt=fmt, device="cuda",
                         seed=42, q_fp8=q_fp8)
            cases[fmt, q_fp8, bs] = case, reference(case)
        case, want = cases[fmt, q_fp8, bs]
        assert_close_to_ref(run(case, tiles=tiles, num_kv_splits=splits, stage_kv=stage), want, what=f"{fmt} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_gpu_convert_modes_agree(fmt, kernel):
    """Every finite E4M3 code (and int8 value) in the cache: the GPU conversion modes
    (0 = Triton's cast, 1/2 = integer ops, 3 = FP16 operands; int8: 0/2/3) give the reference's answer, decode and
    prefill; modes differ at most by accumulation order."""
    case = build([1000, 77], [1, 77], Hq=8, Hkv=2, D=128, bs=16, fmt=fmt, device="cuda", seed=23)
    c = case["cache"]
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in (c.k_cache, c.v_cache):  # uniform codes, NaN codes (0x7F/0xFF) excluded
        codes = torch.randint(0, 254, t.shape, device="cuda", generator=g)
        if fmt == "fp8":
            t.view(torch.uint8).copy_(codes + (codes >= 0x7F).long())
        else:
            t.copy_(codes - 127)
    want = reference(case)
    outs = {}
    for mode in ((0, 1, 2, 3) if fmt == "fp8" else (0, 2, 3)):
        tiles_d = attention_tiles(128, 4, 77, fmt)
        outs[mode] = run(case, tiles=AttentionTiles(**{**tiles_d.__dict__, "kv_convert": mode, **KERNEL_TILES[kernel]}))
        assert_close_to_ref(outs[mode], want, what=f"{fmt} cvt={mode}")
    for mode, o in outs.items():
        assert (o.float() - outs[0].float()).abs().max().item() <= 1e-2 * outs[0].float().abs().max().item()


@pytest.mark.gpu
def test_gpu_stage_kv_default_tiles():
    """Default tiles (N = 128, 8 warps) on a shape the automatic rule stages: the staged
    launch (128-key pages by TMA) gives the unstaged one's answer bit for bit."""
    case = build([4096, 1500], [4096, 1500], Hq=16, Hkv=2, D=128, bs=16, fmt="bf16", device="cuda", seed=31)
    assert paged_mod.stages_kv(None, True, "bf16", 16, case["bt"].shape[1], 5596, 2, 16, 2, 128)
    staged = run(case)
    assert torch.equal(staged, run(case, stage_kv=False))
    assert_close_to_ref(staged, reference(case), what="staged, default tiles")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,bs", [("generic", 16), ("fa", 16), ("fa", 128)])
def test_gpu_bf16_within_2x_sdpa(kernel, bs):
    case = build([2048, 700], [2048, 300], Hq=8, Hkv=2, D=128, bs=bs, fmt="bf16", device="cuda", seed=22)
    want = reference(case).cpu()
    out = run(case, kernel=kernel).float().cpu()
    c = case["cache"]
    err_sdpa = 0.0
    cu = case["cu"].tolist()
    for i, L in enumerate(case["seq_lens"].tolist()):
        qs, qe = cu[i], cu[i + 1]
        k = ref.gather_kv(c.k_cache, case["bt"][i], L).to(torch.bfloat16).repeat_interleave(4, 1)
        v = ref.gather_kv(c.v_cache, case["bt"][i], L).to(torch.bfloat16).repeat_interleave(4, 1)
        mask = ref.attention_mask(qe - qs, L, True, None, "cuda")
        o = F.scaled_dot_product_attention(case["q"][qs:qe].transpose(0, 1), k.transpose(0, 1),
                                           v.transpose(0, 1), attn_mask=mask, scale=128 ** -0.5)
        err_sdpa = max(err_sdpa, (o.transpose(0, 1).float().cpu() - want[qs:qe]).abs().max().item())
    assert (out - want).abs().max().item() <= 2 * err_sdpa + 1e-4


# ----------------------------------------------------------------------------- sm_90 compile check



def test_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects (and never runs the GPU-only
    paths: inline PTX conversions, the hardware E4M3 cast of the writes); compile every
    variant for sm_90 (Hopper) without a GPU (tests/sm90.py)."""
    names = compile_calls(
        """
        import fp4comm.attention.paged as paged, fp4comm.attention.kv_cache as kvc, fp4comm.attention.mla as mla
        force_triton(paged, kvc, mla)
        paged._num_sms = mla._num_sms = lambda d: 132
        from fp4comm.attention import AttentionTiles, KVCache, allocate_mla_cache, write_mla_cache, mla_decode
        kv = torch.zeros(5, 8, 128).bfloat16()
        for fmt in ("bf16", "fp8", "int8", "fp8_dynamic", "int8_dynamic"):  # writes: hardware E4M3 cast on the GPU path
            s = torch.full((8,), 0.1) if fmt in ("fp8", "int8") else None
            KVCache.allocate(64, 16, 8, 128, fmt, k_scale=s, v_scale=s).write(kv, kv, torch.arange(5))
        bt, sl = torch.zeros(2, 64, dtype=torch.int32), torch.full((2,), 1000, dtype=torch.int32)
        # (format, head_dim, max_seqlen_q, q dtype, splits, block_size, tiles override)
        VARIANTS = [
            ("fp8", 128, 1, torch.bfloat16, 4, 16, None),  # decode, CVT 3 (E4M3 -> FP16 in hardware), bt_ldg, 1 warp
            ("fp8", 128, 1, torch.bfloat16, 6, 16, None),  # 6 splits (not a power of two), merged in the kernel
            ("fp8", 128, 8, torch.bfloat16, 4, 16, None),  # decode tiles of 32 rows: 4 warps, N 128, 2 stages
            ("fp8", 128, 1, torch.bfloat16, 4, 16, AttentionTiles(4, 4, 128, 4, 3, 3)),  # decode, block table pipelined
            ("fp8", 128, 1, torch.bfloat16, 8, 16, AttentionTiles(4, 4, 128, 4, 3, 2)),  # decode, integer E4M3, V before layout change
            ("fp8", 128, 1, torch.bfloat16, 8, 16, AttentionTiles(4, 4, 128, 4, 3, 0)),  # decode, Triton's cast
            ("fp8", 128, 1, torch.bfloat16, 8, 16, AttentionTiles(4, 4, 128, 4, 3, 1)),  # decode, integer conversion, hoisted
            ("fp8", 128, 1, torch.bfloat16, 8, 16, AttentionTiles(4, 4, 128, 8, 3, 2)),  # decode, 8 warps
            ("fp8", 128, 1, torch.bfloat16, 8, 16, AttentionTiles(4, 4, 64, 4, 2, 2)),  # decode, N 64, 2 stages
            ("int8", 128, 1, torch.bfloat16, 8, 16, None),  # decode int8, CVT 3 (magic-number FP16)
            ("int8", 128, 1, torch.bfloat16, 8, 16, AttentionTiles(4, 4, 128, 4, 3, 2)),  # decode int8, CVT 2
            ("fp8_dynamic", 128, 1, torch.bfloat16, 8, 16, None),  # decode, CVT 3, per-tile FP16 rescale of p * v_scale
            ("bf16", 128, 1, torch.bfloat16, 8, 16, None),  # decode bf16
            ("fp8", 128, 1, torch.bfloat16, 1, 128, None),  # a page holds whole tiles: one block-table read a tile
            ("bf16", 128, 4096, torch.bfloat16, 1, 16, None),  # prefill, N 64
            ("bf16", 128, 4096, torch.bfloat16, 1, 16, AttentionTiles(32, 4, 128, 8, 3, 0)),  # prefill, N 128
            ("bf16", 64, 4096, torch.bfloat16, 1, 12, None),  # prefill D 64 (N 128), runtime block size
            ("fp8", 128, 4096, torch.float8_e4m3fn, 1, 16, None),  # prefill fp8 cache, fp8 q
            ("int8_dynamic", 256, 1, torch.bfloat16, 2, 16, None),
            ("bf16", 128, 4096, torch.bfloat16, 1, 16, AttentionTiles(32, 4, 64, 8, 3, 0, "fa")),  # prefill kernel
            ("fp8", 128, 4096, torch.float8_e4m3fn, 1, 128, AttentionTiles(32, 4, 128, 8, 2, 3, "fa")),  # page per tile
            ("bf16", 128, 4096, torch.bfloat16, 1, 16, AttentionTiles(32, 4, 128, 8, 3, 0, "fa", fa_q_smem=True)),
            ("bf16", 128, 4096, torch.bfloat16, 1, 16,  # block table outside the pipeliner: K/V two tiles ahead
             AttentionTiles(32, 4, 128, 8, 3, 0, "fa", fa_q_smem=True, bt_ldg=True)),
            ("bf16", 128, 4096, torch.bfloat16, 1, 128, AttentionTiles(32, 4, 128, 8, 3, 0, "fa", bt_ldg=True)),
            ("fp8", 128, 4096, torch.bfloat16, 1, 16, AttentionTiles(32, 4, 64, 8, 3, 3, "fa", bt_ldg=True)),
            ("bf16", 128, 4096, torch.bfloat16, 1, 128, None),  # fa default, pages of whole tiles: K/V by TMA
            ("fp8", 128, 4096, torch.bfloat16, 1, 256, AttentionTiles(32, 4, 128, 8, 3, 3, "fa", bt_ldg=True, fa_tma=True)),
            ("bf16", 128, 4096, torch.bfloat16, 1, 64, None),  # pages of 64: N = 64, TMA
            ("bf16", 128, 4096, torch.bfloat16, 1, 64,  # 2 pages a tile: block-table entries as one 8-byte vector
             AttentionTiles(32, 4, 128, 8, 3, 0, "fa", fa_q_smem=True, bt_ldg=True)),
        ]
        for fmt, D, mq, qdt, sp, bs, tiles in VARIANTS:
            s = torch.full((8,), 0.1) if fmt in ("fp8", "int8") else None
            c = KVCache.allocate(64 * 16 // bs + 1, bs, 8, D, fmt, k_scale=s, v_scale=s)
            c.attend(torch.zeros(2 * mq, 32, D).to(qdt), bt, sl, torch.arange(3, dtype=torch.int32) * mq, softmax_scale=0.1,
                     max_seqlen_q=mq, check_indices=False, num_kv_splits=sp, tiles=tiles, stage_kv=False,
                     q_descale=torch.tensor(1.0) if qdt != torch.bfloat16 else None)  # staged = the bs 128 TMA build
        cache = allocate_mla_cache(64, 16, "fp8")
        write_mla_cache(torch.zeros(5, 512).bfloat16(), torch.zeros(5, 64).bfloat16(), cache, torch.arange(5))
        mla_decode(torch.zeros(2, 128, 512).bfloat16(), torch.zeros(2, 128, 64).bfloat16(), cache, bt, sl, 0.1, "fp8",
                   num_kv_splits=2, check_indices=False)
        for name, sig, consts, ptx in KERNELS:
            if name == "paged_attention_kernel" and consts.get("CVT") == 2:  # no byte reads of V, no F2F to BF16
                assert "ld.shared.b8" not in ptx, ("CVT 2: V read a byte at a time", consts)
                assert sig["q_ptr"] != "*bf16" or "cvt.bf16.f16" not in ptx, ("CVT 2: F2F conversions", consts)
            if name == "paged_attention_kernel" and consts.get("CVT") == 3:  # FP16 operands, no byte reads
                assert "ld.shared.b8" not in ptx and "ld.shared.u8" not in ptx, ("CVT 3: byte reads", consts)
                assert sig["q_ptr"] != "*bf16" or "cvt.bf16.f16" not in ptx, ("CVT 3: F2F to BF16", consts)
                assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx or "wgmma" in ptx, consts
                if sig["kc_ptr"] == "*fp8e4nv":  # hardware E4M3 -> FP16 (NaN kept), nothing else converts
                    assert "cvt.rn.f16x2.e4m3x2" in ptx, ("CVT 3: no hardware E4M3 conversion", consts)
                else:  # int8: magic numbers, no F2F on the cache tiles
                    assert ptx.count("sub.rn.f16x2") >= 64 and "cvt.rn.f32.s8" not in ptx, ("CVT 3 int8", consts)
            if name == "paged_attention_kernel" and consts.get("CVT") in (2, 3):  # 16-byte global reads
                assert "cp.async.cg.shared.global" in ptx and ", 0x10" in ptx, ("no 16-byte cache reads", consts)
            if name == "paged_prefill_kernel" and consts.get("Q_SMEM"):  # Q's A operand straight from shared:
                assert ptx.count("ldmatrix") <= 8, consts  # the output's 8 only (else + 8 a key loop: Q reloaded)
            if name == "paged_prefill_kernel" and consts.get("BT_LDG") and not consts.get("TMA"):  # K/V two tiles ahead
                assert "ld.global.nc" in ptx and "cp.async.wait_group \t2;" in ptx, consts
            if name == "paged_prefill_kernel":  # TMA: bulk tensor copies and no cp.async; vector block-table reads
                assert ("cp.async.bulk.tensor.2d" in ptx) == bool(consts.get("TMA")), consts
                assert ("cp.async.cg" not in ptx) == bool(consts.get("TMA")), consts
                assert ("ld.global.nc.v" in ptx) == bool(consts.get("BT_VEC")), consts
            if name == "paged_attention_kernel" and consts.get("FUSE_COMBINE"):  # last split program merges
                assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx, consts
            if name == "paged_attention_kernel":  # decode: block-table reads outside the pipeliner or not
                assert ("ld.global.nc.b32" in ptx) == bool(consts.get("BT_LDG")), consts
            if name.startswith("write_") and (consts.get("FMT") == 1 or consts.get("IS_FP8")):
                assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, ("no hardware E4M3 cast", consts)
        """
    )
    # 38 distinct variants (some default tile choices equal an explicit one)
    assert len(names) == 38, names
    assert {"write_kv_cache_kernel", "paged_attention_kernel", "paged_prefill_kernel"} <= set(names), names
