"""Peer-memory send / receive kernels of the ``nvlink`` backend (and of the low-latency
``torch`` fallback, which runs the same kernels against local staging buffers).

Addresses come in as int64 tables (``table[r]`` = base address of rank ``r``'s buffer),
so the same kernel stores into a peer's NVSHMEM memory on GPUs, into an emulated rank's
host tensor under ``TRITON_INTERPRET=1``, or into a local send buffer. Rows move as int64
words (every row section is 8-byte aligned, see ``fp4comm/ep/message.py``).

Payload codes (``PAYLOAD`` / ``CPAYLOAD``): 0 = nvfp4 (tile ``[NB, 16]``, one word of codes
a block), 1 = fp8 (tile ``[NB, 128]``, 16 words a block, FP32 scales), 2 = bf16 (raw words).

Low-latency slots: a row for ``(source token t, top-k index k)`` routed to global expert
``e`` lands in slot ``b*SLOT_B + (e % E_LOCAL)*SLOT_E + src*SLOT_S + pos`` of rank
``e // E_LOCAL``, where ``b`` is the double-buffer parity of the call and ``pos`` the number
of ``(t', k')`` pairs before ``(t, k)`` (row-major) routed to ``e``: so slots of one
(expert, source) hold that source's tokens in order, and the receiver's compaction is
deterministic. In low-latency rows the message's ``src_index`` field holds ``t * K + k``.
Dispatch flags carry ``(sequence << 32) | (T << 16) | count`` (int64: ``T`` the source's token
count, ``count`` its rows for the expert, both < 2^16) and are never reset. Flags are
written with release stores, never with atomics on peer memory (see ``sync.py``).

Low-latency combine reduces on the expert side first: the receive half leaves a token map
(``(sequence << 32) | row`` for every ``(source, t * K + k)`` it laid out) and the sources'
token counts; the combine send sums, per (source, token), the weighted outputs of the
token's local experts (FP32, ``k`` ascending, no FMA) and stores one BF16 partial row (or
its fp8 / nvfp4 encoding) into row ``rank * T_max + t`` of the source's buffer; the source
adds the partials of the ranks its token went to (FP32, ranks ascending). The rounding
order of the high-throughput combine, and one row per (token, rank) on the wire instead
of one per (token, expert).
"""

import triton
import triton.language as tl

from .common import (
    e4m3_decode,
    fp8_block_quantize_tile,
    nvfp4_block_stats,
    nvfp4_dequantize_codes,
    nvfp4_global_scale,
    nvfp4_quantize_tile,
    pick,
    swizzled_sf_offset,
    to_bf16_rne,
)
from .sync import arrive_last, fence_sys, flag_store_release, report_timeout, spin_start, wait_flag_geq

# status slots (int32 [4], local): set by kernels, read by the host
ST_DISPATCH_TIMEOUT = tl.constexpr(0)  # 1 + source rank whose dispatch flag never came
ST_COMBINE_TIMEOUT = tl.constexpr(1)  # 1 + expert rank whose combine flag never came
ST_OVERFLOW = tl.constexpr(2)  # 1 + local expert of a slot region that overflowed
ST_BAD_ID = tl.constexpr(3)  # 1 + a top-k id outside [-1, E)


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _bytes_to_words(b):
    """[N, 8] bytes (any int type, 0..255) -> [N] int64 little-endian words."""
    sh = (tl.arange(0, 8) * 8).to(tl.int64)
    return tl.sum((b.to(tl.int64) & 255) << sh[None, :], axis=1)


@triton.jit
def _words_to_bytes(w):
    """[N] int64 words -> [N, 8] int32 bytes (little-endian)."""
    sh = (tl.arange(0, 8) * 8).to(tl.int64)
    return ((w[:, None] >> sh[None, :]) & 255).to(tl.int32)


@triton.jit
def _row_words(anchor, addr):
    """int64 pointer to the byte address ``addr`` (a row start: always a multiple of 16),
    built as ``anchor`` (an int64 pointer argument, 16-byte aligned) plus an even number
    of words, so the compiler can prove 16-byte alignment and emit vector accesses
    (an address cast from an integer has unknown alignment: 8-byte accesses)."""
    return anchor + (((addr - anchor.to(tl.int64)) >> 4) << 1)


@triton.jit
def _encode_tile(xf, H: tl.constexpr, PAYLOAD: tl.constexpr, NB: tl.constexpr):
    """Quantize one token held as an FP32 tile (nvfp4 ``[NB, 16]``, fp8 ``[NB, 128]``; blocks
    past ``H`` zero) into message words: see :func:`_encode_row` (``PAYLOAD`` 0 or 1 only)."""
    if PAYLOAD == 0:
        vmax, bad = nvfp4_block_stats(xf)
        gs = nvfp4_global_scale(vmax)
        packed, sfb = nvfp4_quantize_tile(xf, vmax, bad, gs)
        pw = _bytes_to_words(packed)
        sw = _bytes_to_words(tl.reshape(sfb, (NB // 8, 8)))
    else:
        qb, sf = fp8_block_quantize_tile(xf, False, False)
        pw = tl.reshape(_bytes_to_words(tl.reshape(qb, (NB * 16, 8))), (NB, 16))
        sw = sf.to(tl.int32, bitcast=True)
        gs = 1.0
    return pw, sw, gs


@triton.jit
def _encode_row(x_ptr, H: tl.constexpr, PAYLOAD: tl.constexpr, NB: tl.constexpr):
    """Quantize one token row (``x_ptr`` -> its first element; for bf16 ``x_ptr`` is an int64
    pointer to the row's raw words) into message words.

    Returns ``(pw, sw, gs)``: payload words (nvfp4 ``[NB]``, fp8 ``[NB, 16]``, bf16 ``[NB*4]``),
    scale words (nvfp4 ``[NB // 8]`` int64, fp8 ``[NB]`` int32 FP32 bits, bf16 unused),
    the FP32 encode global scale (nvfp4; 1.0 otherwise)."""
    blk = tl.arange(0, NB)
    if PAYLOAD == 0:
        KSF: tl.constexpr = H // 16
        xf = tl.load(x_ptr + blk[:, None] * 16 + tl.arange(0, 16)[None, :], mask=(blk < KSF)[:, None], other=0.0)
        pw, sw, gs = _encode_tile(xf.to(tl.float32), H, PAYLOAD, NB)
    elif PAYLOAD == 1:
        NBLK: tl.constexpr = H // 128
        xf = tl.load(x_ptr + blk[:, None] * 128 + tl.arange(0, 128)[None, :], mask=(blk < NBLK)[:, None], other=0.0)
        pw, sw, gs = _encode_tile(xf.to(tl.float32), H, PAYLOAD, NB)
    else:
        pw = tl.load(x_ptr + tl.arange(0, NB * 4), mask=tl.arange(0, NB * 4) < H // 4, other=0)
        sw = 0
        gs = 1.0
    return pw, sw, gs


@triton.jit
def _store_rows(
    anchor, row_addr, ok, pw, sw, gs, H: tl.constexpr, PAYLOAD: tl.constexpr, NB: tl.constexpr,
    SCALE_OFF: tl.constexpr,
):  # fmt: skip
    """Store payload + scales (+ gs at ``SCALE_OFF`` + scale bytes rounded to 16 for nvfp4,
    i.e. the message's ``gs_offset``) of one encoded token into several rows at once:
    ``row_addr`` a vector of byte addresses (int64), ``ok`` which of them to write; one store
    instruction per section for all rows (no per-row branch or scalar extraction).
    ``anchor``: see :func:`_row_words`."""
    wp = _row_words(anchor, row_addr)[:, None]
    okc = ok[:, None]
    blk = tl.arange(0, NB)
    if PAYLOAD == 0:
        KSF: tl.constexpr = H // 16
        tl.store(wp + blk[None, :], pw[None, :], mask=okc & (blk < KSF)[None, :])
        sblk = tl.arange(0, NB // 8)
        tl.store(wp + SCALE_OFF // 8 + sblk[None, :], sw[None, :], mask=okc & (sblk < (KSF + 7) // 8)[None, :])
        GS_OFF: tl.constexpr = (SCALE_OFF + KSF + 15) // 16 * 16
        tl.store((row_addr + GS_OFF).to(tl.pointer_type(tl.float32)), gs, mask=ok)
    elif PAYLOAD == 1:
        NBLK: tl.constexpr = H // 128
        w = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
        tl.store(wp[:, :, None] + w[None, :, :], pw[None, :, :], mask=okc[:, :, None] & (blk < NBLK)[None, :, None])
        sp = (row_addr + SCALE_OFF).to(tl.pointer_type(tl.int32))[:, None]
        tl.store(sp + blk[None, :], sw[None, :], mask=okc & (blk < NBLK)[None, :])
    else:
        w = tl.arange(0, NB * 4)
        tl.store(wp + w[None, :], pw[None, :], mask=okc & (w < H // 4)[None, :])


@triton.jit
def _store_row(
    anchor, row_addr, pw, sw, gs, H: tl.constexpr, PAYLOAD: tl.constexpr, NB: tl.constexpr, SCALE_OFF: tl.constexpr
):
    """:func:`_store_rows` into the one row at byte address ``row_addr``."""
    one = tl.full([1], 1, tl.int1)
    _store_rows(anchor, row_addr + tl.zeros([1], tl.int64), one, pw, sw, gs, H, PAYLOAD, NB, SCALE_OFF)


@triton.jit
def _load_row_f32(
    anchor, row_addr, H: tl.constexpr, PAYLOAD: tl.constexpr, NB: tl.constexpr, SCALE_OFF: tl.constexpr, B0=0
):
    """Dequantize blocks ``[B0, B0 + NB)`` of one row at byte address ``row_addr`` to an FP32
    tile ``[NB, BS]`` (BS = 16 for nvfp4/bf16, 128 for fp8; nvfp4: ``B0`` a multiple of 8);
    blocks past ``H`` read as 0."""
    wp = _row_words(anchor, row_addr)
    blk = B0 + tl.arange(0, NB)
    if PAYLOAD == 0:
        # element j of a block is nibble j of the block's two little-endian 32-bit words (EP4
        # H200, 4096 tok/rank, source side of the nvfp4 wire: 174 us with this decode, 430 us
        # with int64 words split into bytes and one division an element, 515 us a whole row
        # a program)
        KSF: tl.constexpr = H // 16
        kk = tl.arange(0, 16)
        w32 = wp.to(tl.pointer_type(tl.int32))
        bm = blk < KSF
        pw = tl.load(w32 + blk[:, None] * 2 + (kk // 8)[None, :], mask=bm[:, None], other=0)
        codes = (pw >> ((kk % 8) * 4)[None, :]) & 15
        sfb = tl.load(wp.to(tl.pointer_type(tl.uint8)) + SCALE_OFF + blk, mask=bm, other=0).to(tl.int32)
        GS_OFF: tl.constexpr = (SCALE_OFF + KSF + 15) // 16 * 16
        gs = tl.load((row_addr + GS_OFF).to(tl.pointer_type(tl.float32)))
        v = nvfp4_dequantize_codes(codes, sfb, gs)
    elif PAYLOAD == 1:
        # (bytes from 32-bit words, one load an element, timed 155 us vs this 140 us: EP4 H200,
        # 4096 tok/rank, source side of the fp8 wire)
        NBLK: tl.constexpr = H // 128
        pw = tl.load(wp + blk[:, None] * 16 + tl.arange(0, 16)[None, :], mask=(blk < NBLK)[:, None], other=0)
        qb = tl.reshape(_words_to_bytes(tl.reshape(pw, (NB * 16,))), (NB, 128))
        s = tl.load((row_addr + SCALE_OFF).to(tl.pointer_type(tl.float32)) + blk, mask=blk < NBLK, other=0.0)
        v = e4m3_decode(qb) * s[:, None]
    else:
        bp = wp.to(tl.pointer_type(tl.bfloat16))
        v = tl.load(bp + blk[:, None] * 16 + tl.arange(0, 16)[None, :], mask=(blk < H // 16)[:, None], other=0.0)
        v = v.to(tl.float32)
    return v


@triton.jit
def _partial_tile(c, H: tl.constexpr, CPAYLOAD: tl.constexpr, BLOCK_H: tl.constexpr, NB: tl.constexpr):
    """Column program ``c`` of a combine output row, for :func:`_add_partial`: ``(cols,
    cmask, acc, b0)``, the bf16 wire's ``BLOCK_H`` columns or a quantized wire's scale blocks
    ``[b0, b0 + NB)`` (``b0 = c * NB``) as ``[NB, block]`` columns, and a zero FP32 tile.
    The source side of both combines."""
    if CPAYLOAD == 2:
        cols = c * BLOCK_H + tl.arange(0, BLOCK_H)
        cm = cols < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        b0 = 0
    else:
        BS: tl.constexpr = 16 if CPAYLOAD == 0 else 128
        b0 = c * NB
        blk = b0 + tl.arange(0, NB)
        cols = blk[:, None] * BS + tl.arange(0, BS)[None, :]
        cm = (blk < H // BS)[:, None]
        acc = tl.zeros([NB, BS], dtype=tl.float32)
    return cols, cm, acc, b0


@triton.jit
def _add_partial(
    acc, anchor, addr, hit, cols, cmask, H: tl.constexpr, CPAYLOAD: tl.constexpr, NB: tl.constexpr,
    CSCALE_OFF: tl.constexpr, B0=0,
):  # fmt: skip
    """``acc`` plus one rank's combine row at byte address ``addr`` if ``hit``, in FP32: the
    bf16 wire's columns ``cols`` (mask ``cmask``) loaded masked and added by a select (no
    branch: every rank's load can be in flight before the first sum), an fp8 / nvfp4 row's
    blocks ``[B0, B0 + NB)`` dequantized (:func:`_load_row_f32`) behind a branch. The source
    side of both combines."""
    if CPAYLOAD == 2:
        rp = _row_words(anchor, addr).to(tl.pointer_type(tl.bfloat16))
        v = tl.load(rp + cols, mask=cmask & hit, other=0.0).to(tl.float32)
        acc = tl.where(hit, acc + v, acc)
    else:
        if hit:
            acc = acc + _load_row_f32(anchor, addr, H, CPAYLOAD, NB, CSCALE_OFF, B0)
    return acc


# ----------------------------------------------------------------------------- low latency: dispatch
@triton.jit
def _token_routing(ids_ptr, w_ptr, status_ptr, t64, kk, K: tl.constexpr, E: tl.constexpr):
    """Top-k ids ``[KP]`` (lanes past K and ids outside ``[-1, E)`` -> -1, the latter reported
    as ``ST_BAD_ID``) and weights ``[KP]`` of token ``t64``."""
    ids = tl.load(ids_ptr + t64 * K + kk, mask=kk < K, other=-1)
    wts = tl.load(w_ptr + t64 * K + kk, mask=kk < K, other=0.0)
    bad = (ids < -1) | (ids >= E)
    if tl.sum(bad.to(tl.int32), axis=0) > 0:
        report_timeout(status_ptr + ST_BAD_ID, 1 + tl.max(tl.where(bad, ids, -1), axis=0))
    return tl.where(bad, -1, ids), wts


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _equal_before(v, kk):
    """``[KP]``: for each lane ``k`` of ``v``, how many lanes ``k' < k`` hold the same value."""
    before = kk[None, :] < kk[:, None]  # [k, k']: k' < k
    return tl.sum(((v[None, :] == v[:, None]) & before).to(tl.int32), axis=1)


@triton.jit
def _positions(
    ids_ptr, t, ids, dst, kk, K: tl.constexpr, E: tl.constexpr, E_LOCAL: tl.constexpr, RP: tl.constexpr,
    TC: tl.constexpr,
):  # fmt: skip
    """Where token ``t``'s pairs go: ``pos[k]`` = pairs ``(t', k')`` before ``(t, k)``
    (row-major) routed to expert ``ids[k]``, ``rpos[k]`` = tokens ``t' < t`` with a pair on
    rank ``dst[k]`` (``[KP]`` each; lanes of unrouted ids hold garbage). One scan over the
    earlier tokens, ``[TC, KP]`` ids a step; ids outside ``[-1, E)`` count as unrouted.
    ``RP <= 64`` (the buffer refuses more ranks): each token's ranks as one bit mask."""
    pos = tl.zeros_like(kk)
    rr = tl.arange(0, RP)
    rcnt = tl.zeros([RP], dtype=tl.int32)  # earlier tokens with a pair on rank r
    tt = tl.arange(0, TC)
    t0 = 0
    while t0 < t:
        tok = t0 + tt
        vm = (tok < t)[:, None] & (kk < K)[None, :]
        v = tl.load(ids_ptr + tok.to(tl.int64)[:, None] * K + kk[None, :], mask=vm, other=-1)
        vd = tl.where((v >= 0) & (v < E), v // E_LOCAL, -1)  # [TC, KP] owner ranks
        v1 = tl.reshape(v, (TC * kk.shape[0],))
        pos += tl.sum((v1[None, :] == ids[:, None]).to(tl.int32), axis=1)
        bits = tl.reduce(tl.where(vd >= 0, tl.full([1], 1, tl.int64) << vd.to(tl.int64), 0), 1, _bit_or)
        rcnt += tl.sum(((bits[:, None] >> rr[None, :].to(tl.int64)) & 1).to(tl.int32), axis=0)
        t0 += TC
    pos += _equal_before(ids, kk)
    rpos = tl.sum(tl.where(dst[:, None] == rr[None, :], rcnt[None, :], 0), axis=1)
    return pos, rpos


@triton.jit
def _store_token_rows(
    anchor, rows_table, idx_table, status_ptr, t, ids, wts, pos, rpos, dst, pw, sw, gs, b, kk,
    SRC_SLOT, SLOT_B, SLOT_E, SLOT_S, ROW_B, ROW_S, TMAX,
    H: tl.constexpr, K: tl.constexpr, E_LOCAL: tl.constexpr, PAYLOAD: tl.constexpr, NB: tl.constexpr,
    ROW_BYTES: tl.constexpr, SCALE_OFF: tl.constexpr, IDS_OFF: tl.constexpr, W_OFF: tl.constexpr,
    SRC_OFF: tl.constexpr,
):  # fmt: skip
    """Store token ``t``'s encoded row once per destination rank, into row ``rpos`` of this
    source's row region there (the lane of the rank's first ``k``; all such rows with one
    store a section, :func:`_store_rows`), and for every routed ``k`` the index entry
    ``(rpos << 8) | k`` into slot ``pos[k]`` of expert ``ids[k]``'s entry region on its
    owner; a position ``>= TMAX`` is dropped and reported (``ST_OVERFLOW``: 1 + its local
    expert)."""
    routed = ids >= 0  # lanes past K and unrouted / bad ids hold -1
    over = routed & (pos >= TMAX)
    if tl.sum(over.to(tl.int32), axis=0) > 0:
        report_timeout(status_ptr + ST_OVERFLOW, 1 + tl.max(tl.where(over, ids % E_LOCAL, -1), axis=0))
    first = routed & (_equal_before(dst, kk) == 0)  # one row per (token, destination rank)
    owner = tl.where(routed, dst, 0)
    rbase = tl.load(rows_table + owner, mask=first, other=0)
    row = (b * ROW_B + SRC_SLOT * ROW_S + rpos).to(tl.int64)
    row_addr = tl.where(first, rbase + row * ROW_BYTES, anchor.to(tl.int64))
    _store_rows(anchor, row_addr, first, pw, sw, gs, H, PAYLOAD, NB, SCALE_OFF)
    lanes = first[:, None] & (kk < K)[None, :]
    ip = (row_addr + IDS_OFF).to(tl.pointer_type(tl.int32))
    tl.store(ip[:, None] + kk[None, :], ids[None, :] + tl.zeros_like(kk)[:, None], mask=lanes)
    fp = (row_addr + W_OFF).to(tl.pointer_type(tl.float32))
    tl.store(fp[:, None] + kk[None, :], wts[None, :] + tl.zeros_like(kk).to(tl.float32)[:, None], mask=lanes)
    tl.store((row_addr + SRC_OFF).to(tl.pointer_type(tl.int32)), tl.zeros_like(kk) + t * K, mask=first)
    ok = routed & (pos < TMAX)
    le = tl.where(ok, ids % E_LOCAL, 0)
    ebase = tl.load(idx_table + owner, mask=ok, other=0)
    slot = (b * SLOT_B + le * SLOT_E + SRC_SLOT * SLOT_S + pos).to(tl.int64)
    tl.store((ebase + slot * 4).to(tl.pointer_type(tl.int32)), (rpos << 8) | kk, mask=ok)


@triton.jit
def _expert_flag_ptrs(flags_table, ex, b, SRC_SLOT, FLAG_B, FLAG_E, FLAG_S, E: tl.constexpr, E_LOCAL: tl.constexpr):
    """Pointers ``[EP]`` to the flag of (global expert ``ex``, this source) on its owner."""
    fbase = tl.load(flags_table + ex // E_LOCAL, mask=ex < E, other=0)
    faddr = fbase + (b * FLAG_B + (ex % E_LOCAL) * FLAG_E + SRC_SLOT * FLAG_S).to(tl.int64) * 8
    return faddr.to(tl.pointer_type(tl.int64))


# Integer arguments that change from call to call are not specialized (a value of 1 or a
# multiple of 16 would otherwise compile a new variant on one rank while its peers spin).
@triton.jit(do_not_specialize=["T", "NPROG"])
def ll_dispatch_send_kernel(
    x_ptr,  # [T, H] bf16 (int64 view [T, H/4] for the bf16 payload)
    ids_ptr,  # [T, K] int32
    w_ptr,  # [T, K] fp32
    T,
    rows_table,  # [R] int64: base address of rank d's message rows
    idx_table,  # [R] int64: base address of rank d's int32 index entries
    flags_table,  # [R] int64: base address of rank d's int64 flags
    epoch_ptr,  # [4] int64 local: [0] last finished dispatch (written by recv), [1] in flight
    sink_ptr,  # int64 local scratch: masked-off flag stores land here (GPU)
    counter_ptr,  # int32 local arrival counter
    hist_ptr,  # [EP] int32 local per-expert pair counts of this call (zero between calls)
    status_ptr,  # [4] int32 local
    SRC_SLOT,  # this rank's index along the slots' source axis
    SLOT_B,
    SLOT_E,
    SLOT_S,
    FLAG_B,
    FLAG_E,
    FLAG_S,
    ROW_B,
    ROW_S,
    TMAX,
    H: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    E: tl.constexpr,
    EP: tl.constexpr,  # power of two > E
    E_LOCAL: tl.constexpr,
    RP: tl.constexpr,  # power of two >= the number of ranks
    NBUF: tl.constexpr,
    PAYLOAD: tl.constexpr,
    NB: tl.constexpr,
    ROW_BYTES: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    IDS_OFF: tl.constexpr,
    W_OFF: tl.constexpr,
    SRC_OFF: tl.constexpr,
    CHUNK: tl.constexpr,
    GPU: tl.constexpr,  # compiled for a GPU (inline PTX fences), False under the interpreter
    NPROG,  # grid size (tl.num_programs is not a scalar under the interpreter)
):
    """Quantize each token row once and store it once into every rank that owns one of its
    top-k experts (row ``rpos`` of this source's row region there), plus a 4-byte index
    entry per ``(token, expert)`` into that expert's entry region; then publish
    ``(seq << 32) | (T << 16) | count`` for every (expert, this source).

    One row per (token, rank), not per (token, expert): EP4, top-8 of 256 experts, about 3.6 rows
    a token (2.7 to peers) instead of 8 (6 to peers); the receive expands rows to experts
    through the entries. Programs stride over tokens; the positions of ``(t, k)`` come from
    a scan of every earlier id (:func:`_positions`);
    each program adds its tokens' pairs to per-expert counters (``hist_ptr``, atomics); the
    last program to arrive takes the counts (resetting them) and publishes all flags.
    (A variant that published each expert's flag from whichever program completed it, with
    positions from per-program histograms of all ids, lost at every size once these counts
    came from atomics, EP2 2x H200, dispatch 26 -> 18 us at 1 token, 34 -> 27 at 128,
    98 -> 55 at 512; its per-expert lanes also took 255 registers with the vector stores.)"""
    pid = tl.program_id(0)
    nprog = NPROG
    seq = tl.load(epoch_ptr) + 1
    b = seq % NBUF
    kk = tl.arange(0, KP)
    XROW: tl.constexpr = H // 4 if PAYLOAD == 2 else H  # x elements (int64 words for bf16) a token
    t = pid
    while t < T:
        t64 = t.to(tl.int64)
        pw, sw, gs = _encode_row(x_ptr + t64 * XROW, H, PAYLOAD, NB)
        ids, wts = _token_routing(ids_ptr, w_ptr, status_ptr, t64, kk, K, E)
        dst = tl.where(ids >= 0, ids // E_LOCAL, -1)
        pos, rpos = _positions(ids_ptr, t, ids, dst, kk, K, E, E_LOCAL, RP, CHUNK // KP)
        _store_token_rows(
            epoch_ptr, rows_table, idx_table, status_ptr, t, ids, wts, pos, rpos, dst, pw, sw, gs, b, kk,
            SRC_SLOT, SLOT_B, SLOT_E, SLOT_S, ROW_B, ROW_S, TMAX,
            H, K, E_LOCAL, PAYLOAD, NB, ROW_BYTES, SCALE_OFF, IDS_OFF, W_OFF, SRC_OFF,
        )  # fmt: skip
        tl.atomic_add(hist_ptr + tl.where(ids >= 0, ids, 0), 1, mask=ids >= 0, sem="relaxed", scope="gpu")
        t += nprog
    if arrive_last(counter_ptr, nprog, GPU):
        # counts per global expert (read and reset at L2: every program's adds came before
        # its arrival), then one flag per (expert, this source) on its owner. (Built by
        # this program alone from the ids instead: EP2 2x H200, T = 512, 22 us of the
        # send kernel's 58.)
        ex = tl.arange(0, EP)
        cnt = tl.atomic_xchg(hist_ptr + ex, 0, mask=ex < E, sem="relaxed", scope="gpu")
        cnt = tl.minimum(tl.where(ex < E, cnt, 0), TMAX)
        fptr = _expert_flag_ptrs(flags_table, ex, b, SRC_SLOT, FLAG_B, FLAG_E, FLAG_S, E, E_LOCAL)
        val = (seq.to(tl.int64) << 32) | (tl.cast(T, tl.int64) << 16) | cnt.to(tl.int64)
        # one fence a thread for its flags, then relaxed stores (RELAXED), not a
        # release store (a fence) per flag: EP4 4x H200, CUDA graph, the session-7 kernels'
        # dispatch at 128 tok 41.6 -> 39.4-39.9 us, at 512 tok 103.9 -> 101.5-101.8 us
        flag_store_release(fptr, val, ex < E, sink_ptr, GPU, RELAXED=True)
        tl.store(epoch_ptr + 1, seq)


@triton.jit
def _copy_source(
    rbase, ebase, anchor, st, c_s, j, nsplit, le, s, out_x_ptr, out_sf_ptr, out_gs_ptr, src_rank_ptr, src_slot_ptr,
    out_w_ptr, tok_ptr, tag, MAXM, MT, KT, TOKS,
    RPI: tl.constexpr, H: tl.constexpr, K: tl.constexpr, PAYLOAD: tl.constexpr, NB: tl.constexpr,
    ROW_BYTES: tl.constexpr, SCALE_OFF: tl.constexpr, W_OFF: tl.constexpr, SRC_OFF: tl.constexpr,
    SWIZZLE: tl.constexpr,
):  # fmt: skip
    """Program ``j`` of ``nsplit``'s share of the ``c_s`` index entries of source ``s`` for
    local expert ``le`` (int32 pointer ``ebase``; that source's rows at local byte address
    ``rbase``): copied into rows ``st ..`` of ``le``'s masked layout, ``[RPI, ...]`` tiles
    (``RPI`` rows of loads in flight a step)."""
    r = tl.arange(0, RPI)
    i = j * RPI
    while i < c_s:
        _copy_rows(
            rbase, ebase + i + r, i + r < c_s, st + i + r, le, s, anchor, out_x_ptr, out_sf_ptr, out_gs_ptr,
            src_rank_ptr, src_slot_ptr, out_w_ptr, tok_ptr, tag, MAXM, MT, KT, TOKS,
            RPI, H, K, PAYLOAD, NB, ROW_BYTES, SCALE_OFF, W_OFF, SRC_OFF, SWIZZLE,
        )  # fmt: skip
        i += nsplit * RPI


@triton.jit
def _copy_rows(
    rbase, eptrs, ok, m, le, s, anchor, out_x_ptr, out_sf_ptr, out_gs_ptr, src_rank_ptr, src_slot_ptr, out_w_ptr,
    tok_ptr, tag, MAXM, MT, KT, TOKS,
    RPI: tl.constexpr, H: tl.constexpr, K: tl.constexpr, PAYLOAD: tl.constexpr, NB: tl.constexpr,
    ROW_BYTES: tl.constexpr, SCALE_OFF: tl.constexpr, W_OFF: tl.constexpr, SRC_OFF: tl.constexpr,
    SWIZZLE: tl.constexpr,
):  # fmt: skip
    """One ``[RPI, ...]`` tile of copies into local expert ``le``'s masked layout: where
    ``ok``, the index entry at ``eptrs`` (``(row << 8) | k``) names a row of the source
    region at byte address ``rbase`` (source ``s``; each of these a scalar or ``[RPI]``),
    copied to row ``m``, and the token-map entry ``tok[s * TOKS + t * K + k] = tag | row``
    is set (``tag`` = sequence << 32)."""
    ent = tl.load(eptrs, mask=ok, other=0)
    kx = ent & 255
    row_addr = rbase + (ent >> 8).to(tl.int64) * ROW_BYTES  # [RPI]
    wp = _row_words(anchor, row_addr)[:, None]
    m = m.to(tl.int64)
    orow = le.to(tl.int64) * MAXM + m
    blk = tl.arange(0, NB)
    if PAYLOAD == 0:
        KSF: tl.constexpr = H // 16
        PW: tl.constexpr = H // 16
        wm = ok[:, None] & (blk < PW)[None, :]
        tl.store(out_x_ptr + orow[:, None] * PW + blk[None, :], tl.load(wp + blk[None, :], mask=wm), mask=wm)
        sblk = tl.arange(0, NB // 8)
        sw = tl.load(wp + SCALE_OFF // 8 + sblk[None, :], mask=ok[:, None] & (sblk < (KSF + 7) // 8)[None, :], other=0)
        sfb = tl.reshape(_words_to_bytes(tl.reshape(sw, (RPI * (NB // 8),))), (RPI, NB)).to(tl.uint8)
        if SWIZZLE:
            off = swizzled_sf_offset(le.to(tl.int64), m[:, None], blk[None, :].to(tl.int64), MT, KT)
            tl.store(out_sf_ptr + off, tl.where(blk[None, :] < KSF, sfb, 0), mask=ok[:, None] & (blk < KT * 4)[None, :])
        else:
            tl.store(out_sf_ptr + orow[:, None] * KSF + blk[None, :], sfb, mask=ok[:, None] & (blk < KSF)[None, :])
        GS_OFF: tl.constexpr = (SCALE_OFF + KSF + 15) // 16 * 16
        tl.store(out_gs_ptr + orow, tl.load((row_addr + GS_OFF).to(tl.pointer_type(tl.float32)), mask=ok), mask=ok)
    elif PAYLOAD == 1:
        PW1: tl.constexpr = H // 8
        w = tl.arange(0, NB * 16)
        wm = ok[:, None] & (w < PW1)[None, :]
        tl.store(out_x_ptr + orow[:, None] * PW1 + w[None, :], tl.load(wp + w[None, :], mask=wm), mask=wm)
        NBLK: tl.constexpr = H // 128
        sp = (row_addr + SCALE_OFF).to(tl.pointer_type(tl.float32))[:, None]
        bm = ok[:, None] & (blk < NBLK)[None, :]
        tl.store(out_sf_ptr + orow[:, None] * NBLK + blk[None, :], tl.load(sp + blk[None, :], mask=bm), mask=bm)
    else:
        PW2: tl.constexpr = H // 4
        w = tl.arange(0, NB * 4)
        wm = ok[:, None] & (w < PW2)[None, :]
        tl.store(out_x_ptr + orow[:, None] * PW2 + w[None, :], tl.load(wp + w[None, :], mask=wm), mask=wm)
    tk = tl.load((row_addr + SRC_OFF).to(tl.pointer_type(tl.int32)), mask=ok, other=0) + kx
    tl.store(src_rank_ptr + orow, tl.zeros([RPI], tl.int32) + s, mask=ok)
    tl.store(src_slot_ptr + orow, tk, mask=ok)
    tl.store(out_w_ptr + orow, tl.load((row_addr + W_OFF).to(tl.pointer_type(tl.float32)) + kx, mask=ok), mask=ok)
    tl.store(tok_ptr + s * TOKS + tk.to(tl.int64), tag | orow, mask=ok)


@triton.jit
def _source_rows(fptr, tag, s, le, j, ntok_ptr, status_ptr, max_spins, t0, timeout_us, TMAX, GPU: tl.constexpr):
    """Rows source ``s`` sent to this program's local expert: its flag ``fptr`` (acquire,
    bounded; 0 rows after a timeout, which is reported), the count field capped at ``TMAX``;
    program ``(0, 0)`` also records the source's token count (the flag's ``T`` field)."""
    v, ok = wait_flag_geq(fptr, tag, max_spins, t0, timeout_us, GPU)
    if not ok:
        report_timeout(status_ptr + ST_DISPATCH_TIMEOUT, s + 1)
    v = tl.where(ok, v, 0)
    c = tl.minimum((v & 0xFFFF).to(tl.int32), TMAX)
    if (le == 0) & (j == 0):
        tl.store(ntok_ptr + s, ((v >> 16) & 0xFFFF).to(tl.int32))
    return c


@triton.jit(do_not_specialize=["max_spins", "timeout_us"])
def ll_dispatch_recv_kernel(
    slots_ptr,  # int64 address of this rank's message rows (as an int64 tensor's data)
    idx_ptr,  # [..] int32 local index entries
    flags_ptr,  # [..] int64 local flags
    epoch_ptr,
    status_ptr,
    out_x_ptr,  # int64 view of [E_LOCAL, MAXM, payload_bytes]
    out_sf_ptr,  # nvfp4: uint8 linear [E_LOCAL, MAXM, KSF] or swizzled [E_LOCAL, MAXM_P, KP4]; fp8: fp32
    out_gs_ptr,  # [E_LOCAL, MAXM] fp32 (nvfp4)
    masked_m_ptr,  # [E_LOCAL] int32
    src_rank_ptr,  # [E_LOCAL, MAXM] int32
    src_slot_ptr,  # [E_LOCAL, MAXM] int32 (t * K + k on the source)
    out_w_ptr,  # [E_LOCAL, MAXM] fp32
    tok_ptr,  # [R * TOKS] int64 token map: (seq << 32) | row of every (source, t * K + k) laid out
    ntok_ptr,  # [R] int32: tokens each source dispatched
    SLOT_B,
    SLOT_E,
    SLOT_S,
    FLAG_B,
    FLAG_E,
    FLAG_S,
    ROW_B,
    ROW_S,
    TMAX,
    MAXM,
    MT,
    KT,
    TOKS,  # T_max * K
    max_spins,  # interpreter: reads before a wait gives up
    timeout_us,  # GPU: microseconds before the waits of a program give up
    R: tl.constexpr,
    RP: tl.constexpr,
    H: tl.constexpr,
    K: tl.constexpr,
    NBUF: tl.constexpr,
    PAYLOAD: tl.constexpr,
    NB: tl.constexpr,
    ROW_BYTES: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    W_OFF: tl.constexpr,
    SRC_OFF: tl.constexpr,
    SWIZZLE: tl.constexpr,
    GPU: tl.constexpr,
    NSPLIT,  # grid dim 1
    RPI: tl.constexpr = 1,  # rows a program copies at once
    PIPELINE: tl.constexpr = False,  # v2: copy source s while later sources are still in flight
):
    """Grid ``(E_LOCAL, NSPLIT)``: wait for the R flags of local expert ``le``, copy the rows
    its index entries name into the masked layout ordered by (source rank, source token),
    and fill the token map (and, program ``(0, 0)``, the sources' token counts) the combine
    send reads.

    v1 (``PIPELINE=False``): every flag first, then one pass over the rows of all sources,
    ``RPI`` rows a step (one chain of loads for few rows an expert).
    v2 (``PIPELINE=True``): source ``s`` is copied as soon as its flag is in (its rows start
    after those of sources ``< s``, whose counts are known by then), ``RPI`` rows a step."""
    le = tl.program_id(0)
    j = tl.program_id(1)
    nsplit = NSPLIT
    seq = tl.load(epoch_ptr + 1)
    b = seq % NBUF
    base = slots_ptr.to(tl.int64)
    tag = seq.to(tl.int64) << 32
    t0 = spin_start(GPU)
    if PIPELINE:
        st = 0
        for s in tl.static_range(R):
            fptr = flags_ptr + b * FLAG_B + le * FLAG_E + s * FLAG_S
            c_s = _source_rows(fptr, tag, s, le, j, ntok_ptr, status_ptr, max_spins, t0, timeout_us, TMAX, GPU)
            _copy_source(
                base + (b * ROW_B + s * ROW_S).to(tl.int64) * ROW_BYTES,
                idx_ptr + b * SLOT_B + le * SLOT_E + s * SLOT_S, epoch_ptr, st, c_s, j, nsplit, le, s,
                out_x_ptr, out_sf_ptr, out_gs_ptr, src_rank_ptr, src_slot_ptr, out_w_ptr, tok_ptr, tag, MAXM, MT, KT,
                TOKS, RPI, H, K, PAYLOAD, NB, ROW_BYTES, SCALE_OFF, W_OFF, SRC_OFF, SWIZZLE,
            )  # fmt: skip
            st += c_s
        if j == 0:
            tl.store(masked_m_ptr + le, st)
    else:
        rr = tl.arange(0, RP)
        cnt = tl.zeros([RP], dtype=tl.int32)
        for s in tl.static_range(R):
            fptr = flags_ptr + b * FLAG_B + le * FLAG_E + s * FLAG_S
            c = _source_rows(fptr, tag, s, le, j, ntok_ptr, status_ptr, max_spins, t0, timeout_us, TMAX, GPU)
            cnt = tl.where(rr == s, c, cnt)
        start = tl.cumsum(cnt, axis=0) - cnt
        total = tl.sum(cnt, axis=0)
        if j == 0:
            tl.store(masked_m_ptr + le, total)
        # one pass over the rows of every source (a tile may span sources): row m of the
        # expert belongs to the last source whose rows start at or before m
        r = tl.arange(0, RPI)
        i = j * RPI
        while i < total:
            m = i + r
            sm = tl.sum(((start[None, :] <= m[:, None]) & (rr < R)[None, :]).to(tl.int32), axis=1) - 1
            off = m - tl.sum(tl.where(rr[None, :] == sm[:, None], start[None, :], 0), axis=1)
            _copy_rows(
                base + (b * ROW_B + sm * ROW_S).to(tl.int64) * ROW_BYTES,
                idx_ptr + b * SLOT_B + le * SLOT_E + sm * SLOT_S + off, m < total, m, le, sm, epoch_ptr,
                out_x_ptr, out_sf_ptr, out_gs_ptr, src_rank_ptr, src_slot_ptr, out_w_ptr, tok_ptr, tag, MAXM, MT, KT,
                TOKS, RPI, H, K, PAYLOAD, NB, ROW_BYTES, SCALE_OFF, W_OFF, SRC_OFF, SWIZZLE,
            )  # fmt: skip
            i += nsplit * RPI
    if (le == 0) & (j == 0):
        tl.store(epoch_ptr, seq)


# ----------------------------------------------------------------------------- low latency: combine
@triton.jit
def _rows_acc(y_ptr, w_ptr, rows, kk, offs, om, acc, H: tl.constexpr, K: tl.constexpr):
    """FP32 ``acc = acc + w[row_k] * float(y[row_k])`` over ``k`` ascending, skipping the
    lanes of ``rows`` (``[KP]``, ``kk`` its ``tl.arange``) that hold -1 (``offs``: the tile's
    columns, ``om`` their mask). Every ``k``'s loads are issued (masked) before the first
    sum; a missing ``k`` is skipped by a select, so the sum is that of the branches-only
    loop bit for bit. Both combines' expert sides (here and ``dispatch.py``)."""
    for k in tl.static_range(K):
        row = pick(rows, kk, k)
        hit = row >= 0
        w = tl.load(w_ptr + row, mask=hit, other=0.0)
        v = tl.load(y_ptr + row.to(tl.int64) * H + offs, mask=om & hit, other=0.0).to(tl.float32)
        acc = tl.where(hit, acc + w * v, acc)
    return acc


@triton.jit(do_not_specialize=["NPROG"])
def ll_combine_send_kernel(
    y_ptr,  # [E_LOCAL * MAXM, H] bf16 expert outputs
    w_ptr,  # [E_LOCAL * MAXM] fp32 routing weight of each received row
    tok_ptr,  # [R * TOKS] int64 token map of the dispatch (written by its receive half)
    ntok_ptr,  # [R] int32 tokens each source dispatched
    rows_table,  # [R] int64: base of rank s's combine rows
    flags_table,  # [R] int64: base of rank s's combine flags
    epoch_ptr,  # [4] int64: [0] last finished dispatch, [2] last finished combine, [3] in flight
    sink_ptr,
    counter_ptr,
    SRC_SLOT,  # this rank's block in the source's rows (0 for the torch staging buffer)
    CB,  # rows per buffer parity
    CS,  # rows per expert-rank block (T_max; 0 for the torch staging buffer)
    FLAG_B,
    FLAG_S,
    TOKS,  # T_max * K
    H: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    NBUF: tl.constexpr,
    CPAYLOAD: tl.constexpr,
    NB: tl.constexpr,
    CROW_BYTES: tl.constexpr,
    CSCALE_OFF: tl.constexpr,
    GPU: tl.constexpr,
    NPROG,  # grid size (persistent programs)
    HC: tl.constexpr = 1024,  # bf16 wire: hidden elements a work item
):
    """Expert side of combine: one partial row per (source ``s``, token ``t``) routed here.

    Work items are ``(s, t, chunk of HC columns)`` (bf16 wire) or ``(s, t)`` (fp8 / nvfp4
    wires: the whole row, whose per-row scale needs its amax), ``t`` below the token count
    source ``s`` sent with its dispatch flags. An item reads the token map entries of its
    ``K`` pairs; those tagged with this dispatch's sequence number name the rows laid out
    here. FP32 ``acc = acc + w * float(out)`` over them (``k`` ascending, launched without
    FMA contraction), one BF16 rounding (RNE), quantized per row for fp8 / nvfp4, stored
    into row ``b * CB + SRC_SLOT * CS + t`` of the source. A token with no pair here sends
    nothing. The last program to finish publishes ``seq`` to every rank."""
    pid = tl.program_id(0)
    nprog = NPROG
    dseq = tl.load(epoch_ptr)
    seq = tl.load(epoch_ptr + 2) + 1
    b = seq % NBUF
    NCH: tl.constexpr = (H + HC - 1) // HC if CPAYLOAD == 2 else 1
    rr = tl.arange(0, RP)
    nt = tl.load(ntok_ptr + rr, mask=rr < R, other=0) * NCH  # items of each source
    ends = tl.cumsum(nt, axis=0)
    total = tl.sum(nt, axis=0)
    kk = tl.arange(0, KP)
    item = pid
    while item < total:
        s = tl.sum((item >= ends).to(tl.int32), axis=0)
        local = item - pick(ends - nt, rr, s)
        t = local // NCH
        ents = tl.load(tok_ptr + s.to(tl.int64) * TOKS + t * K + kk, mask=kk < K, other=0)
        hit = (ents >> 32) == dseq
        if tl.sum(hit.to(tl.int32), axis=0) > 0:
            rows = tl.where(hit, ents & 0xFFFFFFFF, -1)
            row_addr = tl.load(rows_table + s) + (b * CB + SRC_SLOT * CS + t).to(tl.int64) * CROW_BYTES
            if CPAYLOAD == 2:
                h = (local % NCH) * HC + tl.arange(0, HC)
                hm = h < H
                acc = _rows_acc(y_ptr, w_ptr, rows, kk, h, hm, tl.zeros([HC], tl.float32), H, K)
                dst = _row_words(epoch_ptr, row_addr).to(tl.pointer_type(tl.bfloat16))
                tl.store(dst + h, to_bf16_rne(acc), mask=hm)
            else:
                BS: tl.constexpr = 16 if CPAYLOAD == 0 else 128
                blk = tl.arange(0, NB)
                offs = blk[:, None] * BS + tl.arange(0, BS)[None, :]
                om = (blk < H // BS)[:, None]
                acc = _rows_acc(y_ptr, w_ptr, rows, kk, offs, om, tl.zeros([NB, BS], tl.float32), H, K)
                pw, sw, gs = _encode_tile(to_bf16_rne(acc).to(tl.float32), H, CPAYLOAD, NB)
                _store_row(epoch_ptr, row_addr, pw, sw, gs, H, CPAYLOAD, NB, CSCALE_OFF)
        item += nprog
    if arrive_last(counter_ptr, nprog, GPU):
        fbase = tl.load(flags_table + rr, mask=rr < R, other=0)
        faddr = fbase + (b * FLAG_B + SRC_SLOT * FLAG_S).to(tl.int64) * 8
        fence_sys(GPU)
        tl.debug_barrier()
        flag_store_release(faddr.to(tl.pointer_type(tl.int64)), tl.zeros([RP], tl.int64) + seq, rr < R, sink_ptr, GPU)
        tl.store(epoch_ptr + 3, seq)


@triton.jit(do_not_specialize=["T", "max_spins", "timeout_us", "NPROG"])
def ll_combine_recv_kernel(
    rows_ptr,  # this rank's combine rows (int64 address)
    flags_ptr,  # int64 local flags
    epoch_ptr,
    status_ptr,
    ids_ptr,  # [T, K] int32
    out_ptr,  # [T, H] bf16
    T,
    CB,
    CS,
    FLAG_B,
    FLAG_S,
    max_spins,
    timeout_us,
    H: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    E: tl.constexpr,
    E_LOCAL: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    NBUF: tl.constexpr,
    CPAYLOAD: tl.constexpr,
    NB: tl.constexpr,
    CROW_BYTES: tl.constexpr,
    CSCALE_OFF: tl.constexpr,
    GPU: tl.constexpr,
    NPROG,
    HC: tl.constexpr = 1024,  # bf16 wire: hidden elements a work item
):
    """Source side, persistent over work items ``(token, HC-column chunk)`` (bf16 wire) or
    tokens (fp8 / nvfp4): wait for every expert rank's flag, then ``out[t] = sum_r
    partial(r, t)`` in FP32 over the ranks ``r`` the token's ids point to (ascending; a
    quantized partial dequantized first), one BF16 rounding; a token routed nowhere gets
    zeros. The bf16 wire issues every rank's loads (masked) before the first sum."""
    pid = tl.program_id(0)
    nprog = NPROG
    seq = tl.load(epoch_ptr + 3)
    b = seq % NBUF
    t0 = spin_start(GPU)
    for r in tl.static_range(R):
        _, ok = wait_flag_geq(flags_ptr + b * FLAG_B + r * FLAG_S, seq, max_spins, t0, timeout_us, GPU)
        if not ok:
            report_timeout(status_ptr + ST_COMBINE_TIMEOUT, r + 1)
    base = rows_ptr.to(tl.int64)
    NCH: tl.constexpr = (H + HC - 1) // HC if CPAYLOAD == 2 else 1
    kk = tl.arange(0, KP)
    rr = tl.arange(0, RP)
    item = pid
    while item < T * NCH:
        t64 = (item // NCH).to(tl.int64)
        ids = tl.load(ids_ptr + t64 * K + kk, mask=kk < K, other=-1)
        dst = tl.where((ids >= 0) & (ids < E), ids // E_LOCAL, -1)
        sent = tl.sum((dst[:, None] == rr[None, :]).to(tl.int32), axis=0)  # [RP] pairs per rank
        row0 = base + (b * CB + t64) * CROW_BYTES
        cols, cm, acc, _b0 = _partial_tile(item % NCH, H, CPAYLOAD, HC, NB)  # quantized wires: whole rows
        for r in tl.static_range(R):
            acc = _add_partial(
                acc, epoch_ptr, row0 + r * CS * CROW_BYTES, pick(sent, rr, r) > 0, cols, cm, H, CPAYLOAD, NB, CSCALE_OFF
            )  # fmt: skip
        tl.store(out_ptr + t64 * H + cols, to_bf16_rne(acc), mask=cm)
        item += nprog
    if pid == 0:
        tl.store(epoch_ptr + 2, seq)


# ----------------------------------------------------------------------------- high throughput
#: high-throughput flags carry ``(epoch << 8) | code``: the sender's error code
#: (0 = fine) travels with its completion flag, so combine needs no collective to agree on
#: errors (``fp4comm/ep/backend_nvlink.py``)
FLAG_CODE_SCALE = tl.constexpr(256)  # 1 << 8
FLAG_CODE_MASK = tl.constexpr(255)
ST_PEER_CODE = tl.constexpr(4)  # status[4 + p]: code rank p sent with its flag this call


@triton.jit
def _plan_rows(meta_ptr, W, rank, R, out_ptr, RP: tl.constexpr):
    """The rows of ``fp4comm.ep.backend.plan_array`` (``PLAN_ROWS`` order, ``[9, R]`` int64 at
    ``out``) from the exchanged vectors ``meta`` ``[R, W]`` (``cnt[s][r]`` at ``2 + r`` of
    row ``s``), so the host need not build and copy them."""
    i = tl.arange(0, RP)
    im = i < R
    a = i[:, None]  # first index
    b = i[None, :]  # second index
    cnt = tl.load(meta_ptr + a * W + 2 + b, mask=(a < R) & (b < R), other=0)
    send = tl.sum(tl.where(a == rank, cnt, 0), axis=0)  # [r]: cnt[rank][r]
    recv = tl.sum(tl.where(b == rank, cnt, 0), axis=1)  # [s]: cnt[s][rank]
    send_start = tl.cumsum(send, axis=0) - send
    recv_start = tl.cumsum(recv, axis=0) - recv
    in_receiver = tl.sum(tl.where(a < rank, cnt, 0), axis=0)
    shift = tl.sum(tl.where(b < rank, cnt, 0), axis=1) - recv_start
    rows = (send_start, in_receiver, recv_start, recv_start + recv, shift, i + 1, send_start + i, recv_start + i,
            send_start + i + 1)  # fmt: skip
    for j in tl.static_range(9):
        tl.store(out_ptr + j * R + i, rows[j].to(tl.int64), mask=im)


@triton.jit(do_not_specialize=["rank", "epoch", "code", "max_spins", "timeout_us", "PLAN_W"])
def signal_wait_kernel(
    flags_table,  # [R] int64: base of rank p's int64 flag array (one slot per source)
    flags_ptr,  # this rank's flag array
    status_ptr,  # int32 [4 + R] local
    sink_ptr,  # int64 local scratch (unused: no masked lanes)
    rank,
    epoch,
    code,  # this rank's error code for this call, 0..255 (0 = fine)
    max_spins,
    timeout_us,
    plan_meta_ptr,  # PLAN: int64 [R, PLAN_W] exchanged count vectors
    plan_out_ptr,  # PLAN: int64 [9, R] out (_plan_rows)
    PLAN_W,
    STATUS_SLOT: tl.constexpr,
    SIGNAL: tl.constexpr,
    WAIT: tl.constexpr,
    GPU: tl.constexpr,
    PLAN: tl.constexpr = False,
    RP: tl.constexpr = 1,  # PLAN: power of two >= R
):
    """Grid ``(R,)``: program ``p`` tells rank ``p`` that this rank's rows for it (stored by
    earlier kernels on this stream) are complete (``SIGNAL``: flag ``(epoch << 8) | code``),
    then waits for rank ``p``'s rows to this rank (``WAIT``; a timeout records ``1 + p`` in
    ``status[STATUS_SLOT]``, else ``status[4 + p]`` = the code ``p`` sent). ``PLAN`` (with
    ``SIGNAL``): program 0 also writes the transfer plan's device rows (:func:`_plan_rows`)."""
    p = tl.program_id(0)
    if PLAN and SIGNAL:
        if p == 0:
            _plan_rows(plan_meta_ptr, PLAN_W, rank, tl.num_programs(0), plan_out_ptr, RP)
    target = epoch.to(tl.int64) * FLAG_CODE_SCALE
    if SIGNAL:
        dst = tl.load(flags_table + p).to(tl.pointer_type(tl.int64)) + rank
        fence_sys(GPU)
        tl.debug_barrier()
        flag_store_release(dst, target | code.to(tl.int64), p >= 0, sink_ptr, GPU)
    if WAIT:
        t0 = spin_start(GPU)
        v, ok = wait_flag_geq(flags_ptr + p, target, max_spins, t0, timeout_us, GPU)
        if not ok:
            report_timeout(status_ptr + STATUS_SLOT, p + 1)
        else:
            tl.store(status_ptr + ST_PEER_CODE + p, (v & FLAG_CODE_MASK).to(tl.int32))


@triton.jit(do_not_specialize=["rank", "epoch", "W", "max_spins", "timeout_us"])
def meta_exchange_kernel(
    meta_ptr,  # [W] int64 local: this rank's vector
    data_table,  # [R] int64: base of rank p's symmetric slots, int64 [2, R, W] (parity, source, word)
    flags_table,  # [R] int64: base of rank p's int64 flag array (one slot per source)
    flags_ptr,  # this rank's flag array
    slots_ptr,  # this rank's symmetric slots
    out_ptr,  # int64 local out: [R, W] (row p = rank p's vector), then [R] timeout words
    sink_ptr,  # int64 local scratch (unused: no masked lanes)
    rank,
    epoch,  # call counter, >= 1
    W,
    max_spins,
    timeout_us,
    WP: tl.constexpr,  # power of two >= W
    SIGNAL: tl.constexpr,
    WAIT: tl.constexpr,
    GPU: tl.constexpr,
):
    """All-gather of a small int64 vector through symmetric memory, grid ``(R,)``: program
    ``p`` stores this rank's vector into rank ``p``'s slot ``[epoch % 2, rank]`` and publishes
    flag ``epoch`` there (release, system scope; ``SIGNAL``), then waits for rank ``p``'s
    flag (acquire, bounded; ``WAIT``) and copies rank ``p``'s vector to row ``p`` of ``out``;
    ``out[R * W + p]`` = 1 if it never came (timeout), else 0.

    Slots alternate with the epoch's parity: a rank that passed call ``e`` may store call
    ``e + 1`` while a slower peer still copies call ``e`` out (it cannot store call ``e + 2``
    before every rank signalled ``e + 1``, i.e. finished its call-``e`` kernel)."""
    p = tl.program_id(0)
    R = tl.num_programs(0)
    par = (epoch % 2).to(tl.int64)
    w = tl.arange(0, WP)
    wm = w < W
    if SIGNAL:
        v = tl.load(meta_ptr + w, mask=wm)
        dst = tl.load(data_table + p).to(tl.pointer_type(tl.int64)) + (par * R + rank) * W
        tl.store(dst + w, v, mask=wm)
        fence_sys(GPU)
        tl.debug_barrier()
        flag = tl.load(flags_table + p).to(tl.pointer_type(tl.int64)) + rank
        flag_store_release(flag, epoch.to(tl.int64), p >= 0, sink_ptr, GPU)
    if WAIT:
        t0 = spin_start(GPU)
        _, ok = wait_flag_geq(flags_ptr + p, epoch.to(tl.int64), max_spins, t0, timeout_us, GPU)
        if ok:
            row = tl.load(slots_ptr + (par * R + p) * W + w, mask=wm)
            tl.store(out_ptr + p * W + w, row, mask=wm)
        tl.store(out_ptr + R * W + p, tl.where(ok, 0, 1).to(tl.int64))
