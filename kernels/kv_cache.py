"""Device code of the KV-cache writes (bf16 / fp8 / int8, static or dynamic scales) and of
the MLA latent cache write. Host side: :mod:`fp4comm.attention`.

Format codes (``FMT`` constexpr): 0 = bf16, 1 = fp8 (E4M3), 2 = int8.
Scales are decode direction (``x ~= q * scale``); quantization divides with ``div_rn``
(IEEE) so results match the plain-torch reference bit for bit on GPUs too.
"""

import triton
import triton.language as tl

FMT_BF16 = tl.constexpr(0)
FMT_FP8 = tl.constexpr(1)
FMT_INT8 = tl.constexpr(2)


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
def div_exact(x, s, y):
    """``x / s`` rounded to nearest even (as ``div_rn``), given ``y = RN(1 / s)`` and
    ``2^-60 <= s <= 2^60``, in 1 multiply + 4 FMAs instead of a full IEEE division per value
    (reciprocal approximation, Newton steps and a slow-path branch in SASS).

    ``q0 = RN(x * y)`` is within 1.5 ulp of ``x / s``; one residual correction
    (``e = x - q0 * s``, exact in an FMA; ``q1 = RN(q0 + e * y)``) makes it faithful, and a
    second one, by Markstein's theorem (``y`` the correctly rounded reciprocal, ``q1``
    faithful, no underflow or overflow), is the correctly rounded quotient. The scale range
    keeps the residuals normal wherever the quotient matters (``|x / s| >= 2^-12``: smaller
    quotients are +-0 in E4M3 and 0 in int8 whatever their last bits). ``q0`` itself is
    returned where it is +-0 or tiny (``< 1e-30``, sign kept: the corrections would make
    ``-0`` into ``+0``), huge (``> 1e30``, saturates either way; Inf stays Inf, the
    corrections would make it NaN) or NaN.

    Only for compiled code: the interpreter's ``fma`` rounds twice. The numpy mirror in
    tests/test_kv_cache.py checks the algorithm against IEEE division with exact FMAs."""
    q0 = x * y
    q1 = tl.fma(tl.fma(-q0, s, x), y, q0)
    q2 = tl.fma(tl.fma(-q1, s, x), y, q1)
    a = tl.abs(q0)
    return tl.where((a >= 1e-30) & (a <= 1e30), q2, q0)


@triton.jit
def quantize_tile(x, scale, FMT: tl.constexpr, INTERPRET: tl.constexpr):
    """Quantize an FP32 tile with a decode-direction ``scale`` (broadcastable FP32).

    fp8: ``sat(x / scale)`` to +-448, RNE, NaN -> NaN (byte 0x7F); int8: clamp to +-127 then
    round half to even, NaN -> 0; bf16: RNE cast (``scale`` unused).
    """
    if FMT == 0:
        return bf16_rne(x)
    else:
        return quantize_quotient(tl.math.div_rn(x, scale), FMT, INTERPRET)


@triton.jit
def quantize_quotient(v, FMT: tl.constexpr, INTERPRET: tl.constexpr):
    """fp8 / int8 codes of the FP32 quotients ``v = x / scale`` (see :func:`quantize_tile`).

    The E4M3 rounding: on the GPU the cast of the clamped value (sm_90 emits
    ``cvt.rn.satfinite.e4m3x2.f32``: RNE, subnormals and the sign of zero kept, 1 F2F per
    pair; bit-exact vs torch on H200); under the interpreter (``INTERPRET``), whose cast
    rounds subnormal ties differently, :func:`e4m3_round` first (about 15 integer ops).
    """
    if FMT == 1:
        c = tl.minimum(tl.maximum(v, -448.0), 448.0)
        c = tl.where(v != v, 0.0, c)
        if INTERPRET:
            c = e4m3_round(c)
        b = c.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        b = tl.where(v != v, 0x7F, b)
        return b.to(tl.float8e4nv, bitcast=True)
    else:
        c = tl.minimum(tl.maximum(v, -127.0), 127.0)
        c = tl.where(v != v, 0.0, c)
        r = (c + 12582912.0) - 12582912.0  # |c| <= 127: exact round half to even
        return r.to(tl.int8)


@triton.jit
def dynamic_scale_rows(x, QMAX: tl.constexpr):
    """Per-row decode scale of an FP32 tile ``[R, C]``: ``amax(finite |x|) / QMAX``, 0 -> 1."""
    a = tl.abs(x)
    a = tl.where(a < float("inf"), a, 0.0)  # drops Inf and NaN
    s = tl.math.div_rn(tl.max(a, axis=1), QMAX)
    return tl.where(s == 0.0, 1.0, s)


@triton.jit
def _quantize_rows(x, s, FMT: tl.constexpr, DYNAMIC: tl.constexpr, FAST_DIV: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """Quantize FP32 rows ``x [R, BLOCK_D]`` (one (token, head) a row) with the per-row static
    scales ``s`` (dynamic formats: computed here; bf16: unused); returns the codes and the
    per-row decode scales.

    ``FAST_DIV`` (compiled code only): divide with :func:`div_exact` (one reciprocal a row)
    when every row's scale is in its range (a branch uniform over the program), else with
    ``div_rn``."""
    if FMT == 0:
        return quantize_tile(x, 1.0, FMT, INTERPRET), s
    else:
        if DYNAMIC:
            if FMT == 1:
                s = dynamic_scale_rows(x, 448.0)
            else:
                s = dynamic_scale_rows(x, 127.0)
        if INTERPRET or not FAST_DIV:
            q = quantize_tile(x, s[:, None], FMT, INTERPRET)
        else:
            in_range = ((s >= 8.673617379884035e-19) & (s <= 1.152921504606847e18)).to(tl.int32)  # 2^-60, 2^60
            if tl.min(in_range, 0) == 1:
                y = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
                q = quantize_quotient(div_exact(x, s[:, None], y[:, None]), FMT, INTERPRET)
            else:
                q = quantize_tile(x, s[:, None], FMT, INTERPRET)
        return q, s


@triton.jit
def write_kv_cache_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    k_scale_ptr, v_scale_ptr, ksc_ptr, vsc_ptr,
    num_tokens, num_heads, head_dim, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_k_scale, stride_v_scale,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    FMT: tl.constexpr, DYNAMIC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, FAST_DIV: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T), cdiv(num_heads, BLOCK_H))``: tokens ``[t0, t0 + BLOCK_T)``,
    heads ``[h0, h0 + BLOCK_H)``, as one tile of ``BLOCK_T * BLOCK_H`` rows (row ``r``: token
    ``t0 + r // BLOCK_H``, head ``h0 + r % BLOCK_H``) by ``BLOCK_D``.

    Everything is read up front, without a branch: the slots, then K and V, so the slot
    indirection and both tensors' reads are in flight together (the write is latency bound
    otherwise: one read, one dependent read, one store, then again for V). Skipped tokens
    (negative slots) and the tail are masked out of the stores only.
    """
    R: tl.constexpr = BLOCK_T * BLOCK_H
    rows = tl.arange(0, R)
    tok = tl.program_id(0) * BLOCK_T + rows // BLOCK_H
    heads = tl.program_id(1) * BLOCK_H + rows % BLOCK_H
    offs_d = tl.arange(0, BLOCK_D)
    tmask = tok < num_tokens
    hmask = heads < num_heads
    rmask = tmask & hmask
    if EVEN_D:
        mask = rmask[:, None]
    else:
        mask = rmask[:, None] & (offs_d[None, :] < head_dim)
    slot = tl.load(slot_ptr + tok, mask=tmask, other=-1).to(tl.int64)
    t64 = tok.to(tl.int64)
    xk = tl.load(k_ptr + t64[:, None] * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask,
                 other=0.0)
    xv = tl.load(v_ptr + t64[:, None] * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask,
                 other=0.0)
    if FMT != 0 and not DYNAMIC:  # static scales: read with the rest, not after K's stores
        sk = tl.load(k_scale_ptr + heads * stride_k_scale, mask=hmask, other=1.0)
        sv = tl.load(v_scale_ptr + heads * stride_v_scale, mask=hmask, other=1.0)
    else:
        sk = tl.full([R], 1.0, tl.float32)
        sv = sk
    wmask = rmask & (slot >= 0)
    smask = mask & (slot >= 0)[:, None]
    blk = tl.where(slot >= 0, slot, 0) // block_size
    off = tl.where(slot >= 0, slot, 0) % block_size
    if FMT == 0 and k_ptr.dtype.element_ty == tl.bfloat16:  # bf16 -> bf16: a copy (NaN payloads too, as torch)
        qk = xk
    else:
        qk, sk = _quantize_rows(xk.to(tl.float32), sk, FMT, DYNAMIC, FAST_DIV, INTERPRET)
    tl.store(kc_ptr + (blk * stride_kcb + off * stride_kcs + heads * stride_kch)[:, None] + offs_d[None, :], qk,
             mask=smask)
    if FMT == 0 and v_ptr.dtype.element_ty == tl.bfloat16:
        qv = xv
    else:
        qv, sv = _quantize_rows(xv.to(tl.float32), sv, FMT, DYNAMIC, FAST_DIV, INTERPRET)
    tl.store(vc_ptr + (blk * stride_vcb + off * stride_vcs + heads * stride_vch)[:, None] + offs_d[None, :], qv,
             mask=smask)
    if DYNAMIC:
        tl.store(ksc_ptr + blk * stride_ksb + off * stride_kss + heads * stride_ksh, sk, mask=wmask)
        tl.store(vsc_ptr + blk * stride_vsb + off * stride_vss + heads * stride_vsh, sv, mask=wmask)


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
            q = quantize_tile(x, s[:, None], 1, INTERPRET)
            tl.store(c8_ptr + blk * stride_c8b + off * stride_c8s + offs_g[:, None] * GROUP + offs_c[None, :], q)
            tl.store(c32_ptr + blk * stride_c32b + off * stride_c32s + SCALE_OFF32 + offs_g, s)
        else:
            tl.store(c16_ptr + blk * stride_c16b + off * stride_c16s + offs_g[:, None] * GROUP + offs_c[None, :],
                     bf16_rne(x))
