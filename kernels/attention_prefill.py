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

Variants (``AttentionTiles`` fields; both on by default since timed on H200, see
``fp4comm.attention.paged.attention_tiles``):

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
"""

import triton
import triton.language as tl

from .attention import _finish, _online_softmax_step, _page_rows, pv_update, q_rows_to_f16, q_tile, qk_scores, visible


@triton.jit
def _fa_tile(
    start, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
    k_cache, v_cache, k_scales, v_scales,
    BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
    MASK: tl.constexpr, PAGE: tl.constexpr, CVT: tl.constexpr, INTERPRET: tl.constexpr,
    BT_LDG: tl.constexpr,
):
    """Keys ``[start, start + BLOCK_N)``: gather, dequantize, score, online-softmax update.
    ``MASK`` False: the whole tile is visible to every row (no bounds, causal or window
    mask; ``m_i`` is finite after it). ``MASK`` True: keys clipped to ``k_end`` and masked per
    row; rows that have seen nothing keep ``m = -inf`` and ``p = alpha = 0`` (no NaN).
    ``k_cache``, ``v_cache``, ``k_scales``, ``v_scales``: (pointer, block stride, slot stride,
    head stride) of each cache (the scale caches only read with ``DYNAMIC``)."""
    kc_ptr, stride_kcb, stride_kcs, stride_kch = k_cache
    vc_ptr, stride_vcb, stride_vcs, stride_vch = v_cache
    ksc_ptr, stride_ksb, stride_kss, stride_ksh = k_scales
    vsc_ptr, stride_vsb, stride_vss, stride_vsh = v_scales
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < k_end
    page, in_blk = _page_rows(bt_row, start, offs_n, n_ok, k_end, block_size, PAGE, BLOCK_N, MASK, BT_LDG, INTERPRET)
    k_rows = page * stride_kcb + in_blk * stride_kcs + kvh * stride_kch
    v_rows = page * stride_vcb + in_blk * stride_vcs + kvh * stride_vch
    s = qk_scores(q, kc_ptr, k_rows, n_ok, offs_d, MASK, CVT, INTERPRET)
    if DYNAMIC:  # per-key K scales (>= 0) multiply the score columns
        ks = tl.load(ksc_ptr + page * stride_ksb + in_blk * stride_kss + kvh * stride_ksh, mask=n_ok, other=0.0)
        s = s * ks[None, :]
    if MASK:
        s = tl.where(visible(offs_n, n_ok, pos, window, CAUSAL, USE_WINDOW), s * qk_scale[:, None], float("-inf"))
        p, alpha, m_new, l_i = _online_softmax_step(s, m_i, l_i)
    else:  # every row sees keys: m_new finite; the score scale goes into exp2's FMA
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale >= 0: max(s * c) = max(s) * c
        p = tl.math.exp2(s * qk_scale[:, None] - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
    acc = pv_update(p, alpha, acc, v_rows, n_ok, offs_d, vc_ptr, vsc_ptr + page * stride_vsb + in_blk * stride_vss
                    + kvh * stride_vsh, DYNAMIC, MASK, CVT, INTERPRET)
    return m_new, l_i, acc


@triton.jit
def _fa_range(
    k_from, k_to, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
    k_cache, v_cache, k_scales, v_scales,
    BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
    MASK: tl.constexpr, PAGE: tl.constexpr, CVT: tl.constexpr, INTERPRET: tl.constexpr,
    BT_LDG: tl.constexpr,
):
    """Tiles starting at ``k_from, k_from + BLOCK_N, ... < k_to`` (a ``while`` loop under the
    interpreter, a software-pipelined ``for`` when compiled; see the generic kernel)."""
    if INTERPRET:
        start = k_from
        while start < k_to:
            m_i, l_i, acc = _fa_tile(
                start, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
                k_cache, v_cache, k_scales, v_scales,
                BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, MASK, PAGE, CVT, INTERPRET, BT_LDG)
            start += BLOCK_N
    else:
        for start in range(k_from, k_to, BLOCK_N):
            m_i, l_i, acc = _fa_tile(
                start, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
                k_cache, v_cache, k_scales, v_scales,
                BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, MASK, PAGE, CVT, INTERPRET, BT_LDG)
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
    Q_SMEM: tl.constexpr = False, BT_LDG: tl.constexpr = False,
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
        if Q_SMEM:  # BF16 queries used as loaded (wgmma reads them from shared memory), see below
            qk_scale = tl.zeros([BLOCK_M], tl.float32) + qk_scale
        else:
            q = q.to(tl.float32) * tl.where(scale_neg, -1.0, 1.0)  # exact; leaves the score scale >= 0
            qk_scale = tl.abs(qk_scale)
            if CVT == 3:  # FP16 operands: per-row power-of-two rescale into FP16's range (exact)
                q, qk_scale = q_rows_to_f16(q, qk_scale)
            else:
                q = q.to(tl.bfloat16)  # exact: the values came from BF16 / E4M3
                qk_scale = tl.zeros([BLOCK_M], tl.float32) + qk_scale

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
            k_cache, v_cache, k_scales, v_scales,
            BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, False, PAGE, CVT, INTERPRET, BT_LDG)
        if USE_WINDOW:
            m_i, l_i, acc = _fa_range(
                lo, tl.minimum(f0, hi), hi, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
                k_cache, v_cache, k_scales, v_scales,
                BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, True, PAGE, CVT, INTERPRET, BT_LDG)
        m_i, l_i, acc = _fa_range(
            f1, hi, hi, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
            k_cache, v_cache, k_scales, v_scales,
            BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, True, PAGE, CVT, INTERPRET, BT_LDG)

        _finish(acc, m_i, l_i, v_descale, 0, rows_t, rows_h, row_ok, offs_d,
                out_ptr, stride_ot, stride_oh, out_ptr, 0, 0, 0, out_ptr, 0, 0, False, INTERPRET)
