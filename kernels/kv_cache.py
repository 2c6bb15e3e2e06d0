"""Device code of the KV-cache writes (bf16 / fp8 / int8, static or dynamic scales) and of
the MLA latent cache write. Host side: :mod:`fp4comm.attention`.

Format codes (``FMT`` constexpr): 0 = bf16, 1 = fp8 (E4M3), 2 = int8.
Scales are decode direction (``x ~= q * scale``); quantization multiplies by the IEEE
reciprocal of the scale (``div_rn``, once a head or row) so results match the plain-torch
reference bit for bit on GPUs too.
"""

import triton
import triton.language as tl

from .common import reciprocal_rn

FMT_BF16 = tl.constexpr(0)
FMT_FP8 = tl.constexpr(1)
FMT_INT8 = tl.constexpr(2)
#: smallest normal FP32 (2^-126): the least scale a quantized cache uses (finite reciprocal)
MIN_SCALE = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def e4m3_round(v):
    """FP32 ``v`` (finite, ``|v| <= 448``) rounded to the nearest E4M3 value, ties to even,
    returned as FP32 (exactly representable, so the later cast to fp8 does not round).

    Done with bit arithmetic rather than relying on the cast: Triton's interpreter rounds
    subnormal ties differently from the GPU, and this way both match torch.
    """
    bits = v.to(tl.uint32, bitcast=True)
    # normals (|v| >= 2^-6): keep 3 mantissa bits, round to nearest even on bit 20
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & 0xFFF00000).to(tl.float32, bitcast=True)
    # subnormals: multiples of 2^-9; 1.5 * 2^23 forces the FP32 add to round to an integer (RNE)
    sub = ((v * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    sub = (sub.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)  # keep -0
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def bf16_rne(x):
    """FP32 -> BF16, round to nearest even (NaN and Inf kept), by bit arithmetic.

    The GPU cast already rounds to nearest even; Triton's interpreter truncates, so kernels
    whose output must match torch bit for bit round explicitly before casting.
    """
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    r = tl.where(x != x, 0x7FC00000, r)  # canonical quiet NaN, as torch
    return r.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def quantize_tile(x, scale, FMT: tl.constexpr, INTERPRET: tl.constexpr):
    """Quantize an FP32 tile ``[R, C]`` to fp8 (``FMT`` 1) or int8 (2) with the
    decode-direction ``scale`` of each row (FP32 ``[R]``): ``v = RN(x * inv)`` with ``inv =
    RN(1 / scale)``, one IEEE division a row (:func:`~fp4comm.kernels.common.reciprocal_rn`).

    fp8: ``sat(v)`` to +-448, RNE, NaN -> NaN (byte 0x7F); int8: clamp to +-127 then round
    half to even, NaN -> 0 (on the GPU one ``cvt.rni.sat.s8.f32`` and an integer max; under
    the interpreter a clamp and magic-number rounding). (bf16 caches: :func:`bf16_rne`.)

    The E4M3 rounding: on the GPU the cast itself (sm_90 emits
    ``cvt.rn.satfinite.e4m3x2.f32``: RNE, saturating to +-448 (Inf included), subnormals
    and the sign of zero kept, every NaN -> 0x7F whatever its sign or payload (checked on
    H200), 1 F2F per pair): no clamp, no select; under the interpreter, whose cast rounds
    subnormal ties differently, does not saturate and keeps a NaN's sign, a clamp,
    :func:`e4m3_round` (about 15 integer ops) and the NaN byte by a select.

    The multiply replaced an IEEE division a value (``div.rn.f32``: a range check and a
    branch around a slow path each): the writes were instruction-bound (figures in
    ``fp4comm.attention.kv_cache.write_tiles``).
    """
    v = x * reciprocal_rn(scale)[:, None]
    if FMT == 1:
        if INTERPRET:
            c = tl.minimum(tl.maximum(v, -448.0), 448.0)
            b = e4m3_round(tl.where(v != v, 0.0, c)).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
            return tl.where(v != v, 0x7F, b).to(tl.float8e4nv, bitcast=True)
        else:
            return v.to(tl.float8e4nv)
    else:
        if INTERPRET:
            c = tl.minimum(tl.maximum(v, -127.0), 127.0)
            c = tl.where(v != v, 0.0, c)
            r = (c + 12582912.0) - 12582912.0  # |c| <= 127: exact round half to even
            return r.to(tl.int8)
        else:  # one F2I: round half to even, saturate to [-128, 127], NaN -> 0; then -128 -> -127
            r = tl.inline_asm_elementwise("cvt.rni.sat.s8.f32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True,
                                          pack=1)
            return tl.maximum(r, -127).to(tl.int8)


@triton.jit
def dynamic_scale_rows(x, QMAX: tl.constexpr):
    """Per-row decode scale of an FP32 tile ``[R, C]``: ``amax(finite |x|) / QMAX``; a scale
    below the smallest normal FP32 (``2^-126``: zero, or an ``amax`` under ``QMAX * 2^-126``)
    becomes 1.

    The max of ``|x|`` is taken as is first (one ``FMNMX`` a value, ``|.|`` folded in; on
    the GPU it skips NaN); only a tile where that max is not finite (an Inf, or a NaN under
    the interpreter, whose max propagates it) takes it again over the finite values
    (two more ops a value)."""
    a = tl.abs(x)
    amax = tl.max(a, axis=1)
    if not (tl.max(amax, axis=0) < float("inf")):
        amax = tl.max(tl.where(a < float("inf"), a, 0.0), axis=1)  # drops Inf and NaN
    s = tl.math.div_rn(amax, QMAX)
    return tl.where(s < MIN_SCALE, 1.0, s)


@triton.jit
def _write_one(
    x_ptr, stride_xt, stride_xh, t,
    cache_ptr, stride_cb, stride_cs, stride_ch, blk, off,
    scale_ptr, stride_scale,
    sc_ptr, stride_sb, stride_ss, stride_sh,
    offs_h, offs_d, hmask, mask,
    FMT: tl.constexpr, DYNAMIC: tl.constexpr, INTERPRET: tl.constexpr,
):
    x = tl.load(x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if FMT == 0:
        q = bf16_rne(x)
    elif DYNAMIC:
        if FMT == 1:
            s = dynamic_scale_rows(x, 448.0)
        else:
            s = dynamic_scale_rows(x, 127.0)
        q = quantize_tile(x, s, FMT, INTERPRET)
        tl.store(sc_ptr + blk * stride_sb + off * stride_ss + offs_h * stride_sh, s, mask=hmask)
    else:
        s = tl.load(scale_ptr + offs_h * stride_scale, mask=hmask, other=1.0)
        q = quantize_tile(x, s, FMT, INTERPRET)
    dst = cache_ptr + blk * stride_cb + off * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(dst, q, mask=mask)


@triton.jit
def write_kv_cache_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    k_scale_ptr, v_scale_ptr, ksc_ptr, vsc_ptr,
    num_heads, head_dim, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_k_scale, stride_v_scale,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    FMT: tl.constexpr, DYNAMIC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Grid ``(T, cdiv(num_heads, BLOCK_H))``: token ``t``, heads ``[h0, h0 + BLOCK_H)``."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        hmask = offs_h < num_heads
        mask = hmask[:, None] & (offs_d[None, :] < head_dim)
        _write_one(k_ptr, stride_kt, stride_kh, t, kc_ptr, stride_kcb, stride_kcs, stride_kch, blk, off,
                   k_scale_ptr, stride_k_scale, ksc_ptr, stride_ksb, stride_kss, stride_ksh,
                   offs_h, offs_d, hmask, mask, FMT, DYNAMIC, INTERPRET)
        _write_one(v_ptr, stride_vt, stride_vh, t, vc_ptr, stride_vcb, stride_vcs, stride_vch, blk, off,
                   v_scale_ptr, stride_v_scale, vsc_ptr, stride_vsb, stride_vss, stride_vsh,
                   offs_h, offs_d, hmask, mask, FMT, DYNAMIC, INTERPRET)


@triton.jit
def write_mla_cache_kernel(
    lat_ptr, rope_ptr, slot_ptr,
    c8_ptr, c32_ptr, c16_ptr,
    block_size,
    stride_lt, stride_rt,
    stride_c8b, stride_c8s, stride_c32b, stride_c32s, stride_c16b, stride_c16s,
    IS_FP8: tl.constexpr, LATENT: tl.constexpr, ROPE: tl.constexpr, GROUP: tl.constexpr,
    SCALE_OFF32: tl.constexpr, ROPE_OFF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Grid ``(T,)``. The cache storage is passed three times, viewed as fp8 (``c8``),
    FP32 (``c32``) and BF16 (``c16``), each with its own element strides; ``SCALE_OFF32``
    and ``ROPE_OFF16`` are the scale / rope offsets in FP32 / BF16 elements of a slot."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        NG: tl.constexpr = LATENT // GROUP
        offs_g = tl.arange(0, NG)
        offs_c = tl.arange(0, GROUP)
        x = tl.load(lat_ptr + t * stride_lt + offs_g[:, None] * GROUP + offs_c[None, :]).to(tl.float32)
        r = bf16_rne(tl.load(rope_ptr + t * stride_rt + tl.arange(0, ROPE)).to(tl.float32))
        tl.store(c16_ptr + blk * stride_c16b + off * stride_c16s + ROPE_OFF16 + tl.arange(0, ROPE), r)
        if IS_FP8:
            s = dynamic_scale_rows(x, 448.0)
            q = quantize_tile(x, s, 1, INTERPRET)
            tl.store(c8_ptr + blk * stride_c8b + off * stride_c8s + offs_g[:, None] * GROUP + offs_c[None, :], q)
            tl.store(c32_ptr + blk * stride_c32b + off * stride_c32s + SCALE_OFF32 + offs_g, s)
        else:
            tl.store(c16_ptr + blk * stride_c16b + off * stride_c16s + offs_g[:, None] * GROUP + offs_c[None, :],
                     bf16_rne(x))
