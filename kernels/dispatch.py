"""Expert-parallel dispatch / combine kernels.

* :func:`ep_pack_kernel`: BF16 token -> message rows (quantized in registers, BF16 read
  once), stored through a device table of destination base addresses, so the same kernel
  fills a local send buffer or peers' symmetric memory.
* :func:`ep_layout_kernel`: ``topk_ids`` -> per-rank / per-expert counts (straight into the
  vector the count all-gather sends) and each token's row in each destination block.
* :func:`ep_permute_index_kernel`: received rows -> slot of every ``(row, k)`` hitting a
  local expert (deterministic: receive order), and ``masked_m``.
* :func:`ep_permute_kernel`: received rows -> masked per-expert layout, one program per
  ``ROWS`` slots (padding slots filled in the same pass), scales straight into the linear
  or 128x4 swizzled layout.
* :func:`ep_combine_expert_kernel`: expert side, FP32 ``sum_k w_k * out[slot]`` over a
  row's local experts (k ascending), one BF16 partial row per received row.
* :func:`ep_combine_source_kernel`: source side, FP32 sum of a token's per-rank partial
  rows in rank order, BF16 out.

Message row byte layout: ``fp4comm/ep/message.py``. All row offsets are int64. Loops with
runtime bounds are ``while`` loops: Triton 3.6's interpreter holds scalars as 1-element
numpy arrays, which numpy 2 refuses as ``range()`` bounds. BF16 results are rounded with
``to_bf16_rne`` (the interpreter's cast truncates).
Reductions are written ``acc = acc + w * v``; launch them with ``enable_fp_fusion=False``
so the GPU rounds the product and the sum separately, like the plain-torch reference.
"""

import triton
import triton.language as tl

from .common import (
    fp8_block_quantize_tile,
    nvfp4_global_scale,
    nvfp4_pair_stats,
    nvfp4_quantize_pairs,
    unpack_pairs,
    swizzled_sf_offset,
    to_bf16_rne,
)
from .nvlink import _encode_tile, _load_row_f32, _store_row

PAYLOAD_NVFP4 = tl.constexpr(0)
PAYLOAD_FP8 = tl.constexpr(1)
PAYLOAD_BF16 = tl.constexpr(2)


@triton.jit
def ep_pack_kernel(
    x_ptr,  # [T, H] bf16, rows contiguous
    ids_ptr,  # [T, K] int32 / int64, global expert ids
    w_ptr,  # [T, K] fp32
    gs_ptr,  # fp32: [1] static (GS_MODE 0) or [T] per row (GS_MODE 1); unused otherwise
    gs_value,  # fp32 scalar: static gs given as a number (GS_MODE 3), no device copy
    rank_offset_ptr,  # [T, R] int32: row of token t in the block for rank r, -1 = not sent
    dest_table_ptr,  # [R] int64: base address of the block of rows for rank r
    dest_row_base_ptr,  # [R] int64: first row of this rank's block at that address
    R,
    H,
    ROW_BYTES,
    SCALE_OFF,
    GS_OFF,
    IDS_OFF,
    W_OFF,
    SRC_OFF,
    K: tl.constexpr,
    KP: tl.constexpr,  # power of two >= K
    PAYLOAD: tl.constexpr,
    GS_MODE: tl.constexpr,  # 0 static (tensor), 1 per row, 2 per token, 3 static (scalar arg); nvfp4 only
    UE8M0: tl.constexpr,  # fp8 only
    NB: tl.constexpr,  # nvfp4: pow2 >= H/16; fp8: pow2 >= H/128; bf16: pow2 >= H
):
    t = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, KP)
    ids = tl.load(ids_ptr + t * K + kk, mask=kk < K, other=-1).to(tl.int32)
    wts = tl.load(w_ptr + t * K + kk, mask=kk < K, other=0.0)
    if PAYLOAD == 0:
        # the BF16 row is read as int32 words holding element pairs (see kernels/quant.py):
        # codes pack into bytes elementwise, no reshape/split layout conversions
        KSF = H // 16
        blk = tl.arange(0, NB)
        bmask = blk < KSF
        qoffs = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
        words = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + t * (H // 2) + qoffs, mask=bmask[:, None], other=0)
        even, odd = unpack_pairs(words, 16, True)
        vmax, bad = nvfp4_pair_stats(even, odd)
        if GS_MODE == 2:
            gs = nvfp4_global_scale(vmax)
        elif GS_MODE == 1:
            gs = tl.load(gs_ptr + t)
        elif GS_MODE == 3:
            gs = tl.zeros((), tl.float32) + gs_value
        else:
            gs = tl.load(gs_ptr)
        packed, sfb = nvfp4_quantize_pairs(even, odd, vmax, bad, gs)
    elif PAYLOAD == 1:
        NBLK = H // 128
        blk = tl.arange(0, NB)
        bmask = blk < NBLK
        offs = blk[:, None] * 128 + tl.arange(0, 128)[None, :]
        xf = tl.load(x_ptr + t * H + offs, mask=bmask[:, None], other=0.0).to(tl.float32)
        qb, sf = fp8_block_quantize_tile(xf, UE8M0, False)
        qb = qb.to(tl.uint8)
    else:
        hh = tl.arange(0, NB)
        hmask = hh < H
        xb = tl.load(x_ptr + t * H + hh, mask=hmask, other=0.0)

    r = 0
    while r < R:
        off = tl.load(rank_offset_ptr + t * R + r)
        if off >= 0:
            row = tl.load(dest_row_base_ptr + r) + off.to(tl.int64)
            base = tl.load(dest_table_ptr + r).to(tl.pointer_type(tl.uint8)) + row * ROW_BYTES
            if PAYLOAD == 0:
                tl.store(base + qoffs, packed, mask=bmask[:, None])
                tl.store(base + SCALE_OFF + blk, sfb, mask=bmask)
                tl.store((base + GS_OFF).to(tl.pointer_type(tl.float32)), gs)
            elif PAYLOAD == 1:
                tl.store(base + offs, qb, mask=bmask[:, None])
                tl.store((base + SCALE_OFF).to(tl.pointer_type(tl.float32)) + blk, sf, mask=bmask)
            else:
                tl.store(base.to(tl.pointer_type(tl.bfloat16)) + hh, xb, mask=hmask)
            tl.store((base + IDS_OFF).to(tl.pointer_type(tl.int32)) + kk, ids, mask=kk < K)
            tl.store((base + W_OFF).to(tl.pointer_type(tl.float32)) + kk, wts, mask=kk < K)
            tl.store((base + SRC_OFF).to(tl.pointer_type(tl.int32)), t.to(tl.int32))
        r += 1


@triton.jit
def ep_layout_kernel(
    ids_ptr,  # [T, K] int32 / int64 global expert ids (anything outside [0, E) is "not routed")
    meta_ptr,  # [2 + R + E] int64 out: [0, range_bad, per-rank token counts, per-expert pair counts]
    rank_offset_ptr,  # [T, R] int32 out: row of token t in the block for rank r, -1 = not sent
    T,
    R,
    E,
    E_LOCAL,  # E // R
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    RP: tl.constexpr,  # power of two >= R
    EP: tl.constexpr,  # power of two >= E
):
    """The dispatch layout in one program, grid ``(1,)``: tokens in chunks of ``BLOCK_T``,
    ``is_in[t, r]`` from the ``K`` ids of each token, the exclusive per-rank prefix over tokens
    as an inclusive scan of the chunk plus a running carry, per-expert counts as a histogram
    kept in registers. ``range_bad`` = 1 if any id lies outside ``[-1, E)``; such ids count as
    not routed (so a bad input never indexes out of bounds). Writes every output (T = 0
    included), so nothing needs zeroing first."""
    r = tl.arange(0, RP)
    carry = tl.zeros((RP,), tl.int32)
    hist = tl.zeros((EP,), tl.int32)
    bad = tl.zeros((BLOCK_T,), tl.int32)
    t0 = 0
    while t0 < T:
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        t64 = t.to(tl.int64)
        inr = tl.zeros((BLOCK_T, RP), tl.int32)
        for k in tl.static_range(K):
            e = tl.load(ids_ptr + t64 * K + k, mask=tm, other=-1)
            bad = bad | (tm & ((e < -1) | (e >= E))).to(tl.int32)
            ok = tm & (e >= 0) & (e < E)
            e32 = tl.where(ok, e, 0).to(tl.int32)
            hist += tl.histogram(e32, EP, mask=ok)
            dst = tl.where(ok, e32 // E_LOCAL, -1)
            inr = inr | (dst[:, None] == r[None, :]).to(tl.int32)
        incl = tl.cumsum(inr, axis=0)
        off = tl.where(inr != 0, carry[None, :] + incl - 1, -1)
        tl.store(rank_offset_ptr + t64[:, None] * R + r[None, :], off, mask=tm[:, None] & (r < R)[None, :])
        carry += tl.sum(inr, axis=0)
        t0 += BLOCK_T
    zero = tl.zeros((), tl.int64)
    tl.store(meta_ptr, zero)
    tl.store(meta_ptr + 1, zero + tl.max(bad, axis=0))
    tl.store(meta_ptr + 2 + r, carry.to(tl.int64), mask=r < R)
    ee = tl.arange(0, EP)
    tl.store(meta_ptr + 2 + R + ee, hist.to(tl.int64), mask=ee < E)


@triton.jit
def _chunk_hits(recv_ptr, n0, N, ROW_BYTES, IDS_OFF, EXPERT_BASE, E_LOCAL, K: tl.constexpr, KP: tl.constexpr,
                SUB: tl.constexpr, ELP: tl.constexpr):  # fmt: skip
    """Rows ``n0 .. n0 + SUB`` of the received rows: ``(n [SUB*KP], k [SUB*KP], onehot
    [SUB*KP, ELP])`` with the ``(n, k)`` pairs flattened row-major and ``onehot[i, e]`` = 1
    where pair ``i`` is routed to local expert ``e``."""
    i = tl.arange(0, SUB * KP)
    n = n0 + i // KP
    k = i % KP
    m = (n < N) & (k < K)
    idp = (recv_ptr + n.to(tl.int64) * ROW_BYTES + IDS_OFF).to(tl.pointer_type(tl.int32))
    el = tl.load(idp + k, mask=m, other=-1) - EXPERT_BASE
    el = tl.where(m & (el >= 0) & (el < E_LOCAL), el, -1)
    onehot = (el[:, None] == tl.arange(0, ELP)[None, :]).to(tl.int32)
    return n, k, onehot


@triton.jit
def ep_permute_hist_kernel(
    recv_ptr,  # [N, ROW_BYTES] uint8 received rows
    hist_ptr,  # [C, ELP] int32 out: pairs of chunk c routed to local expert e
    N,
    ROW_BYTES,
    IDS_OFF,
    EXPERT_BASE,
    E_LOCAL,
    BLOCK_N,  # rows a chunk (a multiple of SUB)
    K: tl.constexpr,
    KP: tl.constexpr,
    SUB: tl.constexpr,
    ELP: tl.constexpr,  # power of two >= E_LOCAL
):
    """Phase 1 of the slot assignment, grid ``(C,)``: per-chunk histogram of local experts
    (each received row's ids are read once)."""
    c = tl.program_id(0)
    cnt = tl.zeros((ELP,), tl.int32)
    n0 = c * BLOCK_N
    end = tl.minimum(n0 + BLOCK_N, N)
    while n0 < end:
        _, _, onehot = _chunk_hits(recv_ptr, n0, end, ROW_BYTES, IDS_OFF, EXPERT_BASE, E_LOCAL, K, KP, SUB, ELP)
        cnt += tl.sum(onehot, axis=0)
        n0 += SUB
    tl.store(hist_ptr + c * ELP + tl.arange(0, ELP), cnt)


@triton.jit
def ep_permute_index_kernel(
    recv_ptr,  # [N, ROW_BYTES] uint8 received rows
    hist_ptr,  # [C, ELP] int32 from ep_permute_hist_kernel (unread when C == 1)
    slot_map_ptr,  # [N, K] int32 out: e_local * MAX_M + slot, or -1 (not local / past MAX_M)
    slot_src_ptr,  # [E_local * MAX_M] int32 out: n * K + k of the pair in each used slot
    masked_m_ptr,  # [E_local] int32 out (true counts)
    N,
    ROW_BYTES,
    IDS_OFF,
    EXPERT_BASE,  # global id of local expert 0
    E_LOCAL,
    MAX_M,
    BLOCK_N,
    NUM_CHUNKS,
    K: tl.constexpr,
    KP: tl.constexpr,
    SUB: tl.constexpr,
    ELP: tl.constexpr,
):
    """Phase 2, grid ``(C,)``: chunk ``c`` starts each expert at the sum of the histograms of
    chunks ``< c`` (exclusive scan), then gives each ``(row, k)`` routed to a local expert the
    next slot in ``(row, k)`` order (one-hot cumsum over ``SUB`` rows at a time). So the
    slots are those of a serial scan in receive order (deterministic), every row's ids are
    read twice in all (phase 1 and here) instead of once per local expert, and the work is
    spread over ``C`` programs. The last chunk writes ``masked_m``."""
    c = tl.program_id(0)
    e = tl.arange(0, ELP)
    carry = tl.zeros((ELP,), tl.int32)
    j = 0
    while j < c:
        carry += tl.load(hist_ptr + j * ELP + e)
        j += 1
    n0 = c * BLOCK_N
    end = tl.minimum(n0 + BLOCK_N, N)
    while n0 < end:
        n, k, onehot = _chunk_hits(recv_ptr, n0, end, ROW_BYTES, IDS_OFF, EXPERT_BASE, E_LOCAL, K, KP, SUB, ELP)
        before = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of this sub-block, per expert
        slot = tl.sum(onehot * (carry[None, :] + before), axis=1)
        el = tl.sum(onehot * e[None, :], axis=1)
        hit = tl.sum(onehot, axis=1) != 0
        out = tl.where(hit & (slot < MAX_M), el * MAX_M + slot, -1)
        pm = (n < end) & (k < K)
        tl.store(slot_map_ptr + n.to(tl.int64) * K + k, out, mask=pm)
        tl.store(slot_src_ptr + out, n * K + k, mask=pm & (out >= 0))
        carry += tl.sum(onehot, axis=0)
        n0 += SUB
    if c == NUM_CHUNKS - 1:
        tl.store(masked_m_ptr + e, carry, mask=e < E_LOCAL)


@triton.jit
def ep_permute_kernel(
    recv_ptr,  # [N, ROW_BYTES] uint8
    slot_src_ptr,  # [E_local * MAX_M] int32: n * K + k of each used slot
    masked_m_ptr,  # [E_local] int32: used slots per expert (may exceed MAX_M: the rest dropped)
    x_ptr,  # masked payload viewed as int32 words [E_local * MAX_M, PAYLOAD_WORDS]
    sf_ptr,  # nvfp4: uint8 linear [E_local*MAX_M, SF_COLS] or swizzled; fp8: fp32 [E_local*MAX_M, KSF]
    gs_out_ptr,  # [E_local * MAX_M] fp32 (nvfp4)
    w_out_ptr,  # [E_local * MAX_M] fp32
    ROW_BYTES,
    PAYLOAD_WORDS,  # payload bytes / 4
    SCALE_OFF,
    GS_OFF,
    W_OFF,
    KSF,  # scale elements per row
    SF_COLS,  # scale columns of the output (nvfp4 swizzled: KSF rounded up to 4; else KSF)
    MAX_M,
    MT,  # MAX_M / 128
    KT,  # ceil(KSF / 4)
    K: tl.constexpr,
    PAYLOAD: tl.constexpr,
    SWIZZLE: tl.constexpr,
    ROWS: tl.constexpr,  # slots a program (divides MAX_M)
    BLOCK_W: tl.constexpr,
    SF_BLOCK: tl.constexpr,  # pow2 >= SF_COLS
):
    """Grid ``(E_local * MAX_M / ROWS,)``: ``ROWS`` consecutive slots of one expert. Used
    slots (``< masked_m``) gather their received row (payload, scales, gs, the pair's
    weight); padding slots get scales 0, gs 1, weight 0 (their payload is left as is). So
    every output but the payload needs no fill before."""
    s0 = tl.program_id(0).to(tl.int64) * ROWS
    e = s0 // MAX_M
    m = s0 % MAX_M + tl.arange(0, ROWS)
    slot = s0 + tl.arange(0, ROWS)
    real = m < tl.load(masked_m_ptr + e)
    src = tl.load(slot_src_ptr + slot, mask=real, other=0)
    n = (src // K).to(tl.int64)
    k = src % K
    row = recv_ptr + n * ROW_BYTES
    c = 0
    while c < PAYLOAD_WORDS:
        w = c + tl.arange(0, BLOCK_W)
        wm = real[:, None] & (w < PAYLOAD_WORDS)[None, :]
        v = tl.load(row.to(tl.pointer_type(tl.int32))[:, None] + w[None, :], mask=wm)
        tl.store(x_ptr + slot[:, None] * PAYLOAD_WORDS + w[None, :], v, mask=wm)
        c += BLOCK_W
    j = tl.arange(0, SF_BLOCK)
    if PAYLOAD == 0:
        sfb = tl.load(row[:, None] + SCALE_OFF + j[None, :], mask=real[:, None] & (j < KSF)[None, :], other=0)
        if SWIZZLE:
            sf_off = swizzled_sf_offset(e, m.to(tl.int64)[:, None], j.to(tl.int64)[None, :], MT, KT)
        else:
            sf_off = slot[:, None] * SF_COLS + j[None, :]
        tl.store(sf_ptr + sf_off, sfb, mask=(j < SF_COLS)[None, :] & (m >= 0)[:, None])
        gs = tl.load((row + GS_OFF).to(tl.pointer_type(tl.float32)), mask=real, other=1.0)
        tl.store(gs_out_ptr + slot, gs)
    elif PAYLOAD == 1:
        jm = (j < KSF)[None, :]
        sf = tl.load((row + SCALE_OFF).to(tl.pointer_type(tl.float32))[:, None] + j[None, :], mask=real[:, None] & jm, other=0.0)
        tl.store(sf_ptr + slot[:, None] * KSF + j[None, :], sf, mask=jm & (m >= 0)[:, None])
    wt = tl.load((row + W_OFF).to(tl.pointer_type(tl.float32)) + k, mask=real, other=0.0)
    tl.store(w_out_ptr + slot, wt)


@triton.jit
def _source_of(n, recv_end_ptr, R):
    """Source rank of received row ``n``: rows are grouped by source, ``recv_end[s]`` is the
    end (exclusive) of source ``s``'s block."""
    s = tl.zeros((), tl.int32)
    r = 0
    while r < R:
        s += (n >= tl.load(recv_end_ptr + r)).to(tl.int32)
        r += 1
    return s


@triton.jit
def ep_combine_expert_kernel(
    eo_ptr,  # [E_local * MAX_M, H] bf16 expert outputs
    slot_map_ptr,  # [N, K] int32
    sw_ptr,  # [E_local * MAX_M] fp32 weight of each slot
    out_table_ptr,  # [R] int64: base address of the combine rows going to source rank s
    row_shift_ptr,  # [R] int64: received row n of source s goes to row n + row_shift[s] there
    recv_end_ptr,  # [R] int64: inclusive prefix sum of the rows received from each source
    R,
    H: tl.constexpr,
    K: tl.constexpr,
    CPAYLOAD: tl.constexpr,  # combine wire: 0 nvfp4, 1 fp8, 2 bf16
    BLOCK_H: tl.constexpr,  # bf16 wire: columns a program (grid (N, cdiv(H, BLOCK_H)))
    NB: tl.constexpr,  # quantized wires: blocks of the row tile ([NB, 16] nvfp4, [NB, 128] fp8)
    CROW_BYTES: tl.constexpr,  # bytes of one combine row
    CSCALE_OFF: tl.constexpr,
):
    """Expert side of combine, one received row ``n`` a program: FP32 ``acc = acc + w_k *
    float(out[slot])`` over the row's local ``k`` ascending, one BF16 rounding (RNE); the
    bf16 wire stores it, the fp8 / nvfp4 wires quantize that BF16 row per token (as the
    dispatch quantizes a token: ``gs = 2688 / amax`` for nvfp4) and store the message row."""
    n = tl.program_id(0).to(tl.int64)
    s = _source_of(n, recv_end_ptr, R)
    row = n + tl.load(row_shift_ptr + s)
    base = tl.load(out_table_ptr + s)
    if CPAYLOAD == 2:
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = h < H
        acc = tl.zeros((BLOCK_H,), tl.float32)
        for k in tl.static_range(K):
            slot = tl.load(slot_map_ptr + n * K + k)
            if slot >= 0:
                w = tl.load(sw_ptr + slot)
                v = tl.load(eo_ptr + slot.to(tl.int64) * H + h, mask=hm, other=0.0).to(tl.float32)
                acc = acc + w * v
        tl.store(base.to(tl.pointer_type(tl.bfloat16)) + row * H + h, to_bf16_rne(acc), mask=hm)
    else:
        BS: tl.constexpr = 16 if CPAYLOAD == 0 else 128
        blk = tl.arange(0, NB)
        offs = blk[:, None] * BS + tl.arange(0, BS)[None, :]
        om = (blk < H // BS)[:, None]
        acc = tl.zeros((NB, BS), tl.float32)
        for k in tl.static_range(K):
            slot = tl.load(slot_map_ptr + n * K + k)
            if slot >= 0:
                w = tl.load(sw_ptr + slot)
                v = tl.load(eo_ptr + slot.to(tl.int64) * H + offs, mask=om, other=0.0).to(tl.float32)
                acc = acc + w * v
        part = to_bf16_rne(acc).to(tl.float32)
        pw, sw, gs = _encode_tile(part, H, CPAYLOAD, NB)
        _store_row(out_table_ptr, base + row * CROW_BYTES, pw, sw, gs, H, CPAYLOAD, NB, CSCALE_OFF)


@triton.jit
def ep_combine_source_kernel(
    src_table_ptr,  # [R] int64: base address of the combine rows returned from rank r
    row_base_ptr,  # [R] int64: first row of rank r's block at that address
    rank_offset_ptr,  # [T, R] int32: row of token t in rank r's block, -1 = not sent
    y_ptr,  # [T, H] bf16 out
    R,
    H: tl.constexpr,
    CPAYLOAD: tl.constexpr,
    BLOCK_H: tl.constexpr,  # bf16 wire (grid (T, cdiv(H, BLOCK_H)))
    NB: tl.constexpr,  # quantized wires (grid (T,))
    CROW_BYTES: tl.constexpr,
    CSCALE_OFF: tl.constexpr,
):
    """Source side: FP32 ``acc = acc + float(partial_r)`` over ranks ascending (a quantized
    partial is dequantized to FP32 first: ``e2m1 * sf / gs`` or ``e4m3 * scale``), one BF16
    rounding; a token sent nowhere gets zeros."""
    t = tl.program_id(0).to(tl.int64)
    if CPAYLOAD == 2:
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = h < H
        acc = tl.zeros((BLOCK_H,), tl.float32)
        r = 0
        while r < R:
            off = tl.load(rank_offset_ptr + t * R + r)
            if off >= 0:
                row = tl.load(row_base_ptr + r) + off.to(tl.int64)
                base = tl.load(src_table_ptr + r).to(tl.pointer_type(tl.bfloat16))
                acc = acc + tl.load(base + row * H + h, mask=hm, other=0.0).to(tl.float32)
            r += 1
        tl.store(y_ptr + t * H + h, to_bf16_rne(acc), mask=hm)
    else:
        BS: tl.constexpr = 16 if CPAYLOAD == 0 else 128
        blk = tl.arange(0, NB)
        offs = blk[:, None] * BS + tl.arange(0, BS)[None, :]
        acc = tl.zeros((NB, BS), tl.float32)
        r = 0
        while r < R:
            off = tl.load(rank_offset_ptr + t * R + r)
            if off >= 0:
                row = tl.load(row_base_ptr + r) + off.to(tl.int64)
                addr = tl.load(src_table_ptr + r) + row * CROW_BYTES
                acc = acc + _load_row_f32(src_table_ptr, addr, H, CPAYLOAD, NB, CSCALE_OFF)
            r += 1
        tl.store(y_ptr + t * H + offs, to_bf16_rne(acc), mask=(blk < H // BS)[:, None])
