"""Device helpers shared by every kernel: E4M3 / E2M1 encode and decode, NVFP4 block
quantization of a register tile, and the 128x4 swizzled scale offset.

Everything is integer/bit arithmetic plus IEEE FP32 ops, so results are bit-identical on
a GPU and under ``TRITON_INTERPRET=1`` (no reliance on the backend's FP8 conversion).
Host code and references live in ``fp4comm``; this module imports only Triton.
"""

import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)
# smallest normal E4M3 (2^-6); below it E4M3 is subnormal with quantum 2^-9
E4M3_MIN_NORMAL = tl.constexpr(0.015625)
# adding then subtracting 2^14 rounds an FP32 in [0, 2^-6) to a multiple of 2^-9 (RNE)
E4M3_SUBNORMAL_MAGIC = tl.constexpr(16384.0)
E4M3_NAN_BYTE = tl.constexpr(0x7F)
E4M3_MAX_BYTE = tl.constexpr(0x7E)
FP32_MAX = tl.constexpr(3.4028234663852886e38)
GS_NUMERATOR = tl.constexpr(2688.0)  # 448 * 6


@triton.jit
def e4m3_encode(x):
    """FP32 -> (E4M3 value as FP32, E4M3 byte as int32). RNE, satfinite (|x| >= 448 and Inf
    -> +-448), NaN -> byte 0x7F, sign kept (also for values that round to zero)."""
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    # normal range: round the 23-bit mantissa to 3 bits, ties to even
    rbits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000
    vn = rbits.to(tl.float32, bitcast=True)
    bn = (((rbits >> 23) - 120) << 3) | ((rbits >> 20) & 7)
    # subnormal range: multiples of 2^-9
    vs = (a + E4M3_SUBNORMAL_MAGIC) - E4M3_SUBNORMAL_MAGIC
    bs = (vs * 512.0).to(tl.int32)
    is_normal = a >= E4M3_MIN_NORMAL
    v = tl.where(is_normal, vn, vs)
    b = tl.where(is_normal, bn, bs)
    sat = a >= E4M3_MAX
    v = tl.where(sat, E4M3_MAX, v)
    b = tl.where(sat, E4M3_MAX_BYTE, b)
    neg = (x.to(tl.int32, bitcast=True) >> 31) != 0
    v = tl.where(neg, -v, v)
    b = tl.where(neg, b | 0x80, b)
    nan = x != x
    v = tl.where(nan, x, v)
    b = tl.where(nan, E4M3_NAN_BYTE, b)
    return v, b


@triton.jit
def flip_sign(v, sign31):
    """FP32 ``v`` with its sign bit XOR-ed with bit 31 of the int32 ``sign31``: how the
    decoders apply a code's sign, so that a negative-zero code decodes to -0 (Triton's float
    negation is ``0 - x``, which turns -0 into +0)."""
    return (v.to(tl.int32, bitcast=True) ^ sign31).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_decode(b):
    """E4M3 byte (int32, 0..255) -> FP32 (0x7F / 0xFF -> NaN)."""
    e = (b >> 3) & 15
    m = b & 7
    vn = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    vs = m.to(tl.float32) * 0.001953125
    v = tl.where(e == 0, vs, vn)
    v = tl.where((b & 0x7F) == 0x7F, float("nan"), v)
    return flip_sign(v, (b & 0x80) << 24)


# e2m1_rne_bits: the magic addend for |v| in [2^e, 2^(e+1)) (e = 0, 1, 2 after clamping) is
# 2^(22+e) + 2e ulps; its bits are ``E * E2M1_MAGIC_MUL + E2M1_MAGIC_ADD`` for the biased
# exponent E = 127 + e.
E2M1_MAGIC_MUL = tl.constexpr(0x800002)  # 2^23 + 2
E2M1_MAGIC_ADD = tl.constexpr(184549122)  # 22 * 2^23 - 254


@triton.jit
def e2m1_rne_bits(v):
    """FP32 -> int32 whose low 3 bits are the E2M1 magnitude code of ``|v|`` (RNE, ties to the
    even code, satfinite), bits 3..22 zero and bits 23..30 an exponent (149..151).

    One FP32 add does the rounding: ``t = min(|v|, 6)`` plus a magic number whose ulp is
    the E2M1 quantum of ``t``'s binade (0.5 below 2, then 1, then 2), i.e. ``2^(22+e)`` for
    ``e = clamp(floor(log2 t), 0, 2)``. The sum's mantissa counts quanta, so rounding to
    nearest even on it is RNE onto the E2M1 grid; the magic number's mantissa is preloaded
    with the even offset ``2e`` (the codes of 1, 2 and 4 are 2, 4 and 6), so the sum's low
    bits are the code itself. Clamping at 6 saturates (everything above 6 rounds to 6).
    NaN gives a garbage word (callers mask non-finite blocks)."""
    t = tl.minimum(tl.abs(v), 6.0)
    e = tl.maximum(t, 1.0).to(tl.int32, bitcast=True) >> 23
    magic = (e * E2M1_MAGIC_MUL + E2M1_MAGIC_ADD).to(tl.float32, bitcast=True)
    return (t + magic).to(tl.int32, bitcast=True)


@triton.jit
def e2m1_encode(v):
    """FP32 -> E2M1 code (int32, 0..15): RNE (ties to the even code), satfinite, sign bit
    kept for negatives that round to zero. NaN -> some code (callers zero non-finite blocks).

    By FP32 bit arithmetic (:func:`e2m1_rne_bits`) rather than comparisons; Hopper has no
    E2M1 conversion instruction."""
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return (e2m1_rne_bits(v) & 7) | (sign << 3)


@triton.jit
def e2m1_decode(c):
    """E2M1 code (int32, 0..15) -> FP32 in {0, 0.5, 1, 1.5, 2, 3, 4, 6} with sign."""
    e = (c >> 1) & 3
    m = (c & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (2.0 + m) * tl.where(e == 1, 0.5, tl.where(e == 2, 1.0, 2.0)))
    return flip_sign(mag, (c & 8) << 28)


@triton.jit
def nvfp4_gs_from_amax(amax):
    """Encode scale from a row's finite amax (elementwise): ``gs = 2688 / amax`` clamped to
    FP32_MAX; an all-zero row gets 1."""
    gs = tl.minimum(tl.math.div_rn(tl.zeros_like(amax) + GS_NUMERATOR, tl.where(amax > 0, amax, 1.0)), FP32_MAX)
    return tl.where(amax > 0, gs, 1.0)


@triton.jit
def nvfp4_global_scale(vmax):
    """Per-token encode scale of one row from its per-block finite maxima ``vmax`` [NB]."""
    return nvfp4_gs_from_amax(tl.max(vmax, axis=0))


@triton.jit
def nvfp4_block_stats(xf):
    """For an FP32 tile [NB, 16]: (finite |x| max per block [NB], non-finite flag per block [NB])."""
    finite = tl.abs(xf) < float("inf")  # False for NaN and +-Inf
    vmax = tl.max(tl.where(finite, tl.abs(xf), 0.0), axis=1)
    bad = tl.max((~finite).to(tl.int32), axis=1) != 0
    return vmax, bad


@triton.jit
def nvfp4_quantize_tile(xf, vmax, bad, gs):
    """Quantize an FP32 tile [NB, 16] whose blocks have finite maxima ``vmax`` and non-finite
    flags ``bad`` with encode scale ``gs`` (a scalar, or [NB] one per block's row). Returns (packed bytes [NB, 8] uint8,
    scale bytes [NB] uint8). Follows DESIGN.md section 3 step by step:
    ``sf = e4m3(gs * vmax / 6)``, ``inv = gs / sf`` (0 if sf == 0), ``q = e2m1(x * inv)``."""
    sfv, sfb = e4m3_encode(tl.math.div_rn(gs * vmax, tl.zeros_like(vmax) + 6.0))
    inv = tl.where(sfv != 0.0, tl.minimum(tl.math.div_rn(gs + tl.zeros_like(sfv), sfv), FP32_MAX), 0.0)
    codes = e2m1_encode(xf * inv[:, None])
    codes = tl.where(bad[:, None], 0, codes)
    sfb = tl.where(bad, E4M3_NAN_BYTE, sfb)
    nb: tl.constexpr = xf.shape[0]
    lo, hi = tl.split(tl.reshape(codes, (nb, 8, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    return packed, sfb.to(tl.uint8)


@triton.jit
def nvfp4_dequantize_tile(packed, sfb, gs):
    """Packed bytes [NB, 8] (uint8), scale bytes [NB] (int32), encode scale ``gs`` (scalar or
    [NB]) -> FP32 [NB, 16]
    with ``x = e2m1(q) * float(sf) / gs``."""
    p = packed.to(tl.int32)
    nb: tl.constexpr = p.shape[0]
    codes = tl.reshape(tl.join(p & 15, p >> 4), (nb, 16))
    sf = e4m3_decode(sfb)
    return _nvfp4_divide(codes, sf, gs + tl.zeros_like(sf))


@triton.jit
def _nvfp4_divide(codes, sf, gsv):
    """The NVFP4 decode by definition: ``e2m1(q) * sf / gs`` per element, one division each
    (codes [NB, 16], decoded scales [NB], ``gs`` broadcast to [NB])."""
    return tl.math.div_rn(e2m1_decode(codes) * sf[:, None], gsv[:, None])


@triton.jit
def nvfp4_dequantize_codes(codes, sfb, gs):
    """E2M1 codes [NB, 16] (int32 0..15), scale bytes [NB] (int32), scalar encode scale ``gs``
    -> FP32 [NB, 16], the bits of ``e2m1(q) * float(sf) / gs`` (:func:`nvfp4_dequantize_tile`)
    with two divisions a block instead of one an element.

    ``m * sf`` is exact for every E2M1 magnitude ``m`` (2 + 4 significant bits), so an element
    is ``RN(m * sf / gs)``; ``m`` is ``2^k`` or ``1.5 * 2^k`` (k in -1..2), and rounding
    commutes with a power-of-two scale while both quotients are normal. So with ``a =
    RN(sf / gs)`` and ``b = RN(1.5 * sf / gs)`` per block, an element is ``a`` or ``b`` times
    ``2^k`` exactly, whenever every nonzero ``a`` lies in ``[2^-120, 2^120]`` and ``b`` below
    ``2^120``, no scale is NaN and ``gs`` is a positive finite number; otherwise (tiny,
    huge or special values anywhere in the tile) every element is divided."""
    sf = e4m3_decode(sfb)
    gsv = gs + tl.zeros_like(sf)
    a = tl.math.div_rn(sf, gsv)
    b = tl.math.div_rn(sf * 1.5, gsv)
    aa = tl.abs(a)
    normal = (aa >= 7.52316384526264e-37) & (aa <= 1.329227995784916e36) & (tl.abs(b) <= 1.329227995784916e36)
    ok = (aa == 0) | normal  # 2^-120 .. 2^120
    ok = ok & ((sfb & 0x7F) != 0x7F) & (gsv > 0) & (gsv < float("inf"))
    e = (codes >> 1) & 3
    odd = (codes & 1) != 0
    if tl.min(ok.to(tl.int32), axis=0) != 0:
        base = tl.where(odd, b[:, None], a[:, None])
        # code 1: a / 2; codes 2-7: a or b times 2^(e - 1); codes 0 / 8: zero with a's sign
        pow2 = ((e + 126) << 23).to(tl.float32, bitcast=True)  # 2^(e - 1)
        mag = tl.where(e == 0, a[:, None] * tl.where(odd, 0.5, 0.0), base * pow2)
        v = flip_sign(mag, (codes & 8) << 28)
    else:
        v = _nvfp4_divide(codes, sf, gsv)
    return v


@triton.jit
def swizzled_sf_offset(e, m, k, MT, KT):
    """Byte offset of scale (m, k) of expert e in the 128x4 layout (MT = Mp/128, KT = Kp/4)."""
    return ((e * MT + m // 128) * KT + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4


@triton.jit
def pick(vec, lanes, i):
    """Element ``i`` of a register vector (``lanes`` = its ``tl.arange``), exact for integers."""
    return tl.sum(tl.where(lanes == i, vec, 0), axis=0)


@triton.jit
def to_bf16_rne(x):
    """FP32 -> BF16 rounding to nearest even on every backend. (``.to(tl.bfloat16)`` is RNE on
    GPUs but truncates under TRITON_INTERPRET=1; rounding the bits first makes the final
    conversion exact on both.)"""
    bits = x.to(tl.int32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r).to(tl.bfloat16)


@triton.jit
def store_rounded(ptr, x, mask):
    """Store FP32 ``x`` into ``ptr``'s element type (BF16 with RNE on every backend)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, to_bf16_rne(x), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def unpack_pairs(w, IN_BITS: tl.constexpr, IS_BF16: tl.constexpr):
    """A word holding two consecutive input elements (even element in the low half) -> the
    two values as FP32 (exact). ``IN_BITS`` 16: ``w`` int32 with bf16/fp16 halves;
    32: ``w`` int64 with fp32 halves."""
    if IN_BITS == 16:
        if IS_BF16:
            even = (w << 16).to(tl.float32, bitcast=True)
            odd = (w & -65536).to(tl.float32, bitcast=True)
        else:
            even = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            odd = ((w >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        even = (w & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        odd = ((w >> 32) & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    return even, odd


@triton.jit
def nvfp4_pair_stats(even, odd):
    """Tiles [NB, 8] of even/odd elements of NB blocks -> (finite |x| max per block [NB],
    non-finite flag per block [NB])."""
    fe = tl.abs(even) < float("inf")
    fo = tl.abs(odd) < float("inf")
    m = tl.maximum(tl.where(fe, tl.abs(even), 0.0), tl.where(fo, tl.abs(odd), 0.0))
    vmax = tl.max(m, axis=1)
    bad = tl.max((~(fe & fo)).to(tl.int32), axis=1) != 0
    return vmax, bad


@triton.jit
def nvfp4_quantize_pairs(even, odd, vmax, bad, gs):
    """Like :func:`nvfp4_quantize_tile` on the even/odd split of the blocks ([NB, 8] each):
    returns (packed bytes [NB, 8] uint8, scale bytes [NB] uint8) with no reshapes."""
    sfv, sfb = e4m3_encode(tl.math.div_rn(gs * vmax, tl.zeros_like(vmax) + 6.0))
    inv = tl.where(sfv != 0.0, tl.minimum(tl.math.div_rn(gs + tl.zeros_like(sfv), sfv), FP32_MAX), 0.0)
    lo = e2m1_encode(even * inv[:, None])
    hi = e2m1_encode(odd * inv[:, None])
    packed = tl.where(bad[:, None], 0, lo | (hi << 4)).to(tl.uint8)
    sfb = tl.where(bad, E4M3_NAN_BYTE, sfb)
    return packed, sfb.to(tl.uint8)


@triton.jit
def ue8m0_round_up(s):
    """Smallest power of two >= s (s positive, normal FP32), exact by bit arithmetic."""
    bits = s.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def reciprocal_rn(s):
    """``RN(1 / s)`` elementwise (IEEE division, ``div.rn``): one per row, head or block,
    so that values can be scaled by a multiply that every implementation rounds alike."""
    return tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)


@triton.jit
def fp8_block_quantize_tile(xf, UE8M0: tl.constexpr, HW_CVT: tl.constexpr):
    """DeepEP-style FP8 of an FP32 tile ``[NB, BLOCK]`` (one scale per row of the tile):
    ``s = max(amax, 1e-4) / 448`` (rounded up to a power of two when ``UE8M0``),
    ``q = e4m3(x * (1 / s))``; a block holding NaN/Inf gets bytes 0x7F and a NaN scale.
    Returns (E4M3 bytes as int32 ``[NB, BLOCK]``, decode scales FP32 ``[NB]``). ``HW_CVT``: the
    GPU's RNE-satfinite conversion instead of :func:`e4m3_encode` (same bits, verified on H200)."""
    finite = tl.abs(xf) < float("inf")
    bad = tl.max((~finite).to(tl.int32), axis=1) != 0
    amax = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-4)
    sf = tl.math.div_rn(amax, tl.zeros_like(amax) + E4M3_MAX)
    if UE8M0:
        sf = ue8m0_round_up(sf)
    inv = reciprocal_rn(sf)
    if HW_CVT:
        qb = (xf * inv[:, None]).to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        _, qb = e4m3_encode(xf * inv[:, None])
    qb = tl.where(bad[:, None], E4M3_NAN_BYTE, qb)
    sf = tl.where(bad, float("nan"), sf)
    return qb, sf


@triton.jit
def abs_key(x):
    """FP32 -> uint32 ordering like ``|x|`` (the bits shifted left by one drop the sign), with
    Inf and NaN above every finite value: an integer max of keys is one IMNMX, exact and the
    same on every backend (float max needs an abs and treats NaN differently per backend)."""
    return x.to(tl.uint32, bitcast=True) << 1


@triton.jit
def abs_from_key(k):
    """Inverse of :func:`abs_key` for the maximum: uint32 key -> ``|x|`` as FP32 (>= Inf, or
    NaN, when a non-finite value was seen)."""
    return (k >> 1).to(tl.float32, bitcast=True)


ABS16X2_MASK = tl.constexpr(0x7FFF7FFF)  # clears the sign bits of a word holding two 16-bit floats


@triton.jit
def umax16x2(a, b, HW: tl.constexpr):
    """Unsigned maximum of the two 16-bit halves of int32 words ``a`` and ``b``, half by half.
    ``HW``: one ``max.u16x2`` instruction (sm_90); else the same bits by 32-bit integer ops."""
    if HW:
        return tl.inline_asm_elementwise("max.u16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                         pack=1)  # fmt: skip
    else:
        hi = tl.maximum((a >> 16) & 0xFFFF, (b >> 16) & 0xFFFF)
        lo = tl.maximum(a & 0xFFFF, b & 0xFFFF)
        return (hi << 16) | lo


@triton.jit
def _umax16x2_hw(a, b):
    return umax16x2(a, b, True)


@triton.jit
def _umax16x2_sw(a, b):
    return umax16x2(a, b, False)


@triton.jit
def umax16x2_reduce(m, axis: tl.constexpr, HW: tl.constexpr):
    """:func:`umax16x2` reduction of ``m`` along ``axis``."""
    if HW:
        return tl.reduce(m, axis, _umax16x2_hw)
    else:
        return tl.reduce(m, axis, _umax16x2_sw)


@triton.jit
def abs16x2_max(wa, wb, HW: tl.constexpr):
    """Words of two 16-bit floats (BF16 or FP16; ``wa``, ``wb`` [R, C] int32) -> [R] words whose
    halves are the largest ``|x|`` bit patterns of the row's even / odd halves. With the sign
    bit cleared, a 16-bit float's bits order like its magnitude, Inf above every finite value
    and NaN above Inf, so the integer maximum is exact and flags non-finite values."""
    return umax16x2_reduce(umax16x2(wa & ABS16X2_MASK, wb & ABS16X2_MASK, HW), 1, HW)


@triton.jit
def f16_abs_bits_stats(m, IS_BF16: tl.constexpr):
    """A word from :func:`abs16x2_max` -> (its larger half as FP32 ``|x|`` max, non-finite flag)."""
    h = tl.maximum((m >> 16) & 0xFFFF, m & 0xFFFF)
    if IS_BF16:
        return (h << 16).to(tl.float32, bitcast=True), h >= 0x7F80
    else:
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32), h >= 0x7C00


@triton.jit
def nvfp4_halves_stats(ea, oa, eb, ob):
    """Even/odd elements of the two halves of NB blocks (``[NB, 4]`` each, one block per tile
    row) -> (``max |x|`` per block [NB], non-finite flag per block [NB]). The maximum is the
    finite maximum exactly when the flag is off."""
    k = tl.maximum(tl.maximum(abs_key(ea), abs_key(oa)), tl.maximum(abs_key(eb), abs_key(ob)))
    vmax = abs_from_key(tl.max(k, axis=1))
    return vmax, ~(vmax < float("inf"))


@triton.jit
def finite_abs(x):
    """``|x|`` where finite, else 0."""
    a = tl.abs(x)
    return tl.where(a < float("inf"), a, 0.0)


@triton.jit
def nvfp4_pack_codes(even, odd, inv):
    """Quantize and pack 8 consecutive elements per tile row: ``even``/``odd`` ``[R, 4]``
    (word j holds elements 2j and 2j+1), encode factor ``inv`` [R] -> int32 [R] holding the
    8 E2M1 codes, element i in bits 4i..4i+3 (the little-endian bytes of the packed data).

    The sign bit of each code is the sign bit of ``x`` (``inv >= 0``, so ``x * inv`` has
    ``x``'s sign, also when it rounds to zero). :func:`e2m1_rne_bits` leaves exponent bits at
    23..30 above the code; shifted by >= 9 they leave the word, so only the three lowest
    nibbles need masking."""
    j = tl.arange(0, 4)[None, :]
    se = e2m1_rne_bits(even * inv[:, None]) & tl.where(j < 2, 7, -1)
    so = e2m1_rne_bits(odd * inv[:, None]) & tl.where(j < 1, 7, -1)
    sgn_e = (even.to(tl.int32, bitcast=True) >> 31) & 1
    sgn_o = (odd.to(tl.int32, bitcast=True) >> 31) & 1
    sh = 8 * j
    word = (se << sh) + (sgn_e << (sh + 3)) + (so << (sh + 4)) + (sgn_o << (sh + 7))
    return tl.sum(word, axis=1)


# e4m3_encode_nonneg: magic addend for a in [2^E, 2^(E+1)), E = max(exponent, -6): 2^(E+20)
# (ulp = the E4M3 quantum 2^(E-3)) plus 8 * (E + 6) ulps, so that the sum's mantissa is the
# E4M3 byte; its bits are ``X * E4M3_MAGIC_MUL + E4M3_MAGIC_ADD`` for X = E + 127.
E4M3_MAGIC_MUL = tl.constexpr(0x800008)  # 2^23 + 8
E4M3_MAGIC_ADD = tl.constexpr(167771192)  # 20 * 2^23 - 8 * 121
E4M3_MIN_NORMAL_EXP = tl.constexpr(121)  # biased FP32 exponent of 2^-6


@triton.jit
def e4m3_encode_nonneg(a):
    """FP32 ``a >= 0`` -> (E4M3 value as FP32, E4M3 byte as int32), RNE, satfinite (``a >=
    448`` and Inf -> 448): the same as :func:`e4m3_encode` for those inputs, with one FP32
    add for the rounding (as in :func:`e2m1_rne_bits`; the subnormal range is the binade
    of 2^-6 with the same quantum 2^-9). NaN gives garbage (callers mask non-finite blocks)."""
    a = tl.minimum(a, E4M3_MAX)
    x = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, E4M3_MIN_NORMAL_EXP)
    magic = (x * E4M3_MAGIC_MUL + E4M3_MAGIC_ADD).to(tl.float32, bitcast=True)
    s = a + magic
    return s - magic, s.to(tl.int32, bitcast=True) & 0x7FFFFF


@triton.jit
def nvfp4_block_scale(vmax, gs):
    """Per-block finite maxima ``vmax`` and encode scale ``gs`` -> (E4M3 scale byte as int32,
    encode factor ``inv``): ``sf = e4m3(gs * vmax / 6)``, ``inv = gs / sf`` (0 if sf == 0)."""
    sfv, sfb = e4m3_encode_nonneg(tl.math.div_rn(gs * vmax, tl.zeros_like(vmax) + 6.0))
    inv = tl.where(sfv != 0.0, tl.minimum(tl.math.div_rn(gs + tl.zeros_like(sfv), sfv), FP32_MAX), 0.0)
    return sfb, inv


# NVFP4_PACK16_ASM: $1..$4 the input words w0..w3 (two 16-bit floats each, even element low),
# $5..$8 / $9..$12 the e2m1_rne_bits of their even / odd elements (code in bits 0..2, bits
# 3..22 zero). Byte j of the result is code_e | sign_e << 3 | code_o << 4 | sign_o << 7: the
# codes by one mad a word and prmt byte gathers; the signs are bit 7 of bytes 1 / 3 of each
# word (bits 15 / 31), gathered by prmt and shifted into the nibbles' top bits.
NVFP4_PACK16_ASM = tl.constexpr("""{
.reg .b32 c0, c1, c2, c3, lo, hi, ev, ev2, od, od2;
mad.lo.u32 c0, $9, 16, $5;
mad.lo.u32 c1, $10, 16, $6;
mad.lo.u32 c2, $11, 16, $7;
mad.lo.u32 c3, $12, 16, $8;
prmt.b32 lo, c0, c1, 0x0040;
prmt.b32 hi, c2, c3, 0x4000;
prmt.b32 lo, lo, hi, 0x7610;
prmt.b32 ev, $1, $2, 0x0051;
prmt.b32 ev2, $3, $4, 0x5100;
prmt.b32 ev, ev, ev2, 0x7610;
prmt.b32 od, $1, $2, 0x0073;
prmt.b32 od2, $3, $4, 0x7300;
prmt.b32 od, od, od2, 0x7610;
shr.b32 ev, ev, 4;
and.b32 ev, ev, 0x08080808;
and.b32 od, od, 0x80808080;
or.b32 ev, ev, od;
or.b32 $0, lo, ev;
}""")


@triton.jit
def split4(t):
    """[R, 4] -> its four columns, each [R] (register renames when a thread holds whole rows)."""
    a, b = tl.split(tl.reshape(t, (t.shape[0], 2, 2)))
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def nvfp4_pack_codes16(w, even, odd, inv, HW: tl.constexpr):
    """:func:`nvfp4_pack_codes` for 16-bit inputs given also as their words ``w`` [R, 4] (two
    elements a word, even element low; ``even``/``odd`` their FP32 values). ``HW``: the
    packing and the sign bits by byte permutes (:data:`NVFP4_PACK16_ASM`), same bits."""
    if HW:
        se = e2m1_rne_bits(even * inv[:, None])
        so = e2m1_rne_bits(odd * inv[:, None])
        w0, w1, w2, w3 = split4(w)
        e0, e1, e2, e3 = split4(se)
        o0, o1, o2, o3 = split4(so)
        return tl.inline_asm_elementwise(NVFP4_PACK16_ASM, "=r,r,r,r,r,r,r,r,r,r,r,r,r",
                                         [w0, w1, w2, w3, e0, e1, e2, e3, o0, o1, o2, o3], dtype=tl.int32,
                                         is_pure=True, pack=1)  # fmt: skip
    else:
        return nvfp4_pack_codes(even, odd, inv)


@triton.jit
def nvfp4_quantize_words(wa, wb, ea, oa, eb, ob, vmax, bad, gs, HW: tl.constexpr):
    """:func:`nvfp4_quantize_halves` for 16-bit inputs, also given as the words ``wa``/``wb``
    ([NB, 4] int32) that hold ``ea, oa`` / ``eb, ob``: with ``HW`` the codes are packed by
    :func:`nvfp4_pack_codes16`'s byte permutes. Same bits either way."""
    sfb, inv = nvfp4_block_scale(vmax, gs)
    pa = tl.where(bad, 0, nvfp4_pack_codes16(wa, ea, oa, inv, HW))
    pb = tl.where(bad, 0, nvfp4_pack_codes16(wb, eb, ob, inv, HW))
    sfb = tl.where(bad, E4M3_NAN_BYTE, sfb)
    return pa, pb, sfb.to(tl.uint8)


@triton.jit
def nvfp4_quantize_halves(ea, oa, eb, ob, vmax, bad, gs):
    """NB blocks as even/odd elements of their two halves (``[NB, 4]`` each) with per-block
    ``vmax``/``bad`` from :func:`nvfp4_halves_stats` and encode scale ``gs`` (scalar or [NB])
    -> (codes of the first halves int32 [NB], of the second halves int32 [NB], scale bytes
    uint8 [NB]). Same numerics as :func:`nvfp4_quantize_tile` (DESIGN.md section 3)."""
    sfb, inv = nvfp4_block_scale(vmax, gs)
    pa = tl.where(bad, 0, nvfp4_pack_codes(ea, oa, inv))
    pb = tl.where(bad, 0, nvfp4_pack_codes(eb, ob, inv))
    sfb = tl.where(bad, E4M3_NAN_BYTE, sfb)
    return pa, pb, sfb.to(tl.uint8)
