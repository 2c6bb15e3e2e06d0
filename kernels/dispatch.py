"""Expert-parallel dispatch / combine kernels.

* :func:`ep_pack_kernel`: BF16 token -> message rows (quantized in registers, BF16 read
  once), stored through a device table of destination base addresses, so the same kernel
  fills a local send buffer or peers' symmetric memory; with a device plan it computes the
  row bases (and whether to send at all) from the exchanged count vectors itself.
* :func:`ep_layout_kernel`: ``topk_ids`` -> per-rank / per-expert counts (straight into the
  vector the count all-gather sends) and each token's row in each destination block.
* :func:`ep_permute_hist_kernel`, :func:`ep_permute_scan_kernel` (v2) and
  :func:`ep_permute_index_kernel`: received rows -> slot of every ``(row, k)`` hitting a
  local expert (deterministic: receive order), and ``masked_m`` (per-chunk expert
  histograms, their exclusive scan per expert, then the slots of each chunk).
* :func:`ep_permute_kernel`: received rows -> masked per-expert layout, one program per
  ``ROWS`` slots (padding slots filled in the same pass), scales straight into the linear
  or 128x4 swizzled layout.
* :func:`ep_combine_expert_kernel`: expert side, FP32 ``sum_k w_k * out[slot]`` over a
  row's local experts (k ascending), one BF16 partial row per received row (the source
  ranks taken in turn, so peer stores spread over every rank's links).
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
    pick,
    swizzled_sf_offset,
    to_bf16_rne,
    unpack_pairs,
)
from .nvlink import (
    _add_partial,
    _bytes_to_words,
    _encode_tile,
    _load_row_f32,
    _partial_tile,
    _row_words,
    _rows_acc,
    _store_row,
)
from .sync import arrive_last

PAYLOAD_NVFP4 = tl.constexpr(0)
PAYLOAD_FP8 = tl.constexpr(1)
PAYLOAD_BF16 = tl.constexpr(2)


@triton.jit
def _rank_row(rank_offset_ptr, table_ptr, row_base_ptr, t, R, r, ROW_BYTES):
    """Token ``t``'s row on rank ``r`` -> (sent at all, byte address ``table[r] + (row_base[r]
    + rank_offset[t, r]) * ROW_BYTES``)."""
    off = tl.load(rank_offset_ptr + t * R + r)
    return off >= 0, tl.load(table_ptr + r) + (tl.load(row_base_ptr + r) + off.to(tl.int64)) * ROW_BYTES


@triton.jit
def _token_rank_rows(rank_offset_ptr, table_ptr, row_base_ptr, t, R, ROW_BYTES, RP: tl.constexpr):
    """Token ``t``'s row on every rank in one round trip -> (rank lanes ``[RP]``, their mask,
    ``rank_offset[t, r]`` (-1 = not sent), the row's address ``table[r] + (row_base[r] +
    offset) * ROW_BYTES``)."""
    rr = tl.arange(0, RP)
    rm = rr < R
    offs = tl.load(rank_offset_ptr + t * R + rr, mask=rm, other=-1)
    rows = tl.load(row_base_ptr + rr, mask=rm, other=0) + offs.to(tl.int64)
    addr = tl.load(table_ptr + rr, mask=rm, other=0) + rows * ROW_BYTES
    return rr, rm, offs, addr


@triton.jit
def _device_plan_rows(plan_ptr, PLAN_W, RANK, MAX_RECV, R, RP: tl.constexpr):
    """A sender's row bases computed from the exchanged count vectors on the device (the
    nvlink backend's send before the host has seen the counts). ``plan`` int64: ``[R,
    PLAN_W]`` vectors ``[code, range_bad, rows to each rank (R), ...]`` of every rank, then
    ``[R]`` timeout words of the exchange. Returns ``([RP]`` int64 first row of this rank's
    block in each receiver (rows of lower source ranks first), ``go``): ``go`` is False if
    any rank reported a bad input, an id out of range, or never sent its vector, or if a
    receiver would get more than ``MAX_RECV`` rows; then nothing may be stored (every rank
    computes the same ``go`` from the same vectors, and the host raises after its sync)."""
    s = tl.arange(0, RP)
    sm = s < R
    cnt = tl.load(plan_ptr + s[:, None] * PLAN_W + 2 + s[None, :], mask=sm[:, None] & sm[None, :], other=0)
    base = tl.sum(tl.where((s < RANK)[:, None], cnt, 0), axis=0)
    worst = tl.max(tl.sum(cnt, axis=0), axis=0)
    code = tl.load(plan_ptr + s * PLAN_W, mask=sm, other=0)
    bad_ids = tl.load(plan_ptr + s * PLAN_W + 1, mask=sm, other=0)
    late = tl.load(plan_ptr + R * PLAN_W + s, mask=sm, other=0)
    nbad = tl.sum(((code != 0) | (bad_ids != 0) | (late != 0)).to(tl.int32), axis=0)
    return base, (nbad == 0) & (worst <= MAX_RECV)


@triton.jit
def _pack_store_v2(
    ids_ptr, w_ptr, rank_offset_ptr, dest_table_ptr, dest_row_base_ptr, t, R, ROW_BYTES, SCALE_OFF, GS_OFF,
    IDS_OFF, SRC_OFF, pw, sw, gsw, plan_ptr, PLAN_W, RANK, MAX_RECV, H: tl.constexpr, K: tl.constexpr,
    PAYLOAD: tl.constexpr, NB: tl.constexpr, RP: tl.constexpr, MW: tl.constexpr, DEVICE_PLAN: tl.constexpr,
):  # fmt: skip
    """The stores of :func:`ep_pack_kernel` with ``V2``: ``pw`` payload (nvfp4 ``[NB]`` int64
    words, fp8 ``[NB, 16]`` int64 words, bf16 ``[NB]`` values), ``sw`` scales (nvfp4 ``[NB //
    8]`` int64 words, fp8 ``[NB]`` int32 FP32 bits), ``gsw`` the nvfp4 gs bits. The metadata
    section (from ``GS_OFF`` for nvfp4, else ``IDS_OFF``) is built as int32 words ``[MW]``
    straight from global memory in that layout. ``DEVICE_PLAN``: row bases and the go /
    no-go from :func:`_device_plan_rows` instead of ``dest_row_base``."""
    if DEVICE_PLAN:
        rr = tl.arange(0, RP)
        rm = rr < R
        base, go = _device_plan_rows(plan_ptr, PLAN_W, RANK, MAX_RECV, R, RP)
        offs = tl.load(rank_offset_ptr + t * R + rr, mask=rm & go, other=-1)
        addr = tl.load(dest_table_ptr + rr, mask=rm, other=0) + (base + offs.to(tl.int64)) * ROW_BYTES
    else:
        rr, rm, offs, addr = _token_rank_rows(rank_offset_ptr, dest_table_ptr, dest_row_base_ptr, t, R, ROW_BYTES, RP)
    MOFF = GS_OFF if PAYLOAD == 0 else IDS_OFF
    I0 = (IDS_OFF - MOFF) // 4  # word of ids[0] in the metadata words
    j = tl.arange(0, MW)
    jid = j - I0
    jw = jid - K
    idw = tl.load(ids_ptr + t * K + jid, mask=(jid >= 0) & (jid < K), other=0).to(tl.int32)
    ww = tl.load(w_ptr + t * K + jw, mask=(jw >= 0) & (jw < K), other=0.0).to(tl.int32, bitcast=True)
    mw = tl.where(jw == K, t.to(tl.int32), tl.where(jw >= 0, ww, tl.where(jid >= 0, idw, gsw)))
    nmw = (SRC_OFF + 4 - MOFF) // 4
    blk = tl.arange(0, NB)
    for r in tl.static_range(RP):
        if pick(offs, rr, r) >= 0:  # lanes past R hold -1
            wp = _row_words(dest_table_ptr, pick(addr, rr, r))
            if PAYLOAD == 0:
                KSF: tl.constexpr = H // 16
                tl.store(wp + blk, pw, mask=blk < KSF)
                sblk = tl.arange(0, NB // 8)
                tl.store(wp + SCALE_OFF // 8 + sblk, sw, mask=sblk < (KSF + 7) // 8)
            elif PAYLOAD == 1:
                tl.store(wp + blk[:, None] * 16 + tl.arange(0, 16)[None, :], pw, mask=(blk < H // 128)[:, None])
                tl.store(wp.to(tl.pointer_type(tl.int32)) + SCALE_OFF // 4 + blk, sw, mask=blk < H // 128)
            else:
                tl.store(wp.to(tl.pointer_type(tl.bfloat16)) + blk, pw, mask=blk < H)
            tl.store(wp.to(tl.pointer_type(tl.int32)) + MOFF // 4 + j, mw, mask=j < nmw)


@triton.jit(do_not_specialize=["PLAN_W", "RANK", "MAX_RECV"])
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
    plan_ptr,  # int64 [R * PLAN_W + R]: exchanged count vectors + timeout words (DEVICE_PLAN only)
    PLAN_W,
    RANK,  # this rank (DEVICE_PLAN only)
    MAX_RECV,  # rows a receive buffer holds (DEVICE_PLAN only)
    K: tl.constexpr,
    KP: tl.constexpr,  # power of two >= K
    PAYLOAD: tl.constexpr,
    GS_MODE: tl.constexpr,  # 0 static (tensor), 1 per row, 2 per token, 3 static (scalar arg); nvfp4 only
    UE8M0: tl.constexpr,  # fp8 only
    NB: tl.constexpr,  # nvfp4: pow2 >= H/16 (>= 8 with V2); fp8: pow2 >= H/128; bf16: pow2 >= H
    V2: tl.constexpr = False,  # aligned word stores, routing loaded once (see below)
    RP: tl.constexpr = 1,  # V2: power of two >= R
    MW: tl.constexpr = 1,  # V2: power of two >= the int32 words of the metadata section
    HC: tl.constexpr = 0,  # V2: H as a constant (store masks of known constancy: vector stores)
    DEVICE_PLAN: tl.constexpr = False,  # V2: row bases from plan_ptr (_device_plan_rows)
):
    """One program per token: read its BF16 row once, quantize in registers, store the
    message row into every destination rank that gets it.

    ``V2`` (same bytes in every field): the destination rows, row bases and offsets of all
    ranks are loaded as ``[RP]`` vectors up front (one round trip instead of three
    dependent ones per rank); every section is stored as words through a pointer whose
    16-byte alignment the compiler can see (:func:`_row_words`: a table address cast to a
    pointer has unknown alignment, so V1 stores bytes / single elements, which over NVLink
    become many small partial writes); the metadata (gs, ids, weights, source index) goes
    out as one int32 vector instead of four stores. V2 also writes the pad bytes that
    round the nvfp4 scale section up to 8 bytes (zeros), never past the section's 16-byte
    end."""
    t = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, KP)
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

    if V2:
        if PAYLOAD == 0:
            pw = _bytes_to_words(packed)  # [NB] one word a block
            sw = _bytes_to_words(tl.reshape(sfb, (NB // 8, 8)))
            gsw = gs.to(tl.int32, bitcast=True)
        elif PAYLOAD == 1:
            pw = tl.reshape(_bytes_to_words(tl.reshape(qb, (NB * 16, 8))), (NB, 16))
            sw = sf.to(tl.int32, bitcast=True)
            gsw = 0
        else:
            pw = xb
            sw = 0
            gsw = 0
        _pack_store_v2(
            ids_ptr, w_ptr, rank_offset_ptr, dest_table_ptr, dest_row_base_ptr, t, R, ROW_BYTES, SCALE_OFF,
            GS_OFF, IDS_OFF, SRC_OFF, pw, sw, gsw, plan_ptr, PLAN_W, RANK, MAX_RECV, HC, K, PAYLOAD, NB, RP, MW,
            DEVICE_PLAN,
        )  # fmt: skip
    else:
        ids = tl.load(ids_ptr + t * K + kk, mask=kk < K, other=-1).to(tl.int32)
        wts = tl.load(w_ptr + t * K + kk, mask=kk < K, other=0.0)
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
def _route_k(ids_ptr, t64, tm, k, E, E_LOCAL, K: tl.constexpr):
    """Column ``k`` of ``topk_ids`` for tokens ``t64`` (mask ``tm``): ``(id, routed, id as
    int32 (0 where not routed), destination rank (-1 where not routed))``."""
    e = tl.load(ids_ptr + t64 * K + k, mask=tm, other=-1)
    ok = tm & (e >= 0) & (e < E)
    e32 = tl.where(ok, e, 0).to(tl.int32)
    return e, ok, e32, tl.where(ok, e32 // E_LOCAL, -1)


@triton.jit(do_not_specialize=["T", "NPROG"])  # T or NPROG == 1 as constexprs: sm_90 TritonGPUCoalesce crashed
def ep_layout_kernel(
    ids_ptr,  # [T, K] int32 / int64 global expert ids (anything outside [0, E) is "not routed")
    meta_ptr,  # [2 + R + E] int64 out: [0, range_bad, per-rank token counts, per-expert pair counts]
    rank_offset_ptr,  # [T, R] int32 out: row of token t in the block for rank r, -1 = not sent
    T,
    R,
    E,
    E_LOCAL,  # E // R
    scratch_ptr,  # PARALLEL: int32 [2 + EP + NPROG * RP], the first 2 + EP zero between launches; else unused
    NPROG,  # PARALLEL: grid size, cdiv(T, BLOCK_T) (at least 1)
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    RP: tl.constexpr,  # power of two >= R
    EP: tl.constexpr,  # power of two >= E
    PARALLEL: tl.constexpr = False,
    KP: tl.constexpr = 1,  # PARALLEL: power of two >= K
    FIX_T: tl.constexpr = 1,  # PARALLEL: tokens a step of the last program's fix-up
    CB: tl.constexpr = 1,  # PARALLEL: chunks a step of the last program's scan
    GPU: tl.constexpr = False,  # PARALLEL: compiled for a GPU (fences), False under the interpreter
):
    """The dispatch layout: ``is_in[t, r]`` from the ``K`` ids of each token, the exclusive
    per-rank prefix over tokens (``rank_offset``), per-expert counts as a histogram.
    ``range_bad`` = 1 if any id lies outside ``[-1, E)``; such ids count as not routed (so a
    bad input never indexes out of bounds). Writes every output (T = 0 included), so nothing
    needs zeroing first.

    Serial (``PARALLEL=False``), grid ``(1,)``: tokens in chunks of ``BLOCK_T``, the prefix
    as an inclusive scan of the chunk plus a running carry, the histogram in registers.

    ``PARALLEL``, grid ``(NPROG,)``: program ``c`` takes tokens ``[c * BLOCK_T, (c + 1) *
    BLOCK_T)``, stores chunk-local offsets and its per-rank totals (``scratch[2 + EP +
    c * RP:]``), adds its histogram and range flag into ``scratch[2:]`` / ``scratch[1]``
    (integer atomics: order-free, so deterministic), then arrives on the counter
    ``scratch[0]`` (:func:`~kernels.sync.arrive_last`). The last program scans the chunk
    totals, adds each chunk's carry to its offsets (chunk 0 has none), writes ``meta`` and
    zeroes the accumulators (the counter resets itself). One launch, no host sync; the
    results are those of the serial kernel bit for bit. (The handover at GPU instead of
    system scope timed the same on an H200: 26-28 us at 4096 tokens.)"""
    r = tl.arange(0, RP)
    ee = tl.arange(0, EP)
    if PARALLEL:
        c = tl.program_id(0)
        acc_ptr = scratch_ptr + 2
        tot_ptr = scratch_ptr + 2 + EP
        # histogram and range flag from one coalesced load of the chunk's ids
        i = tl.arange(0, BLOCK_T * KP)
        ti = c * BLOCK_T + i // KP
        im = (ti < T) & (i % KP < K)
        ev = tl.load(ids_ptr + ti.to(tl.int64) * K + i % KP, mask=im, other=-1)
        okv = im & (ev >= 0) & (ev < E)
        hist = tl.histogram(tl.where(okv, ev, 0).to(tl.int32), EP, mask=okv)
        tl.atomic_add(acc_ptr + ee, hist, mask=(ee < E) & (hist != 0), sem="relaxed")
        if tl.sum((im & ((ev < -1) | (ev >= E))).to(tl.int32), axis=0) != 0:
            tl.atomic_or(scratch_ptr + 1, 1, sem="relaxed")
        t = c * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = t < T
        t64 = t.to(tl.int64)
        inr = tl.zeros((BLOCK_T, RP), tl.int32)
        for k in tl.static_range(K):
            _, _, _, dst = _route_k(ids_ptr, t64, tm, k, E, E_LOCAL, K)
            inr = inr | (dst[:, None] == r[None, :]).to(tl.int32)
        incl = tl.cumsum(inr, axis=0)
        omask = tm[:, None] & (r < R)[None, :]
        tl.store(rank_offset_ptr + t64[:, None] * R + r[None, :], tl.where(inr != 0, incl - 1, -1), mask=omask)
        tl.store(tot_ptr + c * RP + r, tl.sum(inr, axis=0))
        if arrive_last(scratch_ptr, NPROG, GPU):
            # exclusive scan of the chunk totals, in place (the carry of each chunk)
            carry = tl.zeros((RP,), tl.int32)
            c0 = 0
            while c0 < NPROG:
                cc = c0 + tl.arange(0, CB)
                cm = (cc < NPROG)[:, None]
                tp = tot_ptr + cc[:, None] * RP + r[None, :]
                tots = tl.load(tp, mask=cm, other=0, cache_modifier=".cg")
                tl.store(tp, carry[None, :] + tl.cumsum(tots, axis=0) - tots, mask=cm)
                carry += tl.sum(tots, axis=0)
                c0 += CB
            tl.debug_barrier()  # the carries stored above, read back by other threads below
            t0 = BLOCK_T
            while t0 < T:
                tf = t0 + tl.arange(0, FIX_T)
                fm = (tf < T)[:, None] & (r < R)[None, :]
                op = rank_offset_ptr + tf.to(tl.int64)[:, None] * R + r[None, :]
                off = tl.load(op, mask=fm, other=-1, cache_modifier=".cg")
                cp = tot_ptr + (tf // BLOCK_T)[:, None] * RP + r[None, :]
                add = tl.load(cp, mask=fm, other=0, cache_modifier=".cg")
                tl.store(op, off + add, mask=fm & (off >= 0))
                t0 += FIX_T
            hist = tl.load(acc_ptr + ee, mask=ee < E, other=0, cache_modifier=".cg")
            bad_any = tl.load(scratch_ptr + 1, cache_modifier=".cg")
            tl.store(acc_ptr + ee, tl.zeros((EP,), tl.int32), mask=ee < E)
            tl.store(scratch_ptr + 1, 0)
            zero = tl.zeros((), tl.int64)
            tl.store(meta_ptr, zero)
            tl.store(meta_ptr + 1, zero + bad_any)
            tl.store(meta_ptr + 2 + r, carry.to(tl.int64), mask=r < R)
            tl.store(meta_ptr + 2 + R + ee, hist.to(tl.int64), mask=ee < E)
    else:
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
                e, ok, e32, dst = _route_k(ids_ptr, t64, tm, k, E, E_LOCAL, K)
                bad = bad | (tm & ((e < -1) | (e >= E))).to(tl.int32)
                hist += tl.histogram(e32, EP, mask=ok)
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
        tl.store(meta_ptr + 2 + R + ee, hist.to(tl.int64), mask=ee < E)


@triton.jit
def _chunk_experts(recv_ptr, n0, N, ROW_BYTES, IDS_OFF, EXPERT_BASE, E_LOCAL, K: tl.constexpr, KP: tl.constexpr,
                   ROWS: tl.constexpr):  # fmt: skip
    """Rows ``n0 .. n0 + ROWS`` (below ``N``) of the received rows: ``(n [ROWS*KP], k
    [ROWS*KP], m [ROWS*KP], el [ROWS*KP])`` with the ``(n, k)`` pairs flattened row-major,
    ``m`` the pairs that exist (``n < N``, ``k < K``) and ``el`` the local expert of each
    pair, -1 where it is not routed to this rank (or not in ``m``)."""
    i = tl.arange(0, ROWS * KP)
    n = n0 + i // KP
    k = i % KP
    m = (n < N) & (k < K)
    idp = (recv_ptr + n.to(tl.int64) * ROW_BYTES + IDS_OFF).to(tl.pointer_type(tl.int32))
    el = tl.load(idp + k, mask=m, other=-1) - EXPERT_BASE
    return n, k, m, tl.where(m & (el >= 0) & (el < E_LOCAL), el, -1)


@triton.jit
def _chunk_hits(recv_ptr, n0, N, ROW_BYTES, IDS_OFF, EXPERT_BASE, E_LOCAL, K: tl.constexpr, KP: tl.constexpr,
                SUB: tl.constexpr, ELP: tl.constexpr):  # fmt: skip
    """:func:`_chunk_experts` of ``SUB`` rows as ``(n, k, m, onehot [SUB*KP, ELP])``:
    ``onehot[i, e]`` = 1 where pair ``i`` is routed to local expert ``e``."""
    n, k, m, el = _chunk_experts(recv_ptr, n0, N, ROW_BYTES, IDS_OFF, EXPERT_BASE, E_LOCAL, K, KP, SUB)
    onehot = (el[:, None] == tl.arange(0, ELP)[None, :]).to(tl.int32)
    return n, k, m, onehot


@triton.jit
def _rows_received(n_ptr, cap):
    """Rows received, from the device (``*n_ptr`` int64), never more than the capacity ``cap``
    (a receiver overflow stores no rows and raises on the host later)."""
    return tl.minimum(tl.load(n_ptr), cap).to(tl.int32)


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
    n_ptr,  # N_DEV: int64 rows received, read on the device (N is then the capacity)
    K: tl.constexpr,
    KP: tl.constexpr,
    SUB: tl.constexpr,
    ELP: tl.constexpr,  # power of two >= E_LOCAL
    V2: tl.constexpr = False,
    HB: tl.constexpr = 1,  # V2: (row, k) pairs a step (power of two, a multiple of KP)
    N_DEV: tl.constexpr = False,
):
    """Phase 1 of the slot assignment, grid ``(C,)``: per-chunk histogram of local experts
    (each received row's ids are read once). V1 sums one-hot tiles of ``SUB`` rows a step;
    V2 runs ``tl.histogram`` over ``HB // KP`` rows a step (usually the whole chunk: one
    round trip)."""
    c = tl.program_id(0)
    if N_DEV:
        N = _rows_received(n_ptr, N)
    cnt = tl.zeros((ELP,), tl.int32)
    n0 = c * BLOCK_N
    end = tl.minimum(n0 + BLOCK_N, N)
    if V2:
        while n0 < end:
            _, _, _, el = _chunk_experts(recv_ptr, n0, end, ROW_BYTES, IDS_OFF, EXPERT_BASE, E_LOCAL, K, KP, HB // KP)
            ok = el >= 0
            cnt += tl.histogram(tl.where(ok, el, 0), ELP, mask=ok)
            n0 += HB // KP
    else:
        while n0 < end:
            _, _, _, onehot = _chunk_hits(recv_ptr, n0, end, ROW_BYTES, IDS_OFF, EXPERT_BASE, E_LOCAL, K, KP, SUB, ELP)
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
    n_ptr,  # N_DEV: int64 rows received, read on the device (N is then the capacity)
    K: tl.constexpr,
    KP: tl.constexpr,
    SUB: tl.constexpr,
    ELP: tl.constexpr,
    V2: tl.constexpr = False,
    SCANNED: tl.constexpr = False,  # V2 with C > 1: hist holds the carries (see below)
    N_DEV: tl.constexpr = False,
):
    """Phase 2, grid ``(C,)``: chunk ``c`` starts each expert at the sum of the histograms of
    chunks ``< c`` (exclusive scan), then gives each ``(row, k)`` routed to a local expert the
    next slot in ``(row, k)`` order (one-hot cumsum over ``SUB`` rows at a time). So the
    slots are those of a serial scan in receive order (deterministic), every row's ids are
    read twice in all (phase 1 and here) instead of once per local expert, and the work is
    spread over ``C`` programs.

    V1: each program sums the histograms of the chunks before it itself (``c`` round trips);
    the last chunk writes ``masked_m``. V2 with ``C == 1``: the carry is zero and the program
    writes ``masked_m``.

    ``SCANNED`` (V2 with ``C > 1``): :func:`ep_permute_scan_kernel` has already turned
    ``hist`` into the carries and written ``masked_m``; a program takes one ``SUB``-row
    chunk in one step and builds no one-hot tile. A pair's slot is its expert's carry,
    gathered from this chunk's row of ``hist``, plus the pairs of the chunk before it routed
    to the same expert (a ``[SUB*KP, SUB*KP]`` comparison summed along one axis: no scan
    through shared memory; H200, 14.8k rows: 11.4 us, the one-hot scan 22 us). Same slots.

    ``N_DEV`` (both phases): the row count is ``min(*n_ptr, N)``, read on the device (a
    dispatch that does not wait for the count exchange; the grid covers the capacity ``N``
    and chunks past the count store nothing but their zero histogram)."""
    c = tl.program_id(0)
    if N_DEV:
        N = _rows_received(n_ptr, N)
    if SCANNED:
        pn, pk, pmask, pel = _chunk_experts(recv_ptr, c * BLOCK_N, N, ROW_BYTES, IDS_OFF, EXPERT_BASE, E_LOCAL, K, KP,
                                            SUB)
        phit = pel >= 0
        pi = tl.arange(0, SUB * KP)
        psame = (pel[None, :] == pel[:, None]) & (pi[None, :] < pi[:, None])
        pslot = tl.load(hist_ptr + c * ELP + pel, mask=phit, other=0) + tl.sum(psame.to(tl.int32), axis=1)
        pout = tl.where(phit & (pslot < MAX_M), pel * MAX_M + pslot, -1)
        tl.store(slot_map_ptr + pn.to(tl.int64) * K + pk, pout, mask=pmask)
        tl.store(slot_src_ptr + pout, pn * K + pk, mask=pmask & (pout >= 0))
    else:
        e = tl.arange(0, ELP)
        carry = tl.zeros((ELP,), tl.int32)
        if not V2:
            j = 0
            while j < c:
                carry += tl.load(hist_ptr + j * ELP + e)
                j += 1
        n0 = c * BLOCK_N
        end = tl.minimum(n0 + BLOCK_N, N)
        while n0 < end:
            n, k, pm, onehot = _chunk_hits(recv_ptr, n0, end, ROW_BYTES, IDS_OFF, EXPERT_BASE, E_LOCAL, K, KP, SUB, ELP)
            before = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of this sub-block, per expert
            slot = tl.sum(onehot * (carry[None, :] + before), axis=1)
            el = tl.sum(onehot * e[None, :], axis=1)
            hit = tl.sum(onehot, axis=1) != 0
            out = tl.where(hit & (slot < MAX_M), el * MAX_M + slot, -1)
            tl.store(slot_map_ptr + n.to(tl.int64) * K + k, out, mask=pm)
            tl.store(slot_src_ptr + out, n * K + k, mask=pm & (out >= 0))
            carry += tl.sum(onehot, axis=0)
            n0 += SUB
        if c == NUM_CHUNKS - 1:
            tl.store(masked_m_ptr + e, carry, mask=e < E_LOCAL)


@triton.jit
def ep_permute_scan_kernel(
    hist_ptr,  # [C, ELP] int32: per-chunk expert histograms in, exclusive prefix over chunks out
    masked_m_ptr,  # [E_local] int32 out: totals
    C,
    E_LOCAL,
    ELP: tl.constexpr,
    CB: tl.constexpr,  # chunks a step (power of two)
):
    """V2 phase 1b, grid ``(ELP,)``: expert ``e``'s column of ``hist`` becomes its exclusive
    prefix over chunks (the carry each chunk of the index phase starts from), in place, and
    the column total is ``masked_m[e]``. Columns are independent, so the scan is spread
    over experts and takes ``C / CB`` steps instead of the index phase's ``c`` loads per
    program."""
    e = tl.program_id(0)
    carry = tl.zeros((), tl.int32)
    c0 = 0
    while c0 < C:
        cc = c0 + tl.arange(0, CB)
        hp = hist_ptr + cc * ELP + e
        cm = cc < C
        h = tl.load(hp, mask=cm, other=0)
        tl.store(hp, carry + tl.cumsum(h, axis=0) - h, mask=cm)
        carry += tl.sum(h, axis=0)
        c0 += CB
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
    SF_WORDS: tl.constexpr = False,  # nvfp4 with KSF % 4 == 0 (and 4-byte aligned rows): scales as words
    QUAD: tl.constexpr = False,  # SWIZZLE + SF_WORDS + ROWS == 4: slots m, m + 32, m + 64, m + 96
):
    """Grid ``(E_local * MAX_M / ROWS,)``: ``ROWS`` consecutive slots of one expert. Used
    slots (``< masked_m``) gather their received row (payload, scales, gs, the pair's
    weight); padding slots get scales 0, gs 1, weight 0 (their payload is left as is). So
    every output but the payload needs no fill before.

    ``QUAD``: a program takes the four slots ``m + 32 q`` (q = 0..3) of a 128-slot tile
    instead of four consecutive ones: their scale words are adjacent in the 128x4 layout,
    so each scale column goes out as one 16-byte store instead of four scattered 4-byte
    ones (H200, the EP4 receiver's 32.6k slots: 75.6 -> 72.6 us; linear scales: 64 us)."""
    pid = tl.program_id(0).to(tl.int64)
    if QUAD:
        slot = (pid // 32) * 128 + pid % 32 + 32 * tl.arange(0, 4)
        s0 = (pid // 32) * 128
    else:
        s0 = pid * ROWS
        slot = s0 + tl.arange(0, ROWS)
    e = s0 // MAX_M
    m = slot - e * MAX_M
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
        if SF_WORDS:
            # KSF % 4 == 0: four scales a 32-bit word in both layouts (k % 4 is innermost in
            # the 128x4 tile too), a quarter of the byte path's stores
            jw = tl.arange(0, SF_BLOCK // 4)
            wm = (jw < KSF // 4)[None, :]
            sfw = tl.load((row + SCALE_OFF).to(tl.pointer_type(tl.int32))[:, None] + jw[None, :],
                          mask=real[:, None] & wm, other=0)  # fmt: skip
            if QUAD:  # [SFW, 4]: the four slots' words of a column are one 16-byte chunk
                base = ((e * MT + s0 % MAX_M // 128) * KT + jw) * 128 + pid % 32 * 4
                sf_off = base[:, None] + tl.arange(0, 4)[None, :]
                tl.store(sf_ptr.to(tl.pointer_type(tl.int32)) + sf_off, tl.trans(sfw), mask=tl.trans(wm))
            else:
                if SWIZZLE:
                    m64 = m.to(tl.int64)[:, None]
                    sf_off = ((e * MT + m64 // 128) * KT + jw[None, :]) * 128 + (m64 % 32) * 4 + (m64 % 128) // 32
                else:
                    sf_off = slot[:, None] * (SF_COLS // 4) + jw[None, :]
                tl.store(sf_ptr.to(tl.pointer_type(tl.int32)) + sf_off, sfw, mask=wm & (m >= 0)[:, None])
        else:
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
def _expert_acc(
    eo_ptr, slot_map_ptr, sw_ptr, n, offs, om, acc, H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, V2: tl.constexpr
):
    """FP32 ``acc = acc + w_k * float(out[slot_k])`` over the row's local ``k`` ascending
    (``offs``: columns of the tile, ``om`` their mask). V1 branches on each slot before its
    loads (a chain of dependent round trips); V2 issues every slot's loads unconditionally
    (masked) before the first sum and skips a non-local ``k`` with a select, so the sum
    is the same bits."""
    if V2:
        kk = tl.arange(0, KP)
        slots = tl.load(slot_map_ptr + n * K + kk, mask=kk < K, other=-1)
        acc = _rows_acc(eo_ptr, sw_ptr, slots, kk, offs, om, acc, H, K)
    else:
        for k in tl.static_range(K):
            slot = tl.load(slot_map_ptr + n * K + k)
            if slot >= 0:
                w = tl.load(sw_ptr + slot)
                v = tl.load(eo_ptr + slot.to(tl.int64) * H + offs, mask=om, other=0.0).to(tl.float32)
                acc = acc + w * v
    return acc


@triton.jit
def _rank_rows(n, recv_end_ptr, row_shift_ptr, out_table_ptr, R, V2: tl.constexpr, RP: tl.constexpr):
    """``(row, base)`` of received row ``n``: its row at the source and the base address of
    the source's buffer. V2 loads the three ``[R]`` tables at once (one round trip)."""
    if V2:
        rr = tl.arange(0, RP)
        rm = rr < R
        ends = tl.load(recv_end_ptr + rr, mask=rm, other=0)
        s = tl.sum((rm & (n >= ends)).to(tl.int32), axis=0)
        row = n + pick(tl.load(row_shift_ptr + rr, mask=rm, other=0), rr, s)
        base = pick(tl.load(out_table_ptr + rr, mask=rm, other=0), rr, s)
    else:
        s = _source_of(n, recv_end_ptr, R)
        row = n + tl.load(row_shift_ptr + s)
        base = tl.load(out_table_ptr + s)
    return row, base


@triton.jit(do_not_specialize=["ROT"])
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
    V2: tl.constexpr = False,  # loads hoisted (_expert_acc, _rank_rows), 16-byte stores (bf16 wire)
    RP: tl.constexpr = 1,  # V2: power of two >= R
    KP: tl.constexpr = 1,  # V2: power of two >= K
    SPREAD: tl.constexpr = False,  # program p -> row p // R of source (p + ROT) % R (see below)
    ROT=0,  # SPREAD: this rank
):
    """Expert side of combine, one received row ``n`` a program: FP32 ``acc = acc + w_k *
    float(out[slot])`` over the row's local ``k`` ascending, one BF16 rounding (RNE); the
    bf16 wire stores it, the fp8 / nvfp4 wires quantize that BF16 row per token (as the
    dispatch quantizes a token: ``gs = 2688 / amax`` for nvfp4) and store the message row.
    V1 stores the bf16 row through a table address cast to a pointer (unknown alignment:
    2-byte stores); V2 through :func:`_row_words` (16-byte stores: rows are multiples of
    16 bytes at 16-byte aligned bases).

    Program order: without ``SPREAD`` program ``n`` takes received row ``n``, so the
    programs running at any moment store to one source rank (rows are grouped by source),
    and every rank stores to the same one: its links take all the traffic while the other
    ranks' links idle. ``SPREAD`` (grid ``R * max_s count[s]``): program ``p`` takes row
    ``p // R`` of source ``(p + ROT) % R`` (nothing past that source's rows), so the stores
    of neighbouring programs go to every rank in turn, each rank starting with a different
    one. Same rows, same bits."""
    if SPREAD:
        p = tl.program_id(0)
        src = (p + ROT) % R
        start = tl.load(recv_end_ptr + src - 1, mask=src > 0, other=0)
        n = start + p // R
        live = n < tl.load(recv_end_ptr + src)
        row = n + tl.load(row_shift_ptr + src)
        base = tl.load(out_table_ptr + src)
    else:
        n = tl.program_id(0).to(tl.int64)
        live = n >= 0
        row, base = _rank_rows(n, recv_end_ptr, row_shift_ptr, out_table_ptr, R, V2, RP)
    if not live:
        return
    if CPAYLOAD == 2:
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = h < H
        acc = _expert_acc(eo_ptr, slot_map_ptr, sw_ptr, n, h, hm, tl.zeros((BLOCK_H,), tl.float32), H, K, KP, V2)
        if V2:
            dst = _row_words(out_table_ptr, base + row * CROW_BYTES).to(tl.pointer_type(tl.bfloat16))
        else:
            dst = base.to(tl.pointer_type(tl.bfloat16)) + row * H
        tl.store(dst + h, to_bf16_rne(acc), mask=hm)
    else:
        BS: tl.constexpr = 16 if CPAYLOAD == 0 else 128
        blk = tl.arange(0, NB)
        offs = blk[:, None] * BS + tl.arange(0, BS)[None, :]
        om = (blk < H // BS)[:, None]
        acc = _expert_acc(eo_ptr, slot_map_ptr, sw_ptr, n, offs, om, tl.zeros((NB, BS), tl.float32), H, K, KP, V2)
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
    NB: tl.constexpr,  # quantized wires: blocks a program (grid (T, cdiv(H / block, NB)))
    CROW_BYTES: tl.constexpr,
    CSCALE_OFF: tl.constexpr,
    V2: tl.constexpr = False,  # tables loaded once as [RP] vectors; bf16 rows read 16 bytes at a time
    RP: tl.constexpr = 1,  # V2: power of two >= R
):
    """Source side: FP32 ``acc = acc + float(partial_r)`` over ranks ascending (a quantized
    partial is dequantized to FP32 first: ``e2m1 * sf / gs`` or ``e4m3 * scale``), one BF16
    rounding; a token sent nowhere gets zeros. V2: the rank offsets, row bases and
    addresses of all ranks in one round trip; the bf16 wire loads every rank's row
    (masked) before the first sum, through :func:`_row_words` (V1: 2-byte loads)."""
    t = tl.program_id(0).to(tl.int64)
    if V2:
        rr, rm, offs_r, addr_r = _token_rank_rows(rank_offset_ptr, src_table_ptr, row_base_ptr, t, R, CROW_BYTES, RP)
    # quantized wires: blocks [b0, b0 + NB) of the row (the dequantization needs no whole-row value)
    cols, cm, acc, b0 = _partial_tile(tl.program_id(1), H, CPAYLOAD, BLOCK_H, NB)
    if V2:
        for r in tl.static_range(RP):
            acc = _add_partial(acc, src_table_ptr, pick(addr_r, rr, r), pick(offs_r, rr, r) >= 0, cols, cm, H,
                               CPAYLOAD, NB, CSCALE_OFF, b0)  # fmt: skip
    else:
        r = 0
        while r < R:
            sent, addr = _rank_row(rank_offset_ptr, src_table_ptr, row_base_ptr, t, R, r, CROW_BYTES)
            if sent:
                if CPAYLOAD == 2:
                    acc = acc + tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + cols, mask=cm, other=0.0).to(tl.float32)
                else:
                    acc = acc + _load_row_f32(src_table_ptr, addr, H, CPAYLOAD, NB, CSCALE_OFF, b0)
            r += 1
    tl.store(y_ptr + t * H + cols, to_bf16_rne(acc), mask=cm)
