"""Expert-parallel dispatch / combine kernels.

* :func:`ep_pack_kernel`: BF16 token -> message rows (quantized in registers, BF16 read
  once), stored through a device table of destination base addresses, so the same kernel
  fills a local send buffer or peers' symmetric memory.
* :func:`ep_permute_index_kernel`: received rows -> slot of every ``(row, k)`` hitting a
  local expert (deterministic: receive order), and ``masked_m``.
* :func:`ep_permute_kernel`: received rows -> masked per-expert layout, scales straight
  into the linear or 128x4 swizzled layout.
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
    e4m3_encode,
    nvfp4_global_scale,
    nvfp4_pair_stats,
    nvfp4_quantize_pairs,
    unpack_pairs,
    swizzled_sf_offset,
    to_bf16_rne,
    ue8m0_round_up,
)

PAYLOAD_NVFP4 = tl.constexpr(0)
PAYLOAD_FP8 = tl.constexpr(1)
PAYLOAD_BF16 = tl.constexpr(2)


@triton.jit
def ep_pack_kernel(
    x_ptr,  # [T, H] bf16, rows contiguous
    ids_ptr,  # [T, K] int32 / int64, global expert ids
    w_ptr,  # [T, K] fp32
    gs_ptr,  # fp32: [1] static (GS_MODE 0) or [T] per row (GS_MODE 1); unused otherwise
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
    GS_MODE: tl.constexpr,  # 0 static, 1 per row, 2 per token (nvfp4 only)
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
        else:
            gs = tl.load(gs_ptr)
        packed, sfb = nvfp4_quantize_pairs(even, odd, vmax, bad, gs)
    elif PAYLOAD == 1:
        NBLK = H // 128
        blk = tl.arange(0, NB)
        bmask = blk < NBLK
        offs = blk[:, None] * 128 + tl.arange(0, 128)[None, :]
        xf = tl.load(x_ptr + t * H + offs, mask=bmask[:, None], other=0.0).to(tl.float32)
        finite = tl.abs(xf) < float("inf")
        bad = tl.max((~finite).to(tl.int32), axis=1) != 0
        amax = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-4)
        sf = tl.math.div_rn(amax, tl.zeros_like(amax) + 448.0)
        if UE8M0:
            sf = ue8m0_round_up(sf)
        inv = tl.math.div_rn(tl.zeros_like(sf) + 1.0, sf)
        _, qb = e4m3_encode(xf * inv[:, None])
        qb = tl.where(bad[:, None], 0x7F, qb).to(tl.uint8)
        sf = tl.where(bad, float("nan"), sf)
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
def ep_permute_index_kernel(
    recv_ptr,  # [N, ROW_BYTES] uint8 received rows
    slot_map_ptr,  # [N, K] int32, pre-filled with -1; out: e_local * MAX_M + slot
    masked_m_ptr,  # [E_local] int32 out
    N,
    ROW_BYTES,
    IDS_OFF,
    EXPERT_BASE,  # global id of local expert 0
    MAX_M,
    K: tl.constexpr,
    KP: tl.constexpr,  # power of two >= K
    BLOCK_N: tl.constexpr,
):
    """One program per local expert: scan the received rows in order and give each
    ``(row, k)`` routed to this expert the next slot ((row, k) ascending; a row's ids are
    one [BLOCK_N, KP] gather per chunk, 32 contiguous bytes a row)."""
    e = tl.program_id(0)
    eg = EXPERT_BASE + e
    kk = tl.arange(0, KP)
    carry = tl.zeros((), tl.int32)
    start = 0
    while start < N:
        n = start + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & (kk < K)[None, :]
        idp = (recv_ptr + n.to(tl.int64) * ROW_BYTES + IDS_OFF).to(tl.pointer_type(tl.int32))
        hit = (tl.load(idp[:, None] + kk[None, :], mask=mask, other=-1) == eg).to(tl.int32)  # [BLOCK_N, KP]
        row_hits = tl.sum(hit, axis=1)
        before_row = tl.cumsum(row_hits, axis=0) - row_hits
        before_k = tl.cumsum(hit, axis=1) - hit  # earlier k of the same row on this expert
        slot = carry + before_row[:, None] + before_k
        out = slot_map_ptr + n.to(tl.int64)[:, None] * K + kk[None, :]
        tl.store(out, e * MAX_M + slot, mask=(hit != 0) & (slot < MAX_M))
        carry += tl.sum(row_hits, axis=0)
        start += BLOCK_N
    tl.store(masked_m_ptr + e, carry)


@triton.jit
def ep_permute_kernel(
    recv_ptr,  # [N, ROW_BYTES] uint8
    slot_map_ptr,  # [N, K] int32
    x_ptr,  # masked payload viewed as int32 words [E_local * MAX_M, PAYLOAD_WORDS]
    sf_ptr,  # nvfp4: uint8 linear [E_local*MAX_M, KSF] or swizzled; fp8: fp32 [E_local*MAX_M, KSF]
    gs_out_ptr,  # [E_local * MAX_M] fp32 (nvfp4)
    w_out_ptr,  # [E_local * MAX_M] fp32
    ROW_BYTES,
    PAYLOAD_WORDS,  # payload bytes / 4
    SCALE_OFF,
    GS_OFF,
    W_OFF,
    KSF,  # scale elements per row
    MAX_M,
    MT,  # MAX_M / 128
    KT,  # ceil(KSF / 4)
    K: tl.constexpr,
    PAYLOAD: tl.constexpr,
    SWIZZLE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SF_BLOCK: tl.constexpr,  # pow2 >= KSF
):
    n = tl.program_id(0).to(tl.int64)
    row = recv_ptr + n * ROW_BYTES
    src_w = row.to(tl.pointer_type(tl.int32))
    j = tl.arange(0, SF_BLOCK)
    jm = j < KSF
    for k in tl.static_range(K):
        slot = tl.load(slot_map_ptr + n * K + k)
        if slot >= 0:
            s64 = slot.to(tl.int64)
            c = 0
            while c < PAYLOAD_WORDS:
                w = c + tl.arange(0, BLOCK_W)
                wm = w < PAYLOAD_WORDS
                tl.store(x_ptr + s64 * PAYLOAD_WORDS + w, tl.load(src_w + w, mask=wm), mask=wm)
                c += BLOCK_W
            if PAYLOAD == 0:
                sfb = tl.load(row + SCALE_OFF + j, mask=jm)
                if SWIZZLE:
                    sf_off = swizzled_sf_offset(s64 // MAX_M, s64 % MAX_M, j.to(tl.int64), MT, KT)
                else:
                    sf_off = s64 * KSF + j
                tl.store(sf_ptr + sf_off, sfb, mask=jm)
                tl.store(gs_out_ptr + s64, tl.load((row + GS_OFF).to(tl.pointer_type(tl.float32))))
            elif PAYLOAD == 1:
                sf = tl.load((row + SCALE_OFF).to(tl.pointer_type(tl.float32)) + j, mask=jm)
                tl.store(sf_ptr + s64 * KSF + j, sf, mask=jm)
            tl.store(w_out_ptr + s64, tl.load((row + W_OFF).to(tl.pointer_type(tl.float32)) + k))


@triton.jit
def ep_combine_expert_kernel(
    eo_ptr,  # [E_local * MAX_M, H] bf16 expert outputs
    slot_map_ptr,  # [N, K] int32
    sw_ptr,  # [E_local * MAX_M] fp32 weight of each slot
    out_table_ptr,  # [R] int64: base of the bf16 partial rows for source rank s
    src_rank_ptr,  # [N] int32: source rank of received row n
    out_row_ptr,  # [N] int64: row of received row n inside its source's block
    H,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for k in tl.static_range(K):
        slot = tl.load(slot_map_ptr + n * K + k)
        if slot >= 0:
            w = tl.load(sw_ptr + slot)
            v = tl.load(eo_ptr + slot.to(tl.int64) * H + h, mask=hm, other=0.0).to(tl.float32)
            acc = acc + w * v
    s = tl.load(src_rank_ptr + n)
    base = tl.load(out_table_ptr + s).to(tl.pointer_type(tl.bfloat16))
    tl.store(base + tl.load(out_row_ptr + n) * H + h, to_bf16_rne(acc), mask=hm)


@triton.jit
def ep_combine_source_kernel(
    src_table_ptr,  # [R] int64: base of the bf16 partial rows returned from rank r
    rank_offset_ptr,  # [T, R] int32: row of token t in rank r's block, -1 = not sent
    y_ptr,  # [T, H] bf16 out
    R,
    H,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    acc = tl.zeros((BLOCK_H,), tl.float32)
    r = 0
    while r < R:
        off = tl.load(rank_offset_ptr + t * R + r)
        if off >= 0:
            base = tl.load(src_table_ptr + r).to(tl.pointer_type(tl.bfloat16))
            acc = acc + tl.load(base + off.to(tl.int64) * H + h, mask=hm, other=0.0).to(tl.float32)
        r += 1
    tl.store(y_ptr + t * H + h, to_bf16_rne(acc), mask=hm)
