"""Device code of the prefill-specialised paged attention (``AttentionTiles.kernel == "fa"``),
written the way the fast flash-attention forward kernels for Hopper are. Host side:
:func:`fp4comm.attention.paged.paged_attention`; the generic kernel (decode, split-KV) is
:func:`fp4comm.kernels.attention.paged_attention_kernel`, whose cache-tile helpers (gather,
dequantization, dot) this one shares.

Layout of one program: sequence ``seq``, KV head ``kvh``, a tile of ``BLOCK_Q`` query
tokens times the ``GROUP_PAD`` query heads of the GQA group of ``kvh`` packed into the M
dim (row ``m`` = token ``m // GROUP_PAD``, head ``m % GROUP_PAD``; ``BLOCK_M = BLOCK_Q *
GROUP_PAD``, 128 at head dim <= 128 = two warpgroups of wgmma). At GQA 4 a tile spans 32
query positions, so exactly one K tile of ``BLOCK_N >= 32`` keys straddles the causal
diagonal (a 128-token tile of one head would straddle ``128 / BLOCK_N``). No KV splits.

What differs from the generic kernel:

* 1-D grid ordered longest first over *all* programs: ``pid`` = ``(q tile reversed, seq,
  kvh)`` with ``kvh`` fastest, so every sequence's and head's long causal tiles start before
  any short one (the generic grid reverses the q tiles within each (sequence, head) only).
* Keys ``[lo, hi)`` of a tile run as three ranges of whole ``BLOCK_N`` tiles aligned to
  multiples of ``BLOCK_N`` (a page of ``PAGE % BLOCK_N == 0`` keys then holds whole tiles:
  one block-table read a tile): first the tiles every row sees (below the causal diagonal
  and inside every row's sliding window) with no mask and no ``-inf`` guard, then the
  masked ones: the window's leading edge and the diagonal / ragged end.
* The unmasked step folds the score scale into the exponent (``exp2(s * c - m)``, one FMA a
  score; ``m = max(s) * c`` needs ``c >= 0``, so a negative descale's sign is moved into
  the queries once a program); ``c`` = softmax scale * log2(e) * q/k descales (per row in
  ``CVT`` mode 3: FP16 queries rescaled by a power of two, see the generic kernel).

Variants (``AttentionTiles`` fields, on by default since timed on H200, see
``fp4comm.attention.paged.attention_tiles``; and two the host derives from the layout):

* ``Q_SMEM`` (``fa_q_smem``; BF16 queries with BF16 operands only): Q is used as loaded, so
  Triton feeds the QK wgmma's A operand from shared memory (the build without it modifies Q,
  keeps it in shared memory and reloads it into registers with 8 ``ldmatrix`` a tile: sm_90
  ptxas, N = 128, D = 128: 246 registers vs 254). The score scale keeps its sign; a program
  whose scale is negative runs every tile through the masked step (``s * c`` before the max,
  sign-agnostic) instead of a second build of the unmasked loop (that one doubled the
  shared memory, past the 227 KB limit, and serialized the wgmmas).
* ``BT_LDG`` (``bt_ldg``): block-table reads outside Triton's pipeliner, see
  :func:`~fp4comm.kernels.attention._page_rows`: K/V copies prefetched ``num_stages - 1``
  tiles ahead instead of one.
* ``TMA`` (``fa_tma``, 2-byte caches; the host passes descriptors where a page holds whole
  tiles, see ``paged.fa_tensor_descriptors``): each K and V tile is one TMA copy, K and V
  issued together so one barrier wait covers both (V loaded after the softmax, as the
  pointer path does, gave two waits a tile and a CTA barrier between them: 488 vs 545
  TFLOP/s). Slots past a sequence's end in its last page are read too: V's are zeroed.
* ``BT_VEC`` (host: a tile spans 2, 4 or 8 pages and the block table is aligned): a tile's
  block-table entries in one vector read (:func:`_tile_pages_vec`).

Session-9 findings (H200, one 8k causal sequence, GQA 32 / 8, D 128, bf16; SDPA 618
TFLOP/s): the kernel with no block-table reads at all (identity pages) ran 489 TFLOP/s at
pages of 16 vs 380 with them: the per-row ``ld.global.nc`` of the entries, which ptxas
serialized two at a time ahead of the QK wgmma, cost 22%; one vector read a tile: 446-449.
Per-tile address arithmetic (:func:`_tile_rows`) cut the pointer-path key loop from 803 to
648 SASS instructions at pages of 16 and 675 to 529 at 128 (no measurable change at 16; 419
-> 496 at 128). Carrying the next tile's entries through the loop compiled to the same SASS
(the pipeliner places the read with the copies it feeds).
"""

import triton
import triton.language as tl

from .attention import (
    _finish, _online_softmax_step, _page_rows, pv_dot, pv_update, q_rows_to_f16, q_tile, qk_dot, qk_scores, visible,
)


@triton.jit
def _tile_rows(page, in_blk, start, stride_b, stride_s, stride_h, kvh, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets (int64) of the keys ``start + arange(BLOCK_N)`` of KV head ``kvh`` in a
    cache of strides ``(stride_b, stride_s, stride_h)``; ``page``, ``in_blk`` from
    :func:`~fp4comm.kernels.attention._page_rows`. Tiles here start at multiples of
    ``BLOCK_N``, so with a power-of-two ``PAGE`` the in-page part is a loop-invariant vector
    (hoisted out of the key loop) plus, when one page holds the whole tile, a scalar: per
    tile only the page part is computed instead of ``page * stride_b + in_blk * stride_s``
    in 64 bits for every row (see the module notes)."""
    r = tl.arange(0, BLOCK_N)
    if PAGE >= BLOCK_N:  # one page: scalar base + invariant rows
        return (page * stride_b + (start % PAGE) * stride_s + kvh * stride_h) + r * stride_s
    elif PAGE > 0:  # BLOCK_N // PAGE whole pages: rows start % PAGE == 0 within each
        return page * stride_b + ((r % PAGE) * stride_s + kvh * stride_h)
    else:
        return page * stride_b + in_blk * stride_s + kvh * stride_h


@triton.jit
def _times_rows(s, c):
    """``s [M, N]`` times the score scale ``c``: one value (a scalar) or one a row (``[M]``,
    FP16 operands: each query row's power of two folded in)."""
    if len(c.shape) == 0:
        return s * c
    else:
        return s * c[:, None]


@triton.jit
def _ld_nc_v2(ptr):
    """Two int32 at an 8-byte aligned ``ptr``: one ``ld.global.nc.v2.b32`` (GPU only)."""
    return tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [ptr],
                                     dtype=(tl.int32,) * 2, is_pure=True, pack=1)


@triton.jit
def _ld_nc_v4(ptr):
    """Four int32 at a 16-byte aligned ``ptr``: one ``ld.global.nc.v4.b32`` (GPU only)."""
    return tl.inline_asm_elementwise("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [ptr],
                                     dtype=(tl.int32,) * 4, is_pure=True, pack=1)


@triton.jit
def _pick2(j, e0, e1):
    return tl.where((j & 1) == 1, e1, e0)


@triton.jit
def _pick4(j, e0, e1, e2, e3):
    return tl.where((j & 2) == 2, _pick2(j, e2, e3), _pick2(j, e0, e1))


@triton.jit
def _tile_pages_vec(bt_row, start, k_end, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Blocks (int64) of the keys ``start + arange(BLOCK_N)`` of a whole tile spanning ``BLOCK_N
    // PAGE`` = 2, 4 or 8 pages: every thread reads all of the tile's block-table entries
    with one 8- or 16-byte load (two 16-byte ones for 8) instead of one 4-byte load a row it
    holds (a 128-key tile of 16-key pages: 8 ``ld.global.nc`` a thread, which ptxas issues
    two at a time, each pair waited for before the QK wgmma, under the kernel's register
    pressure; the two vector loads are still waited for one after the other, also when
    written as one asm block). The per-row selects fold away: the page index of each
    register's row is a compile-time constant. Entries past ``k_end`` (the pipeliner's
    read-ahead) read the row's first ones."""
    j = tl.arange(0, BLOCK_N) // PAGE
    first = bt_row + tl.where(start < k_end, start // PAGE, 0)
    if BLOCK_N // PAGE == 8:
        e0, e1, e2, e3 = _ld_nc_v4(first)
        e4, e5, e6, e7 = _ld_nc_v4(first + 4)
        page = tl.where((j & 4) == 4, _pick4(j, e4, e5, e6, e7), _pick4(j, e0, e1, e2, e3))
    elif BLOCK_N // PAGE == 4:
        e0, e1, e2, e3 = _ld_nc_v4(first)
        page = _pick4(j, e0, e1, e2, e3)
    else:
        e0, e1 = _ld_nc_v2(first)
        page = _pick2(j, e0, e1)
    return page.to(tl.int64)


@triton.jit
def _fa_tile(
    start, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
    k_cache, v_cache, k_scales, v_scales, k_desc, v_desc,
    BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
    MASK: tl.constexpr, PAGE: tl.constexpr, CVT: tl.constexpr, INTERPRET: tl.constexpr,
    BT_LDG: tl.constexpr, TMA: tl.constexpr, BT_VEC: tl.constexpr,
):
    """Keys ``[start, start + BLOCK_N)``: gather, dequantize, score, online-softmax update.
    ``MASK`` False: the whole tile is visible to every row (no bounds, causal or window
    mask; ``m_i`` is finite after it). ``MASK`` True: keys clipped to ``k_end`` and masked per
    row; rows that have seen nothing keep ``m = -inf`` and ``p = alpha = 0`` (no NaN).
    ``k_cache``, ``v_cache``, ``k_scales``, ``v_scales``: (pointer, block stride, slot stride,
    head stride) of each cache (the scale caches only read with ``DYNAMIC``). ``TMA``: K and V
    tiles are read through the tensor descriptors ``k_desc`` / ``v_desc`` (rows = cache slots,
    columns = head x dim; ``PAGE >= BLOCK_N``: one page holds the tile)."""
    kc_ptr, stride_kcb, stride_kcs, stride_kch = k_cache
    vc_ptr, stride_vcb, stride_vcs, stride_vch = v_cache
    ksc_ptr, stride_ksb, stride_kss, stride_ksh = k_scales
    vsc_ptr, stride_vsb, stride_vss, stride_vsh = v_scales
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < k_end
    if BT_VEC and not MASK and not INTERPRET:
        page = _tile_pages_vec(bt_row, start, k_end, PAGE, BLOCK_N)
        in_blk = page
    else:
        page, in_blk = _page_rows(bt_row, start, offs_n, n_ok, k_end, block_size, PAGE, BLOCK_N, MASK, BT_LDG, INTERPRET)
    if TMA:  # K and V issued together: one barrier wait a tile (V loaded after the softmax: two)
        slot = (page * PAGE + start % PAGE).to(tl.int32)
        k = k_desc.load([slot, kvh * offs_d.shape[0]])
        v = v_desc.load([slot, kvh * offs_d.shape[0]])
        s = qk_dot(q, k, CVT, INTERPRET)
    else:
        k_rows = _tile_rows(page, in_blk, start, stride_kcb, stride_kcs, stride_kch, kvh, PAGE, BLOCK_N)
        s = qk_scores(q, kc_ptr, k_rows, n_ok, offs_d, MASK, CVT, INTERPRET)
    if DYNAMIC:  # per-key K scales (>= 0) multiply the score columns
        ks = tl.load(ksc_ptr + _tile_rows(page, in_blk, start, stride_ksb, stride_kss, stride_ksh, kvh, PAGE, BLOCK_N),
                     mask=n_ok, other=0.0)
        s = s * ks[None, :]
    if MASK:
        s = tl.where(visible(offs_n, n_ok, pos, window, CAUSAL, USE_WINDOW), _times_rows(s, qk_scale), float("-inf"))
        p, alpha, m_new, l_i = _online_softmax_step(s, m_i, l_i)
    else:  # every row sees keys: m_new finite; the score scale goes into exp2's FMA
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale >= 0: max(s * c) = max(s) * c
        p = tl.math.exp2(_times_rows(s, qk_scale) - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
    vs_ptrs = vsc_ptr + _tile_rows(page, in_blk, start, stride_vsb, stride_vss, stride_vsh, kvh, PAGE, BLOCK_N)
    if TMA:
        if MASK:  # slots past the sequence's end in its last page: p = 0 there, but 0 * NaN is not 0
            v = tl.where(n_ok[:, None], v, 0)
        acc = pv_dot(p, alpha, acc, v, n_ok, vs_ptrs, DYNAMIC, CVT, INTERPRET)
    else:
        v_rows = _tile_rows(page, in_blk, start, stride_vcb, stride_vcs, stride_vch, kvh, PAGE, BLOCK_N)
        acc = pv_update(p, alpha, acc, v_rows, n_ok, offs_d, vc_ptr, vs_ptrs, DYNAMIC, MASK, CVT, INTERPRET)
    return m_new, l_i, acc


@triton.jit
def _fa_range(
    k_from, k_to, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
    k_cache, v_cache, k_scales, v_scales, k_desc, v_desc,
    BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
    MASK: tl.constexpr, PAGE: tl.constexpr, CVT: tl.constexpr, INTERPRET: tl.constexpr,
    BT_LDG: tl.constexpr, TMA: tl.constexpr, BT_VEC: tl.constexpr,
):
    """Tiles starting at ``k_from, k_from + BLOCK_N, ... < k_to`` (a ``while`` loop under the
    interpreter, a software-pipelined ``for`` when compiled; see the generic kernel)."""
    if INTERPRET:
        start = k_from
        while start < k_to:
            m_i, l_i, acc = _fa_tile(
                start, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
                k_cache, v_cache, k_scales, v_scales, k_desc, v_desc,
                BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, MASK, PAGE, CVT, INTERPRET, BT_LDG, TMA, BT_VEC)
            start += BLOCK_N
    else:
        for start in range(k_from, k_to, BLOCK_N):
            m_i, l_i, acc = _fa_tile(
                start, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
                k_cache, v_cache, k_scales, v_scales, k_desc, v_desc,
                BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, MASK, PAGE, CVT, INTERPRET, BT_LDG, TMA, BT_VEC)
    return m_i, l_i, acc


@triton.jit
def paged_prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr,
    bt_ptr, seq_lens_ptr, cu_q_ptr,
    qd_ptr, kd_ptr, vd_ptr, ksc_ptr, vsc_ptr,
    sm_scale_log2, group, block_size, window, num_seqs, num_kv_heads, num_q_tiles,
    stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    stride_bt,
    stride_qds, stride_qdh, stride_kds, stride_kdh, stride_vds, stride_vdh,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DYNAMIC: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
    PAGE: tl.constexpr, CVT: tl.constexpr, INTERPRET: tl.constexpr,
    Q_SMEM: tl.constexpr = False, BT_LDG: tl.constexpr = False, TMA: tl.constexpr = False, k_desc=None, v_desc=None,
    BT_VEC: tl.constexpr = False,
):
    """Grid ``(num_q_tiles * num_seqs * num_kv_heads,)``; arguments as the generic kernel's
    (no workspace: one split). Writes ``out [T, Hq, HEAD_DIM]``; rows with no key -> zeros."""
    pid = tl.program_id(0)
    kvh = pid % num_kv_heads
    rest = pid // num_kv_heads
    seq = rest % num_seqs
    qt = num_q_tiles - 1 - rest // num_seqs
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    L = tl.load(seq_lens_ptr + seq)
    if qt * BLOCK_Q < q_len:
        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
        row_ok, rows_t, rows_h, pos, offs_d, q, qk_scale, v_descale = q_tile(
            q_ptr, qd_ptr, kd_ptr, vd_ptr, seq, kvh, qt, q_start, q_len, L, group, sm_scale_log2,
            stride_qt, stride_qh, stride_qds, stride_qdh, stride_kds, stride_kdh, stride_vds, stride_vdh,
            BLOCK_Q, GROUP_PAD, HEAD_DIM)
        scale_neg = qk_scale < 0.0
        if not Q_SMEM:  # (with Q_SMEM: BF16 queries used as loaded, wgmma reads them from shared memory)
            q = q.to(tl.float32) * tl.where(scale_neg, -1.0, 1.0)  # exact; leaves the score scale >= 0
            qk_scale = tl.abs(qk_scale)
            if CVT == 3:  # FP16 operands: per-row power-of-two rescale into FP16's range (exact)
                q, qk_scale = q_rows_to_f16(q, qk_scale)
            else:
                q = q.to(tl.bfloat16)  # exact: the values came from BF16 / E4M3

        # keys of the tile: [lo, hi); every row sees [lo_all, hi_all)
        first_pos = L - q_len + qt * BLOCK_Q
        last_pos = L - q_len + tl.minimum(q_len, (qt + 1) * BLOCK_Q) - 1
        if CAUSAL:
            hi = last_pos + 1
            hi_all = first_pos + 1
        else:
            hi = L
            hi_all = L
        if USE_WINDOW:
            lo = tl.maximum(first_pos - window + 1, 0)
            lo_all = tl.maximum(last_pos - window + 1, 0)
        else:
            lo = 0
            lo_all = 0
        lo = (lo // BLOCK_N) * BLOCK_N
        # unmasked whole tiles [f0, f1), then masked [lo, f0) and [f1, hi)
        f0 = tl.cdiv(lo_all, BLOCK_N) * BLOCK_N
        f1 = tl.maximum((tl.maximum(hi_all, 0) // BLOCK_N) * BLOCK_N, f0)
        if Q_SMEM:  # negative score scale: no unmasked tiles (the masked step scales s before its max)
            f1 = tl.where(scale_neg, f0, f1)
        hi = tl.maximum(hi, 0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        k_cache = (kc_ptr, stride_kcb, stride_kcs, stride_kch)
        v_cache = (vc_ptr, stride_vcb, stride_vcs, stride_vch)
        k_scales = (ksc_ptr, stride_ksb, stride_kss, stride_ksh)
        v_scales = (vsc_ptr, stride_vsb, stride_vss, stride_vsh)
        m_i, l_i, acc = _fa_range(
            f0, f1, hi, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
            k_cache, v_cache, k_scales, v_scales, k_desc, v_desc,
            BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, False, PAGE, CVT, INTERPRET, BT_LDG, TMA, BT_VEC)
        if USE_WINDOW:
            m_i, l_i, acc = _fa_range(
                lo, tl.minimum(f0, hi), hi, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
                k_cache, v_cache, k_scales, v_scales, k_desc, v_desc,
                BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, True, PAGE, CVT, INTERPRET, BT_LDG, TMA, BT_VEC)
        m_i, l_i, acc = _fa_range(
            f1, hi, hi, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
            k_cache, v_cache, k_scales, v_scales, k_desc, v_desc,
            BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, True, PAGE, CVT, INTERPRET, BT_LDG, TMA, BT_VEC)

        _finish(acc, m_i, l_i, v_descale, 0, rows_t, rows_h, row_ok, offs_d,
                out_ptr, stride_ot, stride_oh, out_ptr, 0, 0, 0, out_ptr, 0, 0, False, INTERPRET)
