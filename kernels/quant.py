"""Quantize / dequantize kernels: NVFP4 (linear or swizzled scales; static, per-row or
per-token global scale) and DeepEP-style FP8 block. One program per row; the row is held
in registers as a [blocks, block_size] tile so per-token amax costs no second pass."""

import triton
import triton.language as tl

from .common import (
    abs16x2_max,
    e4m3_decode,
    f16_abs_bits_stats,
    finite_abs,
    fp8_block_quantize_tile,
    abs_from_key,
    abs_key,
    nvfp4_dequantize_tile,
    nvfp4_gs_from_amax,
    nvfp4_halves_stats,
    nvfp4_quantize_halves,
    nvfp4_quantize_words,
    store_rounded,
    swizzled_sf_offset,
    unpack_pairs,
)

# global-scale modes
GS_MODE_STATIC = tl.constexpr(0)  # one scalar for the whole tensor (gs_ptr[0])
GS_MODE_PER_ROW = tl.constexpr(1)  # caller-given, gs_ptr[row]
GS_MODE_PER_TOKEN = tl.constexpr(2)  # computed here from the row's amax, written to gs_ptr[row]


@triton.jit
def _nvfp4_load_halves(x_ptr, row, blk, bmask, H, MASKED: tl.constexpr):
    """Words of blocks ``blk`` of rows ``row`` as two [len(blk), 4] tiles (first and second
    half of each block), so that one thread holds whole blocks: block reductions need no
    shuffles and each half is one 16-byte load for 16-bit inputs. ``MASKED`` False: every
    block is in range (``bmask`` unused)."""
    base = row * (H // 2) + blk * 8
    k = tl.arange(0, 4)[None, :]
    if MASKED:
        wa = tl.load(x_ptr + (base[:, None] + k), mask=bmask[:, None], other=0)
        wb = tl.load(x_ptr + (base[:, None] + (k + 4)), mask=bmask[:, None], other=0)
    else:
        wa = tl.load(x_ptr + (base[:, None] + k))
        wb = tl.load(x_ptr + (base[:, None] + (k + 4)))
    return wa, wb


@triton.jit
def _nvfp4_load_pairs(x_ptr, row, blk, bmask, H, IN_BITS: tl.constexpr, IS_BF16: tl.constexpr, MASKED: tl.constexpr):
    """:func:`_nvfp4_load_halves` as FP32 even / odd elements of both halves (ea, oa, eb, ob)."""
    wa, wb = _nvfp4_load_halves(x_ptr, row, blk, bmask, H, MASKED)
    ea, oa = unpack_pairs(wa, IN_BITS, IS_BF16)
    eb, ob = unpack_pairs(wb, IN_BITS, IS_BF16)
    return ea, oa, eb, ob


@triton.jit
def _finite_abs4(ea, oa, eb, ob):
    """Elementwise finite ``|x|`` maximum of the four element tiles of a block (NaN/Inf -> 0)."""
    return tl.maximum(tl.maximum(finite_abs(ea), finite_abs(oa)), tl.maximum(finite_abs(eb), finite_abs(ob)))


@triton.jit
def _nvfp4_finite_abs_chunks(x_ptr, row, boff, rmask, KSF, H, NB: tl.constexpr, NCHUNK: tl.constexpr,
                             IN_BITS: tl.constexpr, IS_BF16: tl.constexpr):
    """Per-element finite ``|x|`` maxima over the NCHUNK chunks of blocks ``c * NB + boff`` of rows
    ``row`` (re-read; only for rows holding NaN/Inf) -> [len(boff), 4]."""
    fin = tl.zeros((boff.shape[0], 4), tl.float32)
    for cf in range(NCHUNK):
        blk = cf * NB + boff
        ea, oa, eb, ob = _nvfp4_load_pairs(x_ptr, row, blk, rmask & (blk < KSF), H, IN_BITS, IS_BF16, True)
        fin = tl.maximum(fin, _finite_abs4(ea, oa, eb, ob))
    return fin


@triton.jit
def _nvfp4_absmax_acc(acc_e, acc_o, wa, wb, IN_BITS: tl.constexpr, IS_BF16: tl.constexpr):
    """Running maxima of :func:`abs_key` of even / odd elements. For BF16 the keys come
    straight from the words: ``w << 17`` is the even element's key, ``w << 1`` the odd
    element's key above 16 bits of the even element (cleared in :func:`_nvfp4_absmax_finish`;
    they cannot change the maximum of the upper bits)."""
    if IN_BITS == 16 and IS_BF16:
        ua = wa.to(tl.uint32, bitcast=True)
        ub = wb.to(tl.uint32, bitcast=True)
        acc_e = tl.maximum(acc_e, tl.maximum(ua << 17, ub << 17))
        acc_o = tl.maximum(acc_o, tl.maximum(ua << 1, ub << 1))
    else:
        ea, oa = unpack_pairs(wa, IN_BITS, IS_BF16)
        eb, ob = unpack_pairs(wb, IN_BITS, IS_BF16)
        acc_e = tl.maximum(acc_e, tl.maximum(abs_key(ea), abs_key(eb)))
        acc_o = tl.maximum(acc_o, tl.maximum(abs_key(oa), abs_key(ob)))
    return acc_e, acc_o


@triton.jit
def _nvfp4_absmax_finish(acc_e, acc_o, IN_BITS: tl.constexpr, IS_BF16: tl.constexpr):
    """-> the program's ``max |x|`` (>= Inf, or NaN, when it saw a non-finite value)."""
    ke = tl.max(acc_e)
    ko = tl.max(acc_o)
    if IN_BITS == 16 and IS_BF16:
        ko = (ko >> 17) << 17
    return abs_from_key(tl.maximum(ke, ko))


@triton.jit
def _nvfp4_store_blocks(q_ptr, sf_ptr, pa, pb, sfb, qblk, sf_off, bmask, MASKED: tl.constexpr):
    """8 code bytes per block in one 8-byte store (block ``qblk`` is int64 word ``qblk`` of the
    codes), its scale byte at ``sf_off``."""
    q64 = q_ptr.to(tl.pointer_type(tl.uint64))
    packed = pa.to(tl.uint32, bitcast=True).to(tl.uint64) | (pb.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
    if MASKED:
        tl.store(q64 + qblk, packed, mask=bmask)
        tl.store(sf_ptr + sf_off, sfb, mask=bmask)
    else:
        tl.store(q64 + qblk, packed)
        tl.store(sf_ptr + sf_off, sfb)


@triton.jit
def _nvfp4_store_chunk(q_ptr, sf_ptr, pa, pb, sfb, row, blk, bmask, KSF, M, MT, KT, SWIZZLE: tl.constexpr,
                       MASKED: tl.constexpr):
    if SWIZZLE:
        sf_off = swizzled_sf_offset(row // M, row % M, blk.to(tl.int64), MT, KT)
    else:
        sf_off = row * KSF + blk
    _nvfp4_store_blocks(q_ptr, sf_ptr, pa, pb, sfb, row * KSF + blk, sf_off, bmask, MASKED)


@triton.jit
def _nvfp4_block_stats(wa, wb, IN_BITS: tl.constexpr, IS_BF16: tl.constexpr, HW: tl.constexpr):
    """Blocks as words (two [NB, 4] tiles) -> (FP32 even / odd elements ea, oa, eb, ob, ``max |x|``
    per block [NB], non-finite flag per block [NB]); for 16-bit inputs the maxima come from the
    words' bit patterns (:func:`abs16x2_max`, one ``max.u16x2`` per two words with ``HW``)."""
    ea, oa = unpack_pairs(wa, IN_BITS, IS_BF16)
    eb, ob = unpack_pairs(wb, IN_BITS, IS_BF16)
    if IN_BITS == 16:
        vmax, bad = f16_abs_bits_stats(abs16x2_max(wa, wb, HW), IS_BF16)
    else:
        vmax, bad = nvfp4_halves_stats(ea, oa, eb, ob)
    return ea, oa, eb, ob, vmax, bad


@triton.jit
def _nvfp4_quantize_blocks(wa, wb, ea, oa, eb, ob, vmax, bad, gs, IN_BITS: tl.constexpr, HW: tl.constexpr):
    """-> (codes of the first halves, of the second halves, scale bytes); 16-bit inputs pack the
    codes with the words' sign bits (:func:`nvfp4_quantize_words`, ``prmt`` with ``HW``)."""
    if IN_BITS == 16:
        return nvfp4_quantize_words(wa, wb, ea, oa, eb, ob, vmax, bad, gs, HW)
    else:
        return nvfp4_quantize_halves(ea, oa, eb, ob, vmax, bad, gs)


@triton.jit
def _nvfp4_quantize_chunk(wa, wb, q_ptr, sf_ptr, row, blk, bmask, gs, KSF, M, MT, KT, IN_BITS: tl.constexpr,
                          IS_BF16: tl.constexpr, SWIZZLE: tl.constexpr, MASKED: tl.constexpr, HW: tl.constexpr):
    """Quantize and store blocks ``blk`` of rows ``row``, given as their words."""
    ea, oa, eb, ob, vmax, bad = _nvfp4_block_stats(wa, wb, IN_BITS, IS_BF16, HW)
    pa, pb, sfb = _nvfp4_quantize_blocks(wa, wb, ea, oa, eb, ob, vmax, bad, gs, IN_BITS, HW)
    _nvfp4_store_chunk(q_ptr, sf_ptr, pa, pb, sfb, row, blk, bmask, KSF, M, MT, KT, SWIZZLE, MASKED)


@triton.jit
def _nvfp4_finite_amax(x_ptr, row, i, KSF, H, NB: tl.constexpr, NCHUNK: tl.constexpr, IN_BITS: tl.constexpr,
                       IS_BF16: tl.constexpr):
    """Finite ``max |x|`` of a streamed row (read again chunk by chunk; for rows holding NaN/Inf)."""
    return tl.max(_nvfp4_finite_abs_chunks(x_ptr, row, i, i >= 0, KSF, H, NB, NCHUNK, IN_BITS, IS_BF16))


@triton.jit
def nvfp4_quantize_kernel(
    x_ptr,  # [N, H/2] words: int32 (bf16/fp16 pairs) or int64 (fp32 pairs), rows contiguous
    q_ptr,  # [N, H/2] uint8 (8-byte aligned)
    sf_ptr,  # uint8: [N, KSF] linear, or swizzled [E, Mp, Kp]
    gs_ptr,  # fp32: [1] static, [N] per row / per token (output for GS_MODE_PER_TOKEN)
    N,
    H,
    KSF,
    M,  # rows per swizzle slab (the last lead dim)
    MT,  # ceil(M / 128)
    KT,  # ceil(KSF / 4)
    GS_MODE: tl.constexpr,
    SWIZZLE: tl.constexpr,
    IN_BITS: tl.constexpr,  # 16 or 32
    IS_BF16: tl.constexpr,
    NB: tl.constexpr,  # blocks per chunk (power of two); NCHUNK * NB >= KSF
    NCHUNK: tl.constexpr,  # chunks per row (> 1 only with ROWS == 1)
    ROWS: tl.constexpr,  # rows per program (power of two)
    EVEN_K: tl.constexpr = False,  # NCHUNK > 1 and NCHUNK * NB == KSF: no block masks
    HW: tl.constexpr = False,  # GPU: inline PTX for 16-bit inputs (see _nvfp4_quantize_words)
):
    """Words hold element pairs (even element in the low half), so E2M1 codes pack into bytes
    elementwise. A tile is [ROWS * NB, 4] words per block half (tile block i is block i % NB
    of row i // NB); with num_warps * 32 == ROWS * NB each thread owns one whole block.
    Short rows: ROWS rows in one tile. Long rows: one row streamed in NCHUNK chunks of NB
    blocks; a per-token scale then takes a first pass for the row's amax (the second pass
    reads the row from L2; its loop is unrolled, so all of the row's loads are in flight at once)."""
    i = tl.arange(0, ROWS * NB)
    row = tl.program_id(0).to(tl.int64) * ROWS + i // NB
    rmask = row < N
    if NCHUNK == 1:
        blk = i % NB
        bmask = (blk < KSF) & rmask
        wa, wb = _nvfp4_load_halves(x_ptr, row, blk, bmask, H, True)
        ea, oa, eb, ob, vmax, bad = _nvfp4_block_stats(wa, wb, IN_BITS, IS_BF16, HW)
        if GS_MODE == GS_MODE_PER_TOKEN:
            amax_b = vmax
            if tl.max(bad.to(tl.int32), axis=0) != 0:  # rare: finite maxima of blocks holding NaN/Inf
                amax_b = tl.where(bad, tl.max(_finite_abs4(ea, oa, eb, ob), axis=1), vmax)
            gs_row = nvfp4_gs_from_amax(tl.max(tl.reshape(amax_b, (ROWS, NB)), axis=1))
            rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            tl.store(gs_ptr + rows, gs_row, mask=rows < N)
            gs = tl.reshape(tl.broadcast_to(gs_row[:, None], (ROWS, NB)), (ROWS * NB,))
        elif GS_MODE == GS_MODE_PER_ROW:
            gs = tl.load(gs_ptr + row, mask=rmask, other=1.0)
        else:
            gs = tl.load(gs_ptr)
        pa, pb, sfb = _nvfp4_quantize_blocks(wa, wb, ea, oa, eb, ob, vmax, bad, gs, IN_BITS, HW)
        _nvfp4_store_chunk(q_ptr, sf_ptr, pa, pb, sfb, row, blk, bmask, KSF, M, MT, KT, SWIZZLE, True)
    else:
        r = tl.program_id(0).to(tl.int64)
        # 16-bit rows with a per-token scale stay in registers (a tuple of chunks) from the amax
        # pass to the quantize pass; other rows are read again (from L2) or read once
        KEEP: tl.constexpr = GS_MODE == GS_MODE_PER_TOKEN and IN_BITS == 16
        row_words = ()
        if GS_MODE == GS_MODE_PER_TOKEN:
            acc_e = tl.zeros((NB, 4), tl.uint32)
            acc_o = tl.zeros((NB, 4), tl.uint32)
            for ca in tl.static_range(NCHUNK):
                blk = ca * NB + i
                wa, wb = _nvfp4_load_halves(x_ptr, row, blk, blk < KSF, H, not EVEN_K)
                if KEEP:
                    row_words = row_words + ((wa, wb),)
                acc_e, acc_o = _nvfp4_absmax_acc(acc_e, acc_o, wa, wb, IN_BITS, IS_BF16)
            amax = _nvfp4_absmax_finish(acc_e, acc_o, IN_BITS, IS_BF16)
            if not (amax < float("inf")):  # rare: the row holds NaN/Inf, take its finite maximum
                amax = _nvfp4_finite_amax(x_ptr, row, i, KSF, H, NB, NCHUNK, IN_BITS, IS_BF16)
            gs = nvfp4_gs_from_amax(amax)
            tl.store(gs_ptr + r, gs)
        elif GS_MODE == GS_MODE_PER_ROW:
            gs = tl.load(gs_ptr + r)
        else:
            gs = tl.load(gs_ptr)
        for c in tl.static_range(NCHUNK):
            blk = c * NB + i
            if KEEP:
                wa, wb = row_words[c]
            else:
                wa, wb = _nvfp4_load_halves(x_ptr, row, blk, blk < KSF, H, not EVEN_K)
            _nvfp4_quantize_chunk(wa, wb, q_ptr, sf_ptr, row, blk, blk < KSF, gs, KSF, M, MT, KT, IN_BITS, IS_BF16,
                                  SWIZZLE, not EVEN_K, HW)  # fmt: skip


@triton.jit
def nvfp4_dequantize_kernel(
    q_ptr,
    sf_ptr,
    gs_ptr,
    out_ptr,  # [N, H] output dtype
    N,
    H,
    KSF,
    M,
    MT,
    KT,
    GS_PER_ROW: tl.constexpr,
    SWIZZLE: tl.constexpr,
    NB: tl.constexpr,
    ROWS: tl.constexpr,
):
    i = tl.arange(0, ROWS * NB)
    row = tl.program_id(0).to(tl.int64) * ROWS + i // NB
    blk = i % NB
    bmask = (blk < KSF) & (row < N)
    packed = tl.load(q_ptr + row[:, None] * (H // 2) + blk[:, None] * 8 + tl.arange(0, 8)[None, :], mask=bmask[:, None], other=0)
    if SWIZZLE:
        sf_off = swizzled_sf_offset(row // M, row % M, blk.to(tl.int64), MT, KT)
    else:
        sf_off = row * KSF + blk
    sfb = tl.load(sf_ptr + sf_off, mask=bmask, other=0).to(tl.int32)
    if GS_PER_ROW:
        gs = tl.load(gs_ptr + row, mask=row < N, other=1.0)
    else:
        gs = tl.load(gs_ptr)
    x = nvfp4_dequantize_tile(packed, sfb, gs)
    store_rounded(out_ptr + row[:, None] * H + blk[:, None] * 16 + tl.arange(0, 16)[None, :], x, bmask[:, None])


@triton.jit
def fp8_block_quantize_kernel(
    x_ptr,  # [N, H]
    q_ptr,  # [N, H] uint8 (E4M3 bytes)
    s_ptr,  # [N, H / BLOCK] fp32, decode direction
    N,
    H,
    NBLK,
    BLOCK: tl.constexpr,
    NB: tl.constexpr,  # power of two >= NBLK
    UE8M0: tl.constexpr,
    HW_CVT: tl.constexpr,  # GPU: the hardware's RNE-satfinite FP32->E4M3 conversion (same bits)
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.arange(0, NB)
    bmask = blk < NBLK
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    xf = tl.load(x_ptr + row * H + offs, mask=bmask[:, None], other=0.0).to(tl.float32)
    qb, sf = fp8_block_quantize_tile(xf, UE8M0, HW_CVT)
    tl.store(q_ptr + row * H + offs, qb.to(tl.uint8), mask=bmask[:, None])
    tl.store(s_ptr + row * NBLK + blk, sf, mask=bmask)


@triton.jit
def fp8_block_dequantize_kernel(
    q_ptr,
    s_ptr,
    out_ptr,
    N,
    H,
    NBLK,
    BLOCK: tl.constexpr,
    NB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.arange(0, NB)
    bmask = blk < NBLK
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    qb = tl.load(q_ptr + row * H + offs, mask=bmask[:, None], other=0).to(tl.int32)
    s = tl.load(s_ptr + row * NBLK + blk, mask=bmask, other=0.0)
    x = e4m3_decode(qb) * s[:, None]
    store_rounded(out_ptr + row * H + offs, x, bmask[:, None])
