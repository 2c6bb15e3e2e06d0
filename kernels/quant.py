"""Quantize / dequantize kernels: NVFP4 (linear or swizzled scales; static, per-row or
per-token global scale) and DeepEP-style FP8 block. One program per row; the row is held
in registers as a [blocks, block_size] tile so per-token amax costs no second pass."""

import triton
import triton.language as tl

from .common import (
    e4m3_decode,
    finite_abs,
    fp8_block_quantize_tile,
    abs_from_key,
    abs_key,
    nvfp4_dequantize_tile,
    nvfp4_gs_from_amax,
    nvfp4_halves_stats,
    nvfp4_quantize_halves,
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
def _nvfp4_quantize_chunk(x_ptr, q_ptr, sf_ptr, row, blk, bmask, gs, H, KSF, M, MT, KT,
                          IN_BITS: tl.constexpr, IS_BF16: tl.constexpr, SWIZZLE: tl.constexpr, MASKED: tl.constexpr):
    ea, oa, eb, ob = _nvfp4_load_pairs(x_ptr, row, blk, bmask, H, IN_BITS, IS_BF16, MASKED)
    vmax, bad = nvfp4_halves_stats(ea, oa, eb, ob)
    pa, pb, sfb = nvfp4_quantize_halves(ea, oa, eb, ob, vmax, bad, gs)
    _nvfp4_store_chunk(q_ptr, sf_ptr, pa, pb, sfb, row, blk, bmask, KSF, M, MT, KT, SWIZZLE, MASKED)


@triton.jit
def _nvfp4_finite_amax(x_ptr, row, i, KSF, H, NB: tl.constexpr, NCHUNK: tl.constexpr, IN_BITS: tl.constexpr,
                       IS_BF16: tl.constexpr):
    """Finite ``max |x|`` of a streamed row (read again chunk by chunk; for rows holding NaN/Inf)."""
    return tl.max(_nvfp4_finite_abs_chunks(x_ptr, row, i, i >= 0, KSF, H, NB, NCHUNK, IN_BITS, IS_BF16))


@triton.jit
def _nvfp4_seg_load(x_ptr, r, KSF, H, C0: tl.constexpr, G: tl.constexpr, NB: tl.constexpr, GS_MODE: tl.constexpr,
                    IN_BITS: tl.constexpr, IS_BF16: tl.constexpr, MASKED: tl.constexpr):
    """Segment of row ``r`` held in registers: chunks ``C0 .. C0 + G - 1`` (``G * NB`` blocks,
    ``G`` a power of two; thread t holds blocks t, t + 32 * num_warps, ...) -> (even/odd
    elements of both halves, per-block max and non-finite flag, the :func:`abs_key` of the
    segment's ``max |x|``)."""
    blk = C0 * NB + tl.arange(0, G * NB)
    ea, oa, eb, ob = _nvfp4_load_pairs(x_ptr, r, blk, blk < KSF, H, IN_BITS, IS_BF16, MASKED)
    vmax, bad = nvfp4_halves_stats(ea, oa, eb, ob)
    key = tl.max(abs_key(vmax), axis=0)
    return ea, oa, eb, ob, vmax, bad, key


@triton.jit
def _nvfp4_seg_store(q_ptr, sf_ptr, ea, oa, eb, ob, vmax, bad, gs, r, KSF, M, MT, KT, C0: tl.constexpr,
                     G: tl.constexpr, NB: tl.constexpr, SWIZZLE: tl.constexpr, MASKED: tl.constexpr):
    """Quantize and store a segment from :func:`_nvfp4_seg_load`."""
    blk = C0 * NB + tl.arange(0, G * NB)
    pa, pb, sfb = nvfp4_quantize_halves(ea, oa, eb, ob, vmax, bad, gs)
    _nvfp4_store_chunk(q_ptr, sf_ptr, pa, pb, sfb, r, blk, blk < KSF, KSF, M, MT, KT, SWIZZLE, MASKED)


@triton.jit
def _nvfp4_rowset_reduce(v, R: tl.constexpr, B: tl.constexpr):
    """Per-row maximum of a rowset tile ``v`` [B] (tile index ``(kg * R + s) * 4 + k4``:
    row slot ``s``) -> [R]."""
    v3 = tl.reshape(v, (B // (4 * R), R, 4))
    return tl.max(tl.max(v3, axis=2), axis=0)


@triton.jit
def _nvfp4_rowset_bcast(v, R: tl.constexpr, B: tl.constexpr):
    """[R] per-row values -> the rowset tile [B] (inverse layout of :func:`_nvfp4_rowset_reduce`)."""
    return tl.reshape(tl.broadcast_to(v[None, :, None], (B // (4 * R), R, 4)), (B,))


@triton.jit
def _nvfp4_quantize_rowset(x_ptr, q_ptr, sf_ptr, gs_ptr, H, KSF, M, MT, KT, GS_MODE: tl.constexpr,
                           IN_BITS: tl.constexpr, IS_BF16: tl.constexpr, NB: tl.constexpr, NCHUNK: tl.constexpr,
                           R: tl.constexpr, MASKED: tl.constexpr):
    """Swizzled scales, long rows: a program quantizes ``R`` rows of one 128-row swizzle tile
    that share 32-byte sectors of the scale layout (R = 8: rows m, m+1, m+32, m+33, m+64, m+65,
    m+96, m+97 for even m < 32; R = 4: m, m+32, m+64, m+96; R = 2: m, m+1), streamed in
    NCHUNK chunks of NB blocks per row. Tile index ``i = (kg * R + s) * 4 + k4`` holds block
    ``c * NB + kg * 4 + k4`` of row slot ``s``, one block a thread, so the 32 lanes of a warp
    write 32 / R scale groups of R * 4 contiguous bytes (R = 8: one whole sector per store
    instruction; one row a program writes 8 sectors of 4 bytes)."""
    B: tl.constexpr = R * NB
    P: tl.constexpr = 2 if (R == 2 or R == 8) else 1  # rows of a slot pair: m, m + 1
    QT: tl.constexpr = 128 // R  # programs per swizzle tile
    i = tl.arange(0, B)
    k4 = i % 4
    s = (i // 4) % R
    kg = i // (4 * R)
    pid = tl.program_id(0)
    g = pid // QT  # e * MT + t
    q = pid % QT
    e = g // MT
    t = g % MT
    m0 = (q % (32 // P)) * P + (q // (32 // P)) * (32 * (R // P))
    mt = m0 + (s % P) + (s // P) * 32  # row within the tile, < 128
    m = t * 128 + mt
    if t * 128 + m0 < M:  # else every row of the program is padding of the last tile
        rvalid = m < M
        n = e.to(tl.int64) * M + m
        within = (mt % 32) * 16 + (mt // 32) * 4 + k4
        sf_base = g.to(tl.int64) * KT * 512 + within
        if GS_MODE == GS_MODE_PER_TOKEN:
            acc_e = tl.zeros((B, 4), tl.uint32)
            acc_o = tl.zeros((B, 4), tl.uint32)
            for ca in tl.static_range(NCHUNK):
                blk = ca * NB + kg * 4 + k4
                wa, wb = _nvfp4_load_halves(x_ptr, n, blk, rvalid & (blk < KSF), H, MASKED)
                acc_e, acc_o = _nvfp4_absmax_acc(acc_e, acc_o, wa, wb, IN_BITS, IS_BF16)
            ke = _nvfp4_rowset_reduce(tl.max(acc_e, axis=1), R, B)
            ko = _nvfp4_rowset_reduce(tl.max(acc_o, axis=1), R, B)
            if IN_BITS == 16 and IS_BF16:
                ko = (ko >> 17) << 17
            amax = abs_from_key(tl.maximum(ke, ko))  # [R]
            if tl.min((amax < float("inf")).to(tl.int32), axis=0) == 0:
                # rare: a row holds NaN/Inf, take its finite maximum
                fin = _nvfp4_finite_abs_chunks(x_ptr, n, kg * 4 + k4, rvalid, KSF, H, NB, NCHUNK, IN_BITS, IS_BF16)
                amax = tl.where(amax < float("inf"), amax, _nvfp4_rowset_reduce(tl.max(fin, axis=1), R, B))
            gs_r = nvfp4_gs_from_amax(amax)
            sl = tl.arange(0, R)
            m_r = t * 128 + m0 + (sl % P) + (sl // P) * 32
            tl.store(gs_ptr + (e.to(tl.int64) * M + m_r), gs_r, mask=m_r < M)
            gs = _nvfp4_rowset_bcast(gs_r, R, B)
        elif GS_MODE == GS_MODE_PER_ROW:
            gs = tl.load(gs_ptr + n, mask=rvalid, other=1.0)
        else:
            gs = tl.load(gs_ptr)
        for c in range(NCHUNK):
            blk = c * NB + kg * 4 + k4
            bmask = rvalid & (blk < KSF)
            ea, oa, eb, ob = _nvfp4_load_pairs(x_ptr, n, blk, bmask, H, IN_BITS, IS_BF16, MASKED)
            vmax, bad = nvfp4_halves_stats(ea, oa, eb, ob)
            pa, pb, sfb = nvfp4_quantize_halves(ea, oa, eb, ob, vmax, bad, gs)
            sf_off = sf_base + (c * (NB // 4) + kg).to(tl.int64) * 512
            _nvfp4_store_blocks(q_ptr, sf_ptr, pa, pb, sfb, n * KSF + blk, sf_off, bmask, MASKED)


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
    RESIDENT: tl.constexpr = False,  # NCHUNK in 2..15: the whole row is loaded at once, one pass
    SWZ_ROWS: tl.constexpr = 0,  # SWIZZLE, NCHUNK > 1: rows of a 128-row tile per program (2, 4, 8), see
    # _nvfp4_quantize_rowset; grid = E * MT * (128 // SWZ_ROWS); ROWS must be 1
    MASKED: tl.constexpr = True,  # SWZ_ROWS: some row or block may be out of range
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
    if SWZ_ROWS > 0:
        _nvfp4_quantize_rowset(x_ptr, q_ptr, sf_ptr, gs_ptr, H, KSF, M, MT, KT, GS_MODE, IN_BITS, IS_BF16, NB, NCHUNK,
                               SWZ_ROWS, MASKED)  # fmt: skip
    elif NCHUNK == 1:
        blk = i % NB
        bmask = (blk < KSF) & rmask
        ea, oa, eb, ob = _nvfp4_load_pairs(x_ptr, row, blk, bmask, H, IN_BITS, IS_BF16, True)
        vmax, bad = nvfp4_halves_stats(ea, oa, eb, ob)
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
        pa, pb, sfb = nvfp4_quantize_halves(ea, oa, eb, ob, vmax, bad, gs)
        _nvfp4_store_chunk(q_ptr, sf_ptr, pa, pb, sfb, row, blk, bmask, KSF, M, MT, KT, SWIZZLE, True)
    elif RESIDENT:
        # the row as up to four segments of 8, 4, 2, 1 chunks (the bits of NCHUNK), all loads
        # issued before any math: one HBM read, no second pass for a per-token scale
        r = tl.program_id(0).to(tl.int64)
        MK: tl.constexpr = not EVEN_K
        C4: tl.constexpr = NCHUNK & 8
        C2: tl.constexpr = NCHUNK & 12
        C1: tl.constexpr = NCHUNK & 14
        key = tl.zeros((), tl.uint32)
        if NCHUNK & 8:
            ea8, oa8, eb8, ob8, vm8, bad8, am8 = _nvfp4_seg_load(x_ptr, r, KSF, H, 0, 8, NB, GS_MODE, IN_BITS, IS_BF16, MK)
            key = tl.maximum(key, am8)
        if NCHUNK & 4:
            ea4, oa4, eb4, ob4, vm4, bad4, am4 = _nvfp4_seg_load(x_ptr, r, KSF, H, C4, 4, NB, GS_MODE, IN_BITS, IS_BF16, MK)
            key = tl.maximum(key, am4)
        if NCHUNK & 2:
            ea2, oa2, eb2, ob2, vm2, bad2, am2 = _nvfp4_seg_load(x_ptr, r, KSF, H, C2, 2, NB, GS_MODE, IN_BITS, IS_BF16, MK)
            key = tl.maximum(key, am2)
        if NCHUNK & 1:
            ea1, oa1, eb1, ob1, vm1, bad1, am1 = _nvfp4_seg_load(x_ptr, r, KSF, H, C1, 1, NB, GS_MODE, IN_BITS, IS_BF16, MK)
            key = tl.maximum(key, am1)
        if GS_MODE == GS_MODE_PER_TOKEN:
            amax = abs_from_key(key)
            if not (amax < float("inf")):  # rare: the row holds NaN/Inf, re-read it for its finite maximum
                amax = _nvfp4_finite_amax(x_ptr, row, i, KSF, H, NB, NCHUNK, IN_BITS, IS_BF16)
            gs = nvfp4_gs_from_amax(amax)
            tl.store(gs_ptr + r, gs)
        elif GS_MODE == GS_MODE_PER_ROW:
            gs = tl.load(gs_ptr + r)
        else:
            gs = tl.load(gs_ptr)
        if NCHUNK & 8:
            _nvfp4_seg_store(q_ptr, sf_ptr, ea8, oa8, eb8, ob8, vm8, bad8, gs, r, KSF, M, MT, KT, 0, 8, NB, SWIZZLE, MK)
        if NCHUNK & 4:
            _nvfp4_seg_store(q_ptr, sf_ptr, ea4, oa4, eb4, ob4, vm4, bad4, gs, r, KSF, M, MT, KT, C4, 4, NB, SWIZZLE, MK)
        if NCHUNK & 2:
            _nvfp4_seg_store(q_ptr, sf_ptr, ea2, oa2, eb2, ob2, vm2, bad2, gs, r, KSF, M, MT, KT, C2, 2, NB, SWIZZLE, MK)
        if NCHUNK & 1:
            _nvfp4_seg_store(q_ptr, sf_ptr, ea1, oa1, eb1, ob1, vm1, bad1, gs, r, KSF, M, MT, KT, C1, 1, NB, SWIZZLE, MK)
    else:
        r = tl.program_id(0).to(tl.int64)
        if GS_MODE == GS_MODE_PER_TOKEN:
            acc_e = tl.zeros((NB, 4), tl.uint32)
            acc_o = tl.zeros((NB, 4), tl.uint32)
            for ca in tl.static_range(NCHUNK):
                blk = ca * NB + i
                wa, wb = _nvfp4_load_halves(x_ptr, row, blk, blk < KSF, H, not EVEN_K)
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
        for c in range(NCHUNK):
            blk = c * NB + i
            _nvfp4_quantize_chunk(x_ptr, q_ptr, sf_ptr, row, blk, blk < KSF, gs, H, KSF, M, MT, KT,
                                  IN_BITS, IS_BF16, SWIZZLE, not EVEN_K)  # fmt: skip


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
