"""Masked grouped GEMM: ``c[e, :m_e] = a[e, :m_e] @ b[e].T`` for every expert ``e``.

One kernel; ``tl.constexpr`` switches pick the operand formats:

  A (activations ``[E, max_m, K]``)          B (weights ``[E, N, K]``)
  FMT_BF16   bf16                            bf16
  FMT_FP8    E4M3 + FP32 scale per 1x128     E4M3 + FP32 scale per 128x128 block
  FMT_NVFP4  E2M1 + E4M3 scale per 1x16      E2M1 + E4M3 scale per 1x16
             (linear or 128x4-swizzled),     (linear or swizzled), gs static,
             gs static or per row            per expert or per row of B

Hopper has no FP4 tensor cores (and Triton 3.6 ``tl.dot_scaled`` does not lower NVFP4
there), so quantized operands are decoded in registers and fed to BF16 ``tl.dot`` with
FP32 accumulation. The decode keeps every product exact and moves rounding out of the
K loop where the algebra allows:

  * NVFP4 element x block scale, ``e2m1(q) * float(sf)``, has at most 6 significant bits,
    so it is exact in BF16; the global scale ``gs`` is constant along K (per row of A, per
    expert or row of B), so it is divided out of the FP32 accumulator once per tile
    (``div_rn``), never per element;
  * E4M3 values are exact in BF16; an FP8 block scale is constant over a 128-wide K block
    (BLOCK_K divides 128), so each K step's partial product is multiplied by
    ``sA[row] * sB[col]`` in FP32 before it is added (the DeepGEMM "promotion" scheme).

Hence the kernel's only roundings are FP32 accumulation and the final cast.

E2M1 decode (the cost that matters: a prefill A tile is decoded once per K step and
shared by BLOCK_N output columns, so the decode must cost a few integer ops per value):

  * on GPUs, :func:`e2m1x2_scale_bf16` (inline PTX, 4 packed bytes = 8 values per call)
    looks the BF16 bit pattern of each magnitude up with two ``prmt`` byte permutes
    (high and low byte tables of ``{0, .5, 1, 1.5, 2, 3, 4, 6}``: the table index is the
    code's 3 magnitude bits, used directly as ``prmt`` selectors, 4 per instruction),
    interleaves the bytes with one more ``prmt``, ORs in the sign bits and multiplies by the
    BF16 block scale with one ``fma.rn.bf16x2`` per 2 values: ~3 instructions a value, no
    FP32 round trip. The product has at most 6 significant bits, so it is exact in BF16
    (and no subnormal BF16 is ever formed: the smallest product is ``0.5 * 2^-9``);
  * under the interpreter (``SOFT_DECODE``; it cannot run PTX) the same values are computed
    in FP32 (``e2m1_decode(q) * sf``), exact too, so both paths give identical tiles.

FP8 x FP8 feeds the E4M3 tiles straight to an FP8 ``tl.dot`` (Hopper FP8 wgmma) with the
scales applied per K step; FP8 activations with power-of-two (UE8M0) scales times
BF16/NVFP4 weights are scaled in registers (exact) so the dot accumulates across K steps
without a per-step promotion.

Scheduling: the grid is ``(m_programs * n_tiles, E)`` with the m index fastest, so the
programs sharing one weight tile run together (B from HBM once, A re-read from L2): the
"GROUP_M" swizzle of a dense GEMM with the group spanning all m tiles of an expert (at
most 4 at prefill's 512 rows, whose A -- 1.8 MB of NVFP4 an expert -- stays in L2).
Each program loops over its m tiles ``pid_m, pid_m + m_programs, ...`` below
``masked_m[e]``: with ``LOOP_M`` one program walks all m tiles of its (expert, n tile)
(decode: a single tile, nothing else launched per expert); without it each program owns
one m tile (prefill). A program whose first row is at or past ``masked_m[e]`` runs zero
iterations, so an expert with no rows reads none of its weights.
"""

import triton
import triton.language as tl

from .common import e2m1_decode, e4m3_decode, store_rounded, swizzled_sf_offset

FMT_BF16 = tl.constexpr(0)
FMT_FP8 = tl.constexpr(1)
FMT_NVFP4 = tl.constexpr(2)

# global-scale modes of an NVFP4 operand
GS_STATIC = tl.constexpr(0)  # gs_ptr[0]
GS_PER_EXPERT = tl.constexpr(1)  # gs_ptr[e] (B only)
GS_PER_ROW = tl.constexpr(2)  # gs_ptr[e * rows + row]


# E2M1 x scale -> BF16 for 4 packed bytes (8 values), inline PTX (GPU only).
# in:  $4 four bytes (byte i = element i: low nibble = even k, high nibble = odd k);
#      $5, $6 the BF16 scales of elements 0,1 and 2,3 (bf16x2).
# out: $0, $1 BF16 of the low nibbles of elements 0,1 and 2,3; $2, $3 of the high nibbles.
# prmt tables: BF16 high / low byte of the magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}
# (0x0000 0x3F00 0x3F80 0x3FC0 0x4000 0x4040 0x4080 0x40C0), selected by the code's 3
# magnitude bits: c = w & 0x77777777 holds one selector per nibble (prmt reads c[15:0]).
E2M1_BF16_ASM = tl.constexpr("""{
.reg .b32 c, c2, sg, hb, lb, m, sn, t, z, ht0, ht1, lt0, lt1;
mov.b32 ht0, 0x3F3F3F00;
mov.b32 ht1, 0x40404040;
mov.b32 lt0, 0xC0800000;
mov.b32 lt1, 0xC0804000;
mov.b32 z, 0x80008000;
and.b32 c, $4, 0x77777777;
shr.b32 c2, c, 16;
and.b32 sg, $4, 0x88888888;
prmt.b32 hb, ht0, ht1, c;
prmt.b32 lb, lt0, lt1, c;
prmt.b32 sn, sg, 0, 0x1404;
prmt.b32 m, lb, hb, 0x6240;
shl.b32 t, sn, 4;
and.b32 t, t, 0x80008000;
or.b32 m, m, t;
fma.rn.bf16x2 $0, m, $5, z;
prmt.b32 m, lb, hb, 0x7351;
and.b32 t, sn, 0x80008000;
or.b32 m, m, t;
fma.rn.bf16x2 $2, m, $5, z;
prmt.b32 hb, ht0, ht1, c2;
prmt.b32 lb, lt0, lt1, c2;
prmt.b32 sn, sg, 0, 0x3424;
prmt.b32 m, lb, hb, 0x6240;
shl.b32 t, sn, 4;
and.b32 t, t, 0x80008000;
or.b32 m, m, t;
fma.rn.bf16x2 $1, m, $6, z;
prmt.b32 m, lb, hb, 0x7351;
and.b32 t, sn, 0x80008000;
or.b32 m, m, t;
fma.rn.bf16x2 $3, m, $6, z;
}""")


@triton.jit
def e2m1x2_scale_bf16(packed, scale, SOFT_DECODE: tl.constexpr):
    """Packed E2M1 bytes (uint8, any shape) and a BF16 scale of the same shape -> (low
    nibble, high nibble) values ``e2m1(q) * scale`` as BF16, exact (at most 6 significant
    bits). GPU: :data:`E2M1_BF16_ASM`; ``SOFT_DECODE`` (interpreter): FP32 arithmetic."""
    if SOFT_DECODE:
        p = packed.to(tl.int32)
        s = scale.to(tl.float32)
        lo = (e2m1_decode(p & 15) * s).to(tl.bfloat16)  # exact: no rounding in the cast
        hi = (e2m1_decode(p >> 4) * s).to(tl.bfloat16)
        return lo, hi
    else:
        return tl.inline_asm_elementwise(E2M1_BF16_ASM, "=r,=r,=r,=r,r,r,r", [packed, scale],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def e2m1_decode_scaled(c):
    """E2M1 code (int32, 0..15) -> FP32 ``value * 2^-14`` (exact, via an FP16 bit pattern)."""
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nvfp4_tile_f32(data_ptr, sf_ptr, e, rows, row_mask, k0, K, KSF, MT, KT, SWIZZLED: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`_nvfp4_tile` decoded through FP32 (``e2m1 * 2^-14`` from an FP16 bit pattern,
    times ``sf * 2^14``), interleaved in FP32 and then cast to BF16 (exact). Used for NVFP4
    *weights* under wgmma tiles (block_m >= 64): Triton 3.6's TritonGPUOptimizeDotOperands
    pass fails on the BF16 join + reshape + trans of :func:`_nvfp4_tile` feeding the
    shared-memory B operand of a wgmma (the decode-sized mma.sync path compiles)."""
    NBK: tl.constexpr = BLOCK_K // 16
    g = tl.arange(0, NBK)
    j = tl.arange(0, 8)
    kbyte = k0 // 2 + g[:, None] * 8 + j[None, :]  # [NBK, 8]
    ptrs = data_ptr + rows[:, None, None] * (K // 2) + kbyte[None, :, :]
    mask = row_mask[:, None, None] & (kbyte < K // 2)[None, :, :]
    packed = tl.load(ptrs, mask=mask, other=0).to(tl.int32)  # [R, NBK, 8]
    kb = k0 // 16 + g
    if SWIZZLED:
        sf_off = swizzled_sf_offset(e, rows[:, None], kb[None, :], MT, KT)
    else:
        sf_off = rows[:, None] * KSF + kb[None, :]
    sfb = tl.load(sf_ptr + sf_off, mask=row_mask[:, None] & (kb < KSF)[None, :], other=0).to(tl.int32)
    sf = e4m3_decode(sfb) * 16384.0  # folds the 2^14 of e2m1_decode_scaled; exact
    lo = e2m1_decode_scaled(packed & 15) * sf[:, :, None]
    hi = e2m1_decode_scaled(packed >> 4) * sf[:, :, None]
    return tl.reshape(tl.join(lo, hi), (BLOCK_R, BLOCK_K)).to(tl.bfloat16)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """``acc + a @ b`` for BF16 tiles with FP32 accumulation. ``DOT_F32`` (interpreter only:
    its BF16 dot is wrong, numpy multiplies the raw bit patterns) widens the exact BF16
    values to FP32 and uses an IEEE FP32 dot: the same products, FP32 sums."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _nvfp4_tile(data_ptr, sf_ptr, e, rows, row_mask, k0, K, KSF, MT, KT, SWIZZLED: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SOFT_DECODE: tl.constexpr):
    """Decode an NVFP4 tile [BLOCK_R, BLOCK_K] (rows ``rows`` of expert ``e``, columns
    ``k0 .. k0 + BLOCK_K``) to BF16 ``e2m1(q) * float(sf)`` (exact; no global scale).

    ``data_ptr`` points at the expert's first byte (rows of K/2 bytes); ``sf_ptr`` at the
    start of the scale buffer (linear ``[rows, KSF]`` per expert already offset, or the whole
    swizzled buffer, addressed with ``e``). Masked-out rows / columns decode to 0."""
    NBK: tl.constexpr = BLOCK_K // 16
    g = tl.arange(0, NBK)
    j = tl.arange(0, 8)
    kbyte = k0 // 2 + g[:, None] * 8 + j[None, :]  # [NBK, 8]
    ptrs = data_ptr + rows[:, None, None] * (K // 2) + kbyte[None, :, :]
    mask = row_mask[:, None, None] & (kbyte < K // 2)[None, :, :]
    packed = tl.load(ptrs, mask=mask, other=0)  # uint8 [R, NBK, 8]
    kb = k0 // 16 + g  # scale column
    if SWIZZLED:
        if BLOCK_K % 64 == 0:
            # k0 is a multiple of 64, so each run of 4 scale columns is 4 contiguous bytes of
            # the 128x4 layout: one per-row base plus (g // 4) * 512 + g % 4 lets the
            # compiler see the contiguity and load words (cp.async) instead of single bytes
            row_off = swizzled_sf_offset(e, rows, k0 // 16, MT, KT)
            sf_off = row_off[:, None] + (g // 4)[None, :] * 512 + (g % 4)[None, :]
        else:
            sf_off = swizzled_sf_offset(e, rows[:, None], kb[None, :], MT, KT)
    else:
        sf_off = rows[:, None] * KSF + kb[None, :]
    sfb = tl.load(sf_ptr + sf_off, mask=row_mask[:, None] & (kb < KSF)[None, :], other=0)  # uint8 [R, NBK]
    if SOFT_DECODE:
        sf16 = e4m3_decode(sfb.to(tl.int32)).to(tl.bfloat16)  # E4M3 is exact in BF16
    else:
        sf16 = sfb.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)  # hardware conversion
    sf = tl.broadcast_to(sf16[:, :, None], (BLOCK_R, NBK, 8))
    lo, hi = e2m1x2_scale_bf16(packed, sf, SOFT_DECODE)
    return tl.reshape(tl.join(lo, hi), (BLOCK_R, BLOCK_K))


@triton.jit
def grouped_gemm_masked_kernel(
    a_ptr,  # bf16 [E, max_m, K] | e4m3 [E, max_m, K] | uint8 [E, max_m, K/2]
    a_sf_ptr,  # fp8: fp32 [E, max_m, K/128]; nvfp4: uint8 linear [E, max_m, K/16] or swizzled
    a_gs_ptr,  # nvfp4: fp32 [1] (static) or [E, max_m]
    b_ptr,  # bf16 [E, N, K] | e4m3 [E, N, K] | uint8 [E, N, K/2]
    b_sf_ptr,  # fp8: fp32 [E, cdiv(N, 128), K/128]; nvfp4: uint8 linear [E, N, K/16] or swizzled
    b_gs_ptr,  # nvfp4: fp32 [1] | [E] | [E, N]
    c_ptr,  # [E, max_m, N] out dtype
    masked_m_ptr,  # int32 [E]
    N,
    K: tl.constexpr,  # constexpr: fixed per layer, and the K loop needs a Python bound under the interpreter
    MAX_M,
    A_KSF,  # scale columns of A: K/16 (nvfp4) or K/128 (fp8)
    A_MT,  # swizzled A: cdiv(max_m, 128)
    A_KT,  # swizzled A: cdiv(K/16, 4)
    B_KSF,
    B_MT,  # swizzled B: cdiv(N, 128); fp8 B: cdiv(N, 128) (scale rows)
    B_KT,
    M_BUCKET,  # autotune key only
    A_FMT: tl.constexpr,
    A_SWIZZLED: tl.constexpr,
    A_GS_MODE: tl.constexpr,
    B_FMT: tl.constexpr,
    B_SWIZZLED: tl.constexpr,
    B_GS_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOP_M: tl.constexpr,
    M_ITERS: tl.constexpr,  # m tiles a program visits: 1, or >= cdiv(max_m, BLOCK_M) with LOOP_M
    A_POW2: tl.constexpr = False,  # fp8 A with power-of-two (UE8M0) scales: scaled in registers, exact
    DOT_F32: tl.constexpr = False,  # interpreter only, see _dot
    SOFT_DECODE: tl.constexpr = False,  # interpreter only (no inline PTX), see e2m1x2_scale_bf16
):
    e = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    if LOOP_M:
        m_programs = 1
    else:
        m_programs = tl.cdiv(MAX_M, BLOCK_M)
    pid_m = pid % m_programs
    pid_n = pid // m_programs
    m = tl.minimum(tl.load(masked_m_ptr + e), MAX_M)  # clamp: never touch rows >= max_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    # per-expert bases (int64: E * N * K exceeds 2^31 at real shapes)
    if A_FMT == FMT_NVFP4:
        a_base = a_ptr + e * MAX_M * (K // 2)
    else:
        a_base = a_ptr + e * MAX_M * K
    if B_FMT == FMT_NVFP4:
        b_base = b_ptr + e * N * (K // 2)
    else:
        b_base = b_ptr + e * N * K
    if A_SWIZZLED:
        a_sf_base = a_sf_ptr
    else:
        a_sf_base = a_sf_ptr + e * MAX_M * A_KSF
    if B_SWIZZLED:
        b_sf_base = b_sf_ptr
    elif B_FMT == FMT_FP8:
        b_sf_base = b_sf_ptr + e * B_MT * B_KSF
    else:
        b_sf_base = b_sf_ptr + e * N * B_KSF

    # loop-invariant B-side factor
    b_gs = 1.0
    if B_FMT == FMT_NVFP4:
        if B_GS_MODE == GS_STATIC:
            b_gs = tl.load(b_gs_ptr)
        elif B_GS_MODE == GS_PER_EXPERT:
            b_gs = tl.load(b_gs_ptr + e)
        else:
            b_gs = tl.load(b_gs_ptr + e * N + offs_n, mask=n_mask, other=1.0)[None, :]

    # Loop bounds are compile-time (the interpreter cannot take tensor bounds); tiles at or
    # past the expert's row count skip all work, so an empty expert reads no weights.
    for it in range(M_ITERS):
        m0 = (pid_m + it * m_programs) * BLOCK_M
        if m0 < m:
            _tile(a_base, a_sf_base, a_gs_ptr, b_base, b_sf_base, b_gs, c_ptr, e, m0, m, offs_n, n_mask, N, K, MAX_M,
                  A_KSF, A_MT, A_KT, B_KSF, B_MT, B_KT, A_FMT, A_SWIZZLED, A_GS_MODE, B_FMT, B_SWIZZLED,
                  BLOCK_M, BLOCK_N, BLOCK_K, A_POW2, DOT_F32, SOFT_DECODE)


@triton.jit
def _tile(a_base, a_sf_base, a_gs_ptr, b_base, b_sf_base, b_gs, c_ptr, e, m0, m, offs_n, n_mask, N,
          K: tl.constexpr, MAX_M, A_KSF, A_MT, A_KT, B_KSF, B_MT, B_KT,
          A_FMT: tl.constexpr, A_SWIZZLED: tl.constexpr, A_GS_MODE: tl.constexpr,
          B_FMT: tl.constexpr, B_SWIZZLED: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          A_POW2: tl.constexpr, DOT_F32: tl.constexpr, SOFT_DECODE: tl.constexpr):
    """One output tile [BLOCK_M, BLOCK_N] of expert ``e`` at rows ``m0 ..``."""
    # FP8 x FP8: E4M3 tiles straight into an FP8 dot (not under the interpreter: DOT_F32)
    FP8_DOT: tl.constexpr = A_FMT == FMT_FP8 and B_FMT == FMT_FP8 and not DOT_F32
    # FP8 A with power-of-two scales (not FP8_DOT): e4m3 * 2^j scaled in registers, exact in BF16
    A_PRESCALE: tl.constexpr = A_FMT == FMT_FP8 and A_POW2 and not FP8_DOT
    # a per-K-step scale multiplies the partial product ("promotion"); otherwise the dot
    # accumulates across K steps
    PROMOTE: tl.constexpr = B_FMT == FMT_FP8 or (A_FMT == FMT_FP8 and not A_PRESCALE)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        # ---- A tile [BLOCK_M, BLOCK_K] (bf16, or e4m3 for FP8_DOT)
        if A_FMT == FMT_NVFP4:
            a = _nvfp4_tile(a_base, a_sf_base, e, offs_m, m_mask, k0, K, A_KSF, A_MT, A_KT,
                            A_SWIZZLED, BLOCK_M, BLOCK_K, SOFT_DECODE)
        else:
            a = tl.load(a_base + offs_m[:, None] * K + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if A_FMT == FMT_FP8:
                if A_PRESCALE:
                    sa = tl.load(a_sf_base + offs_m * A_KSF + k0 // 128, mask=m_mask, other=0.0)
                    a = (a.to(tl.float32) * sa[:, None]).to(tl.bfloat16)
                elif not FP8_DOT:
                    a = a.to(tl.bfloat16)
        # ---- B tile as [BLOCK_K, BLOCK_N] (bf16, or e4m3 for FP8_DOT)
        if B_FMT == FMT_NVFP4:
            if BLOCK_M >= 64 and not SOFT_DECODE:  # wgmma tiles: see _nvfp4_tile_f32
                b = tl.trans(_nvfp4_tile_f32(b_base, b_sf_base, e, offs_n, n_mask, k0, K, B_KSF, B_MT, B_KT,
                                             B_SWIZZLED, BLOCK_N, BLOCK_K))
            else:
                b = tl.trans(_nvfp4_tile(b_base, b_sf_base, e, offs_n, n_mask, k0, K, B_KSF, B_MT, B_KT,
                                         B_SWIZZLED, BLOCK_N, BLOCK_K, SOFT_DECODE))
        else:
            b = tl.load(b_base + offs_n[None, :] * K + kk[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            if not FP8_DOT:
                b = b.to(tl.bfloat16)
        # ---- multiply-accumulate
        if PROMOTE:
            if FP8_DOT:
                part = tl.dot(a, b)
            else:
                part = _dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_F32)
            if A_FMT == FMT_FP8 and not A_PRESCALE:
                sa = tl.load(a_sf_base + offs_m * A_KSF + k0 // 128, mask=m_mask, other=0.0)
                part = part * sa[:, None]
            if B_FMT == FMT_FP8:
                sb = tl.load(b_sf_base + (offs_n // 128) * B_KSF + k0 // 128, mask=n_mask, other=0.0)
                part = part * sb[None, :]
            acc += part
        else:
            acc = _dot(a, b, acc, DOT_F32)
    # ---- global scales (constant along K): divided out once per tile
    if A_FMT == FMT_NVFP4:
        if A_GS_MODE == GS_STATIC:
            a_gs = tl.load(a_gs_ptr)
            acc = tl.math.div_rn(acc, a_gs + tl.zeros_like(acc))
        else:
            a_gs = tl.load(a_gs_ptr + e * MAX_M + offs_m, mask=m_mask, other=1.0)
            acc = tl.math.div_rn(acc, a_gs[:, None] + tl.zeros_like(acc))
    if B_FMT == FMT_NVFP4:
        acc = tl.math.div_rn(acc, b_gs + tl.zeros_like(acc))
    c_ptrs = c_ptr + e * MAX_M * N + offs_m[:, None] * N + offs_n[None, :]
    store_rounded(c_ptrs, acc, m_mask[:, None] & n_mask[None, :])
