"""Quantize / dequantize kernels: NVFP4 (linear or swizzled scales; static, per-row or
per-token global scale) and DeepEP-style FP8 block. One program per row; the row is held
in registers as a [blocks, block_size] tile so per-token amax costs no second pass."""

import triton
import triton.language as tl

from .common import (
    e4m3_decode,
    fp8_block_quantize_tile,
    store_rounded,
    nvfp4_dequantize_tile,
    nvfp4_gs_from_amax,
    nvfp4_pair_stats,
    nvfp4_quantize_pairs,
    unpack_pairs,
    swizzled_sf_offset,
)

# global-scale modes
GS_MODE_STATIC = tl.constexpr(0)  # one scalar for the whole tensor (gs_ptr[0])
GS_MODE_PER_ROW = tl.constexpr(1)  # caller-given, gs_ptr[row]
GS_MODE_PER_TOKEN = tl.constexpr(2)  # computed here from the row's amax, written to gs_ptr[row]


@triton.jit
def _nvfp4_load_chunk(x_ptr, row, blk, bmask, H, IN_BITS: tl.constexpr, IS_BF16: tl.constexpr):
    """Words [len(blk), 8] of blocks ``blk`` of rows ``row`` -> (even, odd) FP32 tiles."""
    woffs = row[:, None] * (H // 2) + blk[:, None] * 8 + tl.arange(0, 8)[None, :]
    w = tl.load(x_ptr + woffs, mask=bmask[:, None], other=0)
    even, odd = unpack_pairs(w, IN_BITS, IS_BF16)
    return even, odd, woffs


@triton.jit
def _nvfp4_store_chunk(q_ptr, sf_ptr, woffs, packed, sfb, row, blk, bmask, KSF, M, MT, KT, SWIZZLE: tl.constexpr):
    tl.store(q_ptr + woffs, packed, mask=bmask[:, None])
    if SWIZZLE:
        sf_off = swizzled_sf_offset(row // M, row % M, blk.to(tl.int64), MT, KT)
    else:
        sf_off = row * KSF + blk
    tl.store(sf_ptr + sf_off, sfb, mask=bmask)


@triton.jit
def nvfp4_quantize_kernel(
    x_ptr,  # [N, H/2] words: int32 (bf16/fp16 pairs) or int64 (fp32 pairs), rows contiguous
    q_ptr,  # [N, H/2] uint8
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
):
    """Words hold element pairs (even element in the low half), so E2M1 codes pack into bytes
    elementwise. Short rows: ROWS rows in one [ROWS * NB, 8] tile (tile block i is block
    i % NB of row i // NB). Long rows: one row streamed in NCHUNK chunks of NB blocks, so a
    program holds only ~1K values and many programs share an SM; a per-token scale then
    takes a first pass for the row's amax (the second pass reads the row from L2)."""
    i = tl.arange(0, ROWS * NB)
    row = tl.program_id(0).to(tl.int64) * ROWS + i // NB
    rmask = row < N
    if NCHUNK == 1:
        blk = i % NB
        bmask = (blk < KSF) & rmask
        even, odd, woffs = _nvfp4_load_chunk(x_ptr, row, blk, bmask, H, IN_BITS, IS_BF16)
        vmax, bad = nvfp4_pair_stats(even, odd)
        if GS_MODE == GS_MODE_PER_TOKEN:
            gs_row = nvfp4_gs_from_amax(tl.max(tl.reshape(vmax, (ROWS, NB)), axis=1))
            rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            tl.store(gs_ptr + rows, gs_row, mask=rows < N)
            gs = tl.reshape(tl.broadcast_to(gs_row[:, None], (ROWS, NB)), (ROWS * NB,))
        elif GS_MODE == GS_MODE_PER_ROW:
            gs = tl.load(gs_ptr + row, mask=rmask, other=1.0)
        else:
            gs = tl.load(gs_ptr)
        packed, sfb = nvfp4_quantize_pairs(even, odd, vmax, bad, gs)
        _nvfp4_store_chunk(q_ptr, sf_ptr, woffs, packed, sfb, row, blk, bmask, KSF, M, MT, KT, SWIZZLE)
    else:
        r = tl.program_id(0).to(tl.int64)
        if GS_MODE == GS_MODE_PER_TOKEN:
            amax = tl.zeros((NB,), tl.float32)
            for c in range(NCHUNK):
                blk = c * NB + i
                bmask = blk < KSF
                even, odd, _ = _nvfp4_load_chunk(x_ptr, row, blk, bmask, H, IN_BITS, IS_BF16)
                vmax, _ = nvfp4_pair_stats(even, odd)
                amax = tl.maximum(amax, vmax)
            gs = nvfp4_gs_from_amax(tl.max(amax, axis=0))
            tl.store(gs_ptr + r, gs)
        elif GS_MODE == GS_MODE_PER_ROW:
            gs = tl.load(gs_ptr + r)
        else:
            gs = tl.load(gs_ptr)
        for c in range(NCHUNK):
            blk = c * NB + i
            bmask = blk < KSF
            even, odd, woffs = _nvfp4_load_chunk(x_ptr, row, blk, bmask, H, IN_BITS, IS_BF16)
            vmax, bad = nvfp4_pair_stats(even, odd)
            packed, sfb = nvfp4_quantize_pairs(even, odd, vmax, bad, gs)
            _nvfp4_store_chunk(q_ptr, sf_ptr, woffs, packed, sfb, row, blk, bmask, KSF, M, MT, KT, SWIZZLE)


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
