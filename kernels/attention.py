"""Device code of paged attention over bf16 / fp8 / int8 KV caches and of MLA decode.
Host side: :mod:`fp4comm.attention.paged` and :mod:`fp4comm.attention.mla`.

Layout of one program of :func:`paged_attention_kernel`: sequence ``seq``, a tile of
``BLOCK_Q`` of its query tokens, KV head ``kvh``, split ``split``. The ``group`` query heads
sharing ``kvh`` are packed into the M dim of the tile (row ``m`` = token ``m // GROUP_PAD``,
head ``m % GROUP_PAD``), so each K/V tile read from the cache serves every head of the group.
K/V tiles are gathered key by key through the block table (any ``block_size``; a power of
two is a constexpr, and a page holding whole tiles costs one block-table read a tile),
dequantized in registers to BF16 (exact for E4M3 and int8; see :func:`_kv_to_bf16` for the
GPU conversions), fed to BF16 ``tl.dot`` with FP32 accumulation (mode 3: FP16 operands,
see :func:`_kv_operand`); the softmax is online, in FP32, base 2. Per-tensor / per-(sequence,
head) descales are folded into the score scale (``q_descale * k_descale``) and into the output
(``v_descale``); per-key dynamic scales multiply the score columns (K) and the
probabilities (V) before the second dot.

``INTERPRET`` (constexpr, True only under ``TRITON_INTERPRET=1``): Triton 3.6's interpreter
holds scalars as 1-element numpy arrays, which numpy 2 refuses as ``range()`` bounds, so
the key loop is a ``while`` there; compiled code keeps the ``for`` loop that Triton
software-pipelines (``num_stages``). It also selects explicit BF16 rounding (see
:func:`_to_bf16`) and FP32 dots of the BF16 tiles (see :func:`_dot`). Loop bodies live in one helper each, so both paths run the same code.
"""

import triton
import triton.language as tl

from .common import e4m3_decode
from .kv_cache import bf16_rne
from .sync import arrive_last


@triton.jit
def _to_bf16(x, INTERPRET: tl.constexpr):
    """FP32 -> BF16 (RNE). The GPU cast rounds to nearest even; the interpreter's truncates,
    so under it the rounding is done explicitly."""
    if INTERPRET:
        return bf16_rne(x)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _e4m3x4_to_bf16(x, PURE: tl.constexpr):
    """E4M3 codes (a uint8 tile) -> BF16 with integer ops and one BF16 multiply per pair,
    4 codes per 32-bit register: ``prmt`` puts code ``b`` in the low byte of a 16-bit lane
    and its sign, replicated, in the high byte; ``<< 4`` and the mask ``0x87F0`` leave
    ``sign << 15 | (b & 0x7F) << 4``: a BF16 whose exponent/mantissa fields are E4M3's, i.e.
    the code's value times ``2^-120`` (subnormals included: BF16 has them down to
    ``2^-133``); ``mul.rn.bf16x2`` by ``2^120`` (``0x7B80``) is exact. All 254 finite codes
    convert exactly. The NaN codes (``0x7F``/``0xFF``) would read as +-480: ``(b & 0x7F) +
    1`` has bit 7 set exactly for them, and ``prmt``'s sign-replicating selectors (``0x9988``,
    ``0xBBAA``) spread that bit over the code's 16-bit lane, OR-ed in -> ``0xFFFF`` (NaN):
    6 more integer ops per 4 codes. No F2F conversions (quarter-rate on Hopper), unlike
    ``cvt.rn.f16x2.e4m3x2`` + ``cvt.bf16.f16``."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t0, t1, t2, t3;
        prmt.b32 t0, $2, 0, 0x9180;
        prmt.b32 t1, $2, 0, 0xB3A2;
        shl.b32 t0, t0, 4;
        shl.b32 t1, t1, 4;
        and.b32 t0, t0, 0x87F087F0;
        and.b32 t1, t1, 0x87F087F0;
        mov.b32 t2, 0x7B807B80;
        mul.rn.bf16x2 t0, t0, t2;
        mul.rn.bf16x2 t1, t1, t2;
        and.b32 t2, $2, 0x7F7F7F7F;
        add.u32 t2, t2, 0x01010101;
        prmt.b32 t3, t2, 0, 0x9988;
        prmt.b32 t2, t2, 0, 0xBBAA;
        or.b32 $0, t0, t3;
        or.b32 $1, t1, t2;
        }""",
        "=r,=r,r", [x], dtype=tl.bfloat16, is_pure=PURE, pack=4)


@triton.jit
def _e4m3x4_to_f16(x, PURE: tl.constexpr):
    """E4M3 codes (a uint8 tile) -> FP16 with the hardware conversion (sm_89+):
    ``cvt.rn.f16x2.e4m3x2``, one F2F per pair of codes, exact for every finite code, NaN
    codes (``0x7F``/``0xFF``) -> NaN. ``PURE`` False keeps Triton from moving it past a layout
    change (see :func:`_kv_operand`)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b16 lo, hi;
        mov.b32 {lo, hi}, $2;
        cvt.rn.f16x2.e4m3x2 $0, lo;
        cvt.rn.f16x2.e4m3x2 $1, hi;
        }""",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=PURE, pack=4)


@triton.jit
def _i8x4_to_f16(x, PURE: tl.constexpr):
    """int8 codes (a uint8 tile) -> FP16, exact, no F2F: ``b ^ 0x80`` is ``b + 128`` as an
    unsigned byte; placed under the high byte ``0x64`` it is the FP16 ``1024 + b + 128``
    (FP16's quantum at 1024 is 1), and ``sub.f16x2`` of ``1152`` (``0x6480``) leaves ``b``
    exactly. 1 ``xor`` + 2 ``prmt`` + 2 ``sub.f16x2`` per 4 codes."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t, a, b, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 c, 0x64646464;
        prmt.b32 a, t, c, 0x5150;
        prmt.b32 b, t, c, 0x5352;
        mov.b32 c, 0x64806480;
        sub.rn.f16x2 $0, a, c;
        sub.rn.f16x2 $1, b, c;
        }""",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=PURE, pack=4)


@triton.jit
def _e4m3_to_f16_portable(x):
    """E4M3 tile -> FP16 by integer arithmetic (the interpreter's FP8 casts are unreliable):
    exact for every code, NaN codes -> NaN."""
    b = x.to(tl.uint8, bitcast=True).to(tl.int32)
    return e4m3_decode(b).to(tl.float16)


@triton.jit
def _keep_layout(x):
    """Identity on a BF16 tile, marked impure: Triton does not move the ops before it past
    the layout change after it (an optimization barrier; GPU only)."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.bfloat16, is_pure=False, pack=2)


@triton.jit
def _kv_to_bf16(x, CVT: tl.constexpr, IS_V: tl.constexpr, INTERPRET: tl.constexpr):
    """Dequantize a cache tile to BF16 (exact for finite E4M3 codes and for int8).

    ``CVT`` (chosen by :func:`fp4comm.attention.paged.kv_convert_mode`) for E4M3 tiles:

    * 0: Triton's cast (under the interpreter, whose FP8 cast loses the NaN codes,
      :func:`~fp4comm.kernels.common.e4m3_decode`: exact, NaN kept). On
      sm_90: ``cvt.rn.f16x2.e4m3x2`` + ``cvt.bf16.f16``, 1.5 F2F per value, and the cast of
      the V tile is hoisted past its layout change, so V is read from shared memory one byte
      per instruction (8-bit operands have no transposing ``ldmatrix``).
    * 1: :func:`_e4m3x4_to_bf16` (integer ops, no F2F, NaN kept); still hoisted for V (byte reads).
    * 2: as 1, but V's conversion is marked impure so Triton keeps it before the layout
      change: V goes fp8 -> registers (16-byte reads) -> BF16 -> shared -> ``ldmatrix.trans``
      (more shared memory, no byte reads). K's conversion is hoisted in every mode (its
      operand layout reads 8-byte runs).

    int8 (modes 0 and 2 only; 2 keeps V's conversion before its layout change with
    :func:`_keep_layout`) always goes through FP32: Triton lowers that with byte permutes and magic-number
    arithmetic (no F2F), and the interpreter's direct int -> BF16 cast is wrong."""
    if x.dtype == tl.int8:
        y = x.to(tl.float32).to(tl.bfloat16)
        if IS_V and CVT == 2:
            y = _keep_layout(y)
        return y
    elif x.dtype == tl.bfloat16:
        return x
    elif INTERPRET:  # the interpreter's FP8 cast mishandles the NaN codes: bit arithmetic
        return e4m3_decode(x.to(tl.uint8, bitcast=True).to(tl.int32)).to(tl.bfloat16)
    elif CVT == 0:
        return x.to(tl.bfloat16)
    else:
        return _e4m3x4_to_bf16(x.to(tl.uint8, bitcast=True), not (IS_V and CVT == 2))


@triton.jit
def _kv_operand(x, CVT: tl.constexpr, IS_V: tl.constexpr, INTERPRET: tl.constexpr):
    """A cache tile as the operand of the dots: BF16 (modes 0-2, :func:`_kv_to_bf16`) or, in
    mode 3, FP16 (exact for every E4M3 code, NaN kept, and for int8): on the GPU the
    hardware E4M3 conversion (:func:`_e4m3x4_to_f16`) or the int8 magic-number trick
    (:func:`_i8x4_to_f16`), K's hoisted into its operand layout (8-byte runs from shared
    memory), V's kept before its layout change (16-byte global reads, FP16 ``ldmatrix.trans``
    afterwards: 8-bit operands have no transposing ``ldmatrix``); under the interpreter
    the portable conversions (bit arithmetic for E4M3)."""
    if CVT == 3:
        if x.dtype == tl.bfloat16:
            return x
        elif INTERPRET:
            if x.dtype == tl.int8:
                return x.to(tl.float32).to(tl.float16)
            else:
                return _e4m3_to_f16_portable(x)
        elif x.dtype == tl.int8:
            return _i8x4_to_f16(x.to(tl.uint8, bitcast=True), not IS_V)
        else:
            return _e4m3x4_to_f16(x.to(tl.uint8, bitcast=True), not IS_V)
    else:
        return _kv_to_bf16(x, CVT, IS_V, INTERPRET)


@triton.jit
def _to_operand(p, CVT: tl.constexpr, INTERPRET: tl.constexpr):
    """FP32 probabilities -> the dot operand type of mode ``CVT`` (FP16 in mode 3, else BF16), RNE."""
    if CVT == 3:
        return p.to(tl.float16)
    else:
        return _to_bf16(p, INTERPRET)


@triton.jit
def _pow2_exponent_scale(a, TARGET: tl.constexpr):
    """For FP32 ``a >= 0``: ``(f, 1 / f)``, powers of two with ``a * f`` in ``[2^TARGET,
    2^(TARGET+1))`` when ``a`` is normal and the exponents in range (else clamped, both
    normal): an exact rescale into the range of FP16."""
    e = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    fe = tl.minimum(tl.maximum(127 + 127 + TARGET - e, 2), 252)
    f = (fe << 23).to(tl.float32, bitcast=True)
    inv = ((254 - fe) << 23).to(tl.float32, bitcast=True)
    return f, inv


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    """``acc + a @ b`` for BF16 ``a``, ``b`` with FP32 accumulation.

    Triton 3.6's interpreter keeps BF16 tensors as raw uint16 and its ``tl.dot`` multiplies
    those bit patterns; under it the (exact) FP32 upcasts are multiplied instead.
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _online_softmax_step(s, m_i, l_i):
    """One step of the online softmax (base 2) over score tile ``s`` ``[M, N]`` (masked = -inf).

    Returns ``(p, alpha, m_new, l_new)``. Rows that have seen only -inf keep ``m = -inf`` and
    get ``p = 0``, ``alpha = 0``: no ``-inf - -inf`` NaN, ever.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def _store_rows(o, rows_t, rows_h, row_ok, offs_d, out_ptr, stride_ot, stride_oh, INTERPRET: tl.constexpr):
    """Store FP32 rows ``o [M, HEAD_DIM]`` at ``out[rows_t, rows_h]`` where ``row_ok``, in the
    output's dtype (BF16 round-to-nearest-even)."""
    ptrs = out_ptr + rows_t[:, None] * stride_ot + rows_h[:, None] * stride_oh + offs_d[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptrs, _to_bf16(o, INTERPRET), mask=row_ok[:, None])
    else:
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_split_rows(ws_o_ptr, ws_lse_ptr, rows_t, rows_h, row_ok, out_ptr, stride_ot, stride_oh,
                      stride_wss, stride_wst, stride_wsh, stride_lss, stride_lst,
                      NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, INTERPRET: tl.constexpr):
    """Store into ``out`` the ``NUM_SPLITS`` partial outputs of rows ``(rows_t, rows_h)``
    merged by their base-2 log-sum-exp (the formula of :func:`combine_splits_kernel`, splits
    summed in order); rows whose splits are all empty -> zeros. ``CD`` columns at a time
    and one split a step, so the merge needs fewer registers than the kernel's main loop
    (sm_90, one-warp fp8 decode: 161 vs 159 without it; loads of several splits at once,
    ``[splits, rows, columns]``, took 195-206 and cost resident programs). The loads bypass
    L1 (``.cg``): other programs of the launch wrote the workspace."""
    CD: tl.constexpr = min(32, HEAD_DIM)
    lse_rows = ws_lse_ptr + rows_t * stride_lst + rows_h
    m = tl.full(rows_t.shape, float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(lse_rows + s * stride_lss, mask=row_ok, other=float("-inf"), cache_modifier=".cg"))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros(rows_t.shape, tl.float32)
    for s in range(NUM_SPLITS):
        den += tl.math.exp2(tl.load(lse_rows + s * stride_lss, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                            - m_use)
    inv = tl.where(den > 0.0, 1.0 / tl.maximum(den, 1e-30), 0.0)
    for d0 in tl.static_range(0, HEAD_DIM, CD):
        offs_d = d0 + tl.arange(0, CD)
        o_rows = ws_o_ptr + rows_t[:, None] * stride_wst + rows_h[:, None] * stride_wsh + offs_d[None, :]
        acc = tl.zeros([rows_t.shape[0], CD], tl.float32)
        for s in range(NUM_SPLITS):
            w = tl.math.exp2(tl.load(lse_rows + s * stride_lss, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                             - m_use)
            acc += w[:, None] * tl.load(o_rows + s * stride_wss, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
        _store_rows(acc * inv[:, None], rows_t, rows_h, row_ok, offs_d, out_ptr, stride_ot, stride_oh, INTERPRET)


@triton.jit
def _finish(acc, m_i, l_i, v_descale, split, rows_t, rows_h, row_ok, offs_d,
            out_ptr, stride_ot, stride_oh,
            ws_o_ptr, stride_wss, stride_wst, stride_wsh,
            ws_lse_ptr, stride_lss, stride_lst,
            SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    """Normalize and store one tile: straight to ``out`` (one split) or, with ``SPLIT``, the
    normalized partial output and its base-2 log-sum-exp to the workspace."""
    inv = tl.where(l_i > 0.0, v_descale / tl.maximum(l_i, 1e-30), 0.0)
    o = acc * inv[:, None]
    if not SPLIT:
        _store_rows(o, rows_t, rows_h, row_ok, offs_d, out_ptr, stride_ot, stride_oh, INTERPRET)
    else:
        ptrs = ws_o_ptr + split * stride_wss + rows_t[:, None] * stride_wst + rows_h[:, None] * stride_wsh
        tl.store(ptrs + offs_d[None, :], o, mask=row_ok[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(ws_lse_ptr + split * stride_lss + rows_t * stride_lst + rows_h, lse, mask=row_ok)


@triton.jit
def _ld_nc_b32(ptr):
    """``ld.global.nc.b32`` (GPU only): a load Triton's pipeliner does not see (see
    :func:`_page_rows`); the block table is read-only while the kernel runs."""
    return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _page_rows(bt_row, start, offs_n, n_ok, k_end, block_size, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr, BT_LDG: tl.constexpr = False, INTERPRET: tl.constexpr = False):
    """Block and in-block row (int64) of keys ``offs_n = start + arange(BLOCK_N)``.

    ``PAGE`` = the block size when it is a power of two (shifts, and when ``PAGE`` is a
    multiple of ``BLOCK_N`` the whole tile is one contiguous run of one page: a single
    block-table entry), else 0 (runtime ``block_size``, one entry per key).

    ``BT_LDG`` (unmasked tiles on the GPU): the block-table entries are read with
    :func:`_ld_nc_b32` instead of ``tl.load``. Triton's pipeliner turns a ``tl.load`` of the
    block table into a ``cp.async`` one stage ahead of the K/V copies it addresses, so with
    ``num_stages`` 3 the K/V copies of tile ``i + 1`` are issued at the end of iteration ``i``
    and waited for (``cp.async.wait_group 0``) at the top of ``i + 1``: no overlap of a
    program's loads with its own compute. With the entries read outside the pipeliner the
    K/V copies are the only pipelined loads: ``num_stages - 1`` tiles ahead; the
    ``ld.global.nc`` (one per page a thread: a thread's rows of a 128-key tile lie in 8
    different 16-key pages, and every thread reads the same 8 entries) stalls the issue of
    those copies instead. The pipeliner also evaluates the addresses of the tile after the
    loop's last one (and of the first tile of an empty loop), and an inline-asm load is not
    predicated off as its own loads are: keys at or past ``k_end`` read entry 0 (every table
    used with ``BT_LDG`` has a column), never past the table's end."""
    if PAGE > 0 and PAGE % BLOCK_N == 0:  # one entry for the tile
        idx = start // PAGE
        ok = start < k_end
    elif PAGE > 0:
        idx = offs_n // PAGE
        ok = n_ok
    else:
        idx = offs_n // block_size
        ok = n_ok
    if BT_LDG and not MASK and not INTERPRET:
        page = _ld_nc_b32(bt_row + tl.where(ok, idx, 0)).to(tl.int64)
    elif PAGE > 0 and (PAGE % BLOCK_N == 0 or not MASK):
        page = tl.load(bt_row + idx).to(tl.int64)
    else:
        page = tl.load(bt_row + idx, mask=n_ok, other=0).to(tl.int64)
    if PAGE > 0:
        in_blk = (offs_n % PAGE).to(tl.int64)
    else:
        in_blk = (offs_n % block_size).to(tl.int64)
    return page, in_blk


@triton.jit
def qk_scores(q, kc_ptr, k_rows, n_ok, offs_d, MASK: tl.constexpr, CVT: tl.constexpr, INTERPRET: tl.constexpr):
    """Unscaled scores ``q @ K^T`` of the K rows at element offsets ``k_rows`` (keys outside
    ``n_ok`` read as 0 with ``MASK``), K dequantized as ``CVT`` says."""
    if MASK:
        k = tl.load(kc_ptr + k_rows[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(kc_ptr + k_rows[:, None] + offs_d[None, :])
    return qk_dot(q, k, CVT, INTERPRET)


@triton.jit
def qk_dot(q, k, CVT: tl.constexpr, INTERPRET: tl.constexpr):
    """Unscaled scores ``q @ k^T`` of a loaded cache tile ``k [N, D]``, dequantized as ``CVT`` says."""
    return _dot(q, tl.trans(_kv_operand(k, CVT, False, INTERPRET)), tl.zeros([q.shape[0], k.shape[0]], tl.float32),
                INTERPRET)


@triton.jit
def visible(offs_n, n_ok, pos, window, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr):
    """``[rows, keys]`` mask: key in range, not after the row's position (causal), within its
    sliding window."""
    ok = n_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= pos[:, None])
    if USE_WINDOW:
        ok = ok & (offs_n[None, :] > pos[:, None] - window)
    return ok


@triton.jit
def _attend_tile(
    start, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
    kc_ptr, vc_ptr, ksc_ptr, vsc_ptr,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
    MASK: tl.constexpr, PAGE: tl.constexpr, CVT: tl.constexpr, INTERPRET: tl.constexpr, BT_LDG: tl.constexpr,
):
    """Keys ``[start, start + BLOCK_N)``: gather, dequantize, score, mask, online-softmax
    update. Returns ``(m_i, l_i, acc)``.

    ``MASK`` False: the caller guarantees the tile is whole (``start + BLOCK_N <= k_end``)
    and visible to every row (below the causal diagonal, no window): no bounds, causal or
    window mask at all. ``MASK`` True: keys are clipped to ``k_end`` and masked per row."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < k_end
    page, in_blk = _page_rows(bt_row, start, offs_n, n_ok, k_end, block_size, PAGE, BLOCK_N, MASK, BT_LDG, INTERPRET)
    k_rows = page * stride_kcb + in_blk * stride_kcs + kvh * stride_kch
    s = qk_scores(q, kc_ptr, k_rows, n_ok, offs_d, MASK, CVT, INTERPRET)
    # qk_scale: [M], per row (softmax scale * q/k descales, and mode 3's power-of-two q rescale)
    if DYNAMIC:
        ks = tl.load(ksc_ptr + page * stride_ksb + in_blk * stride_kss + kvh * stride_ksh, mask=n_ok, other=0.0)
        s = s * qk_scale[:, None] * ks[None, :]
    else:
        s = s * qk_scale[:, None]
    if MASK:
        s = tl.where(visible(offs_n, n_ok, pos, window, CAUSAL, USE_WINDOW), s, float("-inf"))
    p, alpha, m_i, l_i = _online_softmax_step(s, m_i, l_i)
    v_rows = page * stride_vcb + in_blk * stride_vcs + kvh * stride_vch
    acc = pv_update(p, alpha, acc, v_rows, n_ok, offs_d, vc_ptr, vsc_ptr + page * stride_vsb + in_blk * stride_vss
                    + kvh * stride_vsh, DYNAMIC, MASK, CVT, INTERPRET)
    return m_i, l_i, acc


@triton.jit
def pv_update(p, alpha, acc, v_rows, n_ok, offs_d, vc_ptr, vs_ptrs, DYNAMIC: tl.constexpr, MASK: tl.constexpr,
              CVT: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc * alpha + p @ V`` for the V rows at element offsets ``v_rows`` (keys outside
    ``n_ok`` read as 0 with ``MASK``), dequantized as ``CVT`` says; dynamic formats multiply
    each key's probabilities by its V scale (``vs_ptrs``, one pointer a key) first."""
    if MASK:
        v = tl.load(vc_ptr + v_rows[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    else:
        v = tl.load(vc_ptr + v_rows[:, None] + offs_d[None, :])
    return pv_dot(p, alpha, acc, v, n_ok, vs_ptrs, DYNAMIC, CVT, INTERPRET)


@triton.jit
def pv_dot(p, alpha, acc, v, n_ok, vs_ptrs, DYNAMIC: tl.constexpr, CVT: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc * alpha + p @ v`` for a loaded cache tile ``v [N, D]`` (see :func:`pv_update`)."""
    vf = _kv_operand(v, CVT, True, INTERPRET)
    if DYNAMIC:
        vs = tl.load(vs_ptrs, mask=n_ok, other=0.0)
        if CVT == 3:
            # p * vs in FP16: rescale by a power of two so the tile's largest is in [1, 2)
            f, inv = _pow2_exponent_scale(tl.max(vs, 0), 0)
            pv = _dot(_to_operand(p * (vs * f)[None, :], CVT, INTERPRET), vf,
                      tl.zeros([p.shape[0], vf.shape[1]], tl.float32), INTERPRET)
            acc = acc * alpha[:, None] + pv * inv
        else:
            acc = _dot(_to_operand(p * vs[None, :], CVT, INTERPRET), vf, acc * alpha[:, None], INTERPRET)
    else:
        acc = _dot(_to_operand(p, CVT, INTERPRET), vf, acc * alpha[:, None], INTERPRET)
    return acc


@triton.jit
def _attend_range(
    k_from, k_to, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
    kc_ptr, vc_ptr, ksc_ptr, vsc_ptr,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
    MASK: tl.constexpr, PAGE: tl.constexpr, CVT: tl.constexpr, INTERPRET: tl.constexpr, BT_LDG: tl.constexpr,
):
    """Tiles starting at ``k_from, k_from + BLOCK_N, ... < k_to`` (keys clipped to ``k_end``)."""
    if INTERPRET:
        start = k_from
        while start < k_to:
            m_i, l_i, acc = _attend_tile(
                start, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
                kc_ptr, vc_ptr, ksc_ptr, vsc_ptr,
                stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
                BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, MASK, PAGE, CVT, INTERPRET, BT_LDG)
            start += BLOCK_N
    else:
        for start in range(k_from, k_to, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                start, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
                kc_ptr, vc_ptr, ksc_ptr, vsc_ptr,
                stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
                BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, MASK, PAGE, CVT, INTERPRET, BT_LDG)
    return m_i, l_i, acc


@triton.jit
def q_rows_to_f16(q, qk_scale):
    """FP16 operands (``CVT`` 3): each query row (FP32 values from BF16 / E4M3) times a power of
    two that puts its max ``|q|`` in ``[2^14, 2^15)`` is exact in FP16 (<= 8 significant bits),
    and the power of two comes back out in the per-row score scale -> ``(q16, qk_scale * inv)``."""
    f, inv = _pow2_exponent_scale(tl.max(tl.abs(q), 1), 14)
    return (q * f[:, None]).to(tl.float16), qk_scale * inv


@triton.jit
def q_tile(
    q_ptr, qd_ptr, kd_ptr, vd_ptr, seq, kvh, qt, q_start, q_len, L, group, sm_scale_log2,
    stride_qt, stride_qh, stride_qds, stride_qdh, stride_kds, stride_kdh, stride_vds, stride_vdh,
    BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Query tile ``qt`` of sequence ``seq`` for KV head ``kvh``: ``BLOCK_Q`` tokens x the
    ``GROUP_PAD`` (padded) query heads of the GQA group, token-major -> ``(row_ok, rows_t,
    rows_h, pos`` (each row's absolute position), ``offs_d, q`` (as loaded; padded rows 0),
    the score scale ``sm_scale_log2 * q_descale * k_descale`` and ``v_descale)``."""
    offs_m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = qt * BLOCK_Q + offs_m // GROUP_PAD
    g = offs_m % GROUP_PAD
    row_ok = (tok < q_len) & (g < group)
    rows_h = kvh * group + g
    rows_t = (q_start + tok).to(tl.int64)
    pos = L - q_len + tok
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + rows_t[:, None] * stride_qt + rows_h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    q_descale = tl.load(qd_ptr + seq * stride_qds + kvh * stride_qdh)
    k_descale = tl.load(kd_ptr + seq * stride_kds + kvh * stride_kdh)
    v_descale = tl.load(vd_ptr + seq * stride_vds + kvh * stride_vdh)
    return row_ok, rows_t, rows_h, pos, offs_d, q, sm_scale_log2 * q_descale * k_descale, v_descale


@triton.jit
def paged_attention_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, ws_o_ptr, ws_lse_ptr,
    bt_ptr, seq_lens_ptr, cu_q_ptr,
    qd_ptr, kd_ptr, vd_ptr, ksc_ptr, vsc_ptr,
    sm_scale_log2, group, block_size, window, num_q_tiles,
    stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    stride_bt,
    stride_qds, stride_qdh, stride_kds, stride_kdh, stride_vds, stride_vdh,
    stride_ot, stride_oh,
    stride_wss, stride_wst, stride_wsh,
    stride_lss, stride_lst,
    HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DYNAMIC: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PAGE: tl.constexpr, CVT: tl.constexpr, INTERPRET: tl.constexpr,
    BT_LDG: tl.constexpr = False, FUSE_COMBINE: tl.constexpr = False, counter_ptr=None,
):
    """Grid ``(num_seqs * num_q_tiles, num_kv_heads, NUM_SPLITS)``.

    ``sm_scale_log2 = softmax_scale * log2(e)``; ``window`` is the sliding window in keys
    (used when ``USE_WINDOW``). Descale pointers are read at ``seq * stride_s + kvh * stride_h``
    (strides 0 for per-tensor). Workspace: ``ws_o [NUM_SPLITS, T, Hq, HEAD_DIM]`` FP32 and
    ``ws_lse [NUM_SPLITS, T, Hq]`` FP32, only written when ``NUM_SPLITS > 1``. ``PAGE``: the
    block size if a power of two, else 0; ``CVT``: see :func:`_kv_to_bf16`.

    A program's keys ``[k_begin, k_end)`` run in two loops: whole tiles every row of the
    tile sees (causal: keys ``<=`` the tile's first query position; no window) without any
    mask, then the rest (the diagonal tiles, the ragged last tile) masked.

    ``FUSE_COMBINE`` (``NUM_SPLITS > 1``): no combine pass; the last split program of each
    ``(pid, kvh)`` to arrive on ``counter_ptr[pid * num_kv_heads + kvh]`` (int32, zero
    before the launch, zero again after it) merges the workspace rows of its tile into
    ``out`` (:func:`_merge_split_rows`).
    """
    pid = tl.program_id(0)
    seq = pid // num_q_tiles
    qt = num_q_tiles - 1 - pid % num_q_tiles  # causal: the longest q tiles start first (no long tail)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    L = tl.load(seq_lens_ptr + seq)
    if qt * BLOCK_Q < q_len:
        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
        row_ok, rows_t, rows_h, pos, offs_d, q, qk_scale, v_descale = q_tile(
            q_ptr, qd_ptr, kd_ptr, vd_ptr, seq, kvh, qt, q_start, q_len, L, group, sm_scale_log2,
            stride_qt, stride_qh, stride_qds, stride_qdh, stride_kds, stride_kdh, stride_vds, stride_vdh,
            BLOCK_Q, GROUP_PAD, HEAD_DIM)
        q = q.to(tl.bfloat16)  # bf16 as is; E4M3 -> BF16 is exact
        if CVT == 3:
            q, qk_scale = q_rows_to_f16(q.to(tl.float32), qk_scale)
        else:
            qk_scale = tl.zeros([BLOCK_M], tl.float32) + qk_scale

        # keys this tile may see: [lo, hi)
        first_pos = L - q_len + qt * BLOCK_Q
        last_tok = tl.minimum(q_len, (qt + 1) * BLOCK_Q)
        if CAUSAL:
            hi = L - q_len + last_tok
        else:
            hi = L
        if USE_WINDOW:
            lo = tl.maximum(first_pos - window + 1, 0)
        else:
            lo = 0
        hi = tl.maximum(hi, lo)
        per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
        k_begin = lo + split * per_split
        k_end = tl.minimum(hi, k_begin + per_split)
        # end of the whole tiles every row sees (no mask needed)
        if USE_WINDOW:
            full_end = k_begin
        else:
            if CAUSAL:
                vis = tl.minimum(k_end, first_pos + 1)
            else:
                vis = k_end
            full_end = k_begin + (tl.maximum(vis - k_begin, 0) // BLOCK_N) * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        m_i, l_i, acc = _attend_range(
            k_begin, full_end, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
            kc_ptr, vc_ptr, ksc_ptr, vsc_ptr,
            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
            stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
            BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, False, PAGE, CVT, INTERPRET, BT_LDG)
        m_i, l_i, acc = _attend_range(
            full_end, k_end, k_end, q, pos, m_i, l_i, acc, qk_scale, bt_row, kvh, block_size, window, offs_d,
            kc_ptr, vc_ptr, ksc_ptr, vsc_ptr,
            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
            stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
            BLOCK_N, DYNAMIC, CAUSAL, USE_WINDOW, True, PAGE, CVT, INTERPRET, BT_LDG)

        _finish(acc, m_i, l_i, v_descale, split, rows_t, rows_h, row_ok, offs_d,
                out_ptr, stride_ot, stride_oh, ws_o_ptr, stride_wss, stride_wst, stride_wsh,
                ws_lse_ptr, stride_lss, stride_lst, NUM_SPLITS > 1, INTERPRET)
        if FUSE_COMBINE:
            if arrive_last(counter_ptr + pid * tl.num_programs(1) + kvh, NUM_SPLITS, not INTERPRET, True):
                _merge_split_rows(ws_o_ptr, ws_lse_ptr, rows_t, rows_h, row_ok, out_ptr, stride_ot, stride_oh,
                                  stride_wss, stride_wst, stride_wsh, stride_lss, stride_lst,
                                  NUM_SPLITS, HEAD_DIM, INTERPRET)


@triton.jit
def combine_splits_kernel(
    ws_o_ptr, ws_lse_ptr, out_ptr, num_splits,
    stride_wss, stride_wst, stride_wsh, stride_lss, stride_lst, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Grid ``(T, H)``: merge the split partial outputs of one (token, head) by their
    base-2 log-sum-exp. All splits empty -> zeros."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(ws_lse_ptr + offs_s * stride_lss + t * stride_lst + h, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_use)
    den = tl.sum(w, 0)
    o = tl.load(ws_o_ptr + offs_s[:, None] * stride_wss + t * stride_wst + h * stride_wsh + offs_d[None, :],
                mask=s_ok[:, None], other=0.0)
    res = tl.sum(w[:, None] * o, 0) * tl.where(den > 0.0, 1.0 / tl.maximum(den, 1e-30), 0.0)
    ptrs = out_ptr + t * stride_ot + h * stride_oh + offs_d
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptrs, _to_bf16(res, INTERPRET))
    else:
        tl.store(ptrs, res.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------- MLA
@triton.jit
def _mla_load_chunk(c8_ptr, c16_ptr, c32_ptr, page, in_blk, n_ok, offs_c,
                    stride_c8b, stride_c8s, stride_c16b, stride_c16s, stride_c32b, stride_c32s,
                    CHUNK: tl.constexpr, GROUP: tl.constexpr, SCALE_OFF32: tl.constexpr, IS_FP8: tl.constexpr):
    """Latent chunk ``CHUNK`` (``GROUP`` values) of ``BLOCK_N`` keys: raw codes and the
    per-key FP32 scale (1 for bf16)."""
    if IS_FP8:
        rows = page * stride_c8b + in_blk * stride_c8s + CHUNK * GROUP
        k = tl.load(c8_ptr + rows[:, None] + offs_c[None, :], mask=n_ok[:, None], other=0.0)
        sc = tl.load(c32_ptr + page * stride_c32b + in_blk * stride_c32s + SCALE_OFF32 + CHUNK, mask=n_ok, other=0.0)
    else:
        rows = page * stride_c16b + in_blk * stride_c16s + CHUNK * GROUP
        k = tl.load(c16_ptr + rows[:, None] + offs_c[None, :], mask=n_ok[:, None], other=0.0)
        sc = n_ok.to(tl.float32)  # unused for bf16
    return k.to(tl.bfloat16), sc


@triton.jit
def _mla_pv(acc, p, alpha, k, sc, IS_FP8: tl.constexpr, INTERPRET: tl.constexpr):
    if IS_FP8:
        p = p * sc[None, :]
    return _dot(_to_bf16(p, INTERPRET), k, acc * alpha[:, None], INTERPRET)


@triton.jit
def _mla_store(acc, inv, out_ptr, seq, heads, h_ok, offs_c, stride_os, stride_oh,
               CHUNK: tl.constexpr, GROUP: tl.constexpr, TO_WS: tl.constexpr, INTERPRET: tl.constexpr):
    o = acc * inv[:, None]
    ptrs = out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + CHUNK * GROUP + offs_c[None, :]
    if TO_WS:
        tl.store(ptrs, o, mask=h_ok[:, None])
    else:
        tl.store(ptrs, _to_bf16(o, INTERPRET), mask=h_ok[:, None])


@triton.jit
def _mla_tile(
    start, k_end, q0, q1, q2, q3, qr, m_i, l_i, acc0, acc1, acc2, acc3, sm_scale_log2, bt_row, block_size,
    offs_c, offs_r, c8_ptr, c32_ptr, c16_ptr,
    stride_c8b, stride_c8s, stride_c32b, stride_c32s, stride_c16b, stride_c16s,
    IS_FP8: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, SCALE_OFF32: tl.constexpr,
    ROPE_OFF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Keys ``[start, start + BLOCK_N)`` of one MLA decode program (see :func:`mla_decode_kernel`)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < k_end
    page = tl.load(bt_row + offs_n // block_size, mask=n_ok, other=0).to(tl.int64)
    in_blk = (offs_n % block_size).to(tl.int64)
    k0, s0 = _mla_load_chunk(c8_ptr, c16_ptr, c32_ptr, page, in_blk, n_ok, offs_c, stride_c8b, stride_c8s,
                             stride_c16b, stride_c16s, stride_c32b, stride_c32s, 0, GROUP, SCALE_OFF32, IS_FP8)
    k1, s1 = _mla_load_chunk(c8_ptr, c16_ptr, c32_ptr, page, in_blk, n_ok, offs_c, stride_c8b, stride_c8s,
                             stride_c16b, stride_c16s, stride_c32b, stride_c32s, 1, GROUP, SCALE_OFF32, IS_FP8)
    k2, s2 = _mla_load_chunk(c8_ptr, c16_ptr, c32_ptr, page, in_blk, n_ok, offs_c, stride_c8b, stride_c8s,
                             stride_c16b, stride_c16s, stride_c32b, stride_c32s, 2, GROUP, SCALE_OFF32, IS_FP8)
    k3, s3 = _mla_load_chunk(c8_ptr, c16_ptr, c32_ptr, page, in_blk, n_ok, offs_c, stride_c8b, stride_c8s,
                             stride_c16b, stride_c16s, stride_c32b, stride_c32s, 3, GROUP, SCALE_OFF32, IS_FP8)
    rope = tl.load(c16_ptr + (page * stride_c16b + in_blk * stride_c16s + ROPE_OFF16)[:, None] + offs_r[None, :],
                   mask=n_ok[:, None], other=0.0)
    zero = tl.zeros([qr.shape[0], BLOCK_N], tl.float32)
    s = _dot(qr, tl.trans(rope), zero, INTERPRET)
    if IS_FP8:
        s += _dot(q0, tl.trans(k0), zero, INTERPRET) * s0[None, :]
        s += _dot(q1, tl.trans(k1), zero, INTERPRET) * s1[None, :]
        s += _dot(q2, tl.trans(k2), zero, INTERPRET) * s2[None, :]
        s += _dot(q3, tl.trans(k3), zero, INTERPRET) * s3[None, :]
    else:
        s = _dot(q0, tl.trans(k0), s, INTERPRET)
        s = _dot(q1, tl.trans(k1), s, INTERPRET)
        s = _dot(q2, tl.trans(k2), s, INTERPRET)
        s = _dot(q3, tl.trans(k3), s, INTERPRET)
    s = tl.where(n_ok[None, :], s * sm_scale_log2, float("-inf"))
    p, alpha, m_i, l_i = _online_softmax_step(s, m_i, l_i)
    acc0 = _mla_pv(acc0, p, alpha, k0, s0, IS_FP8, INTERPRET)
    acc1 = _mla_pv(acc1, p, alpha, k1, s1, IS_FP8, INTERPRET)
    acc2 = _mla_pv(acc2, p, alpha, k2, s2, IS_FP8, INTERPRET)
    acc3 = _mla_pv(acc3, p, alpha, k3, s3, IS_FP8, INTERPRET)
    return m_i, l_i, acc0, acc1, acc2, acc3


@triton.jit
def mla_decode_kernel(
    ql_ptr, qr_ptr, c8_ptr, c32_ptr, c16_ptr, out_ptr, ws_o_ptr, ws_lse_ptr,
    bt_ptr, seq_lens_ptr, sm_scale_log2, num_heads, block_size,
    stride_qls, stride_qlh, stride_qrs, stride_qrh,
    stride_c8b, stride_c8s, stride_c32b, stride_c32s, stride_c16b, stride_c16s,
    stride_bt, stride_os, stride_oh,
    stride_wss, stride_wst, stride_wsh, stride_lss, stride_lst,
    IS_FP8: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr, ROPE: tl.constexpr, SCALE_OFF32: tl.constexpr, ROPE_OFF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Grid ``(num_seqs, cdiv(num_heads, BLOCK_H), NUM_SPLITS)``. The latent (512 = 4 chunks
    of ``GROUP``) is both key and value; the score is ``q_latent . latent + q_rope . rope``.
    With fp8, each chunk's per-key scale multiplies its partial score (QK) and the
    probabilities of its PV dot, so the E4M3 codes enter the dots exactly."""
    seq = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    h_ok = heads < num_heads
    L = tl.load(seq_lens_ptr + seq)
    offs_c = tl.arange(0, GROUP)
    offs_r = tl.arange(0, ROPE)
    qb = ql_ptr + seq.to(tl.int64) * stride_qls + heads[:, None] * stride_qlh + offs_c[None, :]
    q0 = tl.load(qb, mask=h_ok[:, None], other=0.0).to(tl.bfloat16)
    q1 = tl.load(qb + GROUP, mask=h_ok[:, None], other=0.0).to(tl.bfloat16)
    q2 = tl.load(qb + 2 * GROUP, mask=h_ok[:, None], other=0.0).to(tl.bfloat16)
    q3 = tl.load(qb + 3 * GROUP, mask=h_ok[:, None], other=0.0).to(tl.bfloat16)
    qr = tl.load(qr_ptr + seq.to(tl.int64) * stride_qrs + heads[:, None] * stride_qrh + offs_r[None, :],
                 mask=h_ok[:, None], other=0.0).to(tl.bfloat16)

    per_split = tl.cdiv(tl.cdiv(L, BLOCK_N), NUM_SPLITS) * BLOCK_N
    k_begin = split * per_split
    k_end = tl.minimum(L, k_begin + per_split)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    acc1 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    acc2 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    acc3 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    if INTERPRET:
        start = k_begin
        while start < k_end:
            m_i, l_i, acc0, acc1, acc2, acc3 = _mla_tile(
                start, k_end, q0, q1, q2, q3, qr, m_i, l_i, acc0, acc1, acc2, acc3, sm_scale_log2, bt_row, block_size,
                offs_c, offs_r, c8_ptr, c32_ptr, c16_ptr,
                stride_c8b, stride_c8s, stride_c32b, stride_c32s, stride_c16b, stride_c16s,
                IS_FP8, BLOCK_N, GROUP, SCALE_OFF32, ROPE_OFF16, INTERPRET)
            start += BLOCK_N
    else:
        for start in range(k_begin, k_end, BLOCK_N):
            m_i, l_i, acc0, acc1, acc2, acc3 = _mla_tile(
                start, k_end, q0, q1, q2, q3, qr, m_i, l_i, acc0, acc1, acc2, acc3, sm_scale_log2, bt_row, block_size,
                offs_c, offs_r, c8_ptr, c32_ptr, c16_ptr,
                stride_c8b, stride_c8s, stride_c32b, stride_c32s, stride_c16b, stride_c16s,
                IS_FP8, BLOCK_N, GROUP, SCALE_OFF32, ROPE_OFF16, INTERPRET)

    inv = tl.where(l_i > 0.0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)
    if NUM_SPLITS == 1:
        _mla_store(acc0, inv, out_ptr, seq, heads, h_ok, offs_c, stride_os, stride_oh, 0, GROUP, False, INTERPRET)
        _mla_store(acc1, inv, out_ptr, seq, heads, h_ok, offs_c, stride_os, stride_oh, 1, GROUP, False, INTERPRET)
        _mla_store(acc2, inv, out_ptr, seq, heads, h_ok, offs_c, stride_os, stride_oh, 2, GROUP, False, INTERPRET)
        _mla_store(acc3, inv, out_ptr, seq, heads, h_ok, offs_c, stride_os, stride_oh, 3, GROUP, False, INTERPRET)
    else:
        ws = ws_o_ptr + split * stride_wss
        _mla_store(acc0, inv, ws, seq, heads, h_ok, offs_c, stride_wst, stride_wsh, 0, GROUP, True, INTERPRET)
        _mla_store(acc1, inv, ws, seq, heads, h_ok, offs_c, stride_wst, stride_wsh, 1, GROUP, True, INTERPRET)
        _mla_store(acc2, inv, ws, seq, heads, h_ok, offs_c, stride_wst, stride_wsh, 2, GROUP, True, INTERPRET)
        _mla_store(acc3, inv, ws, seq, heads, h_ok, offs_c, stride_wst, stride_wsh, 3, GROUP, True, INTERPRET)
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(ws_lse_ptr + split * stride_lss + seq * stride_lst + heads, lse, mask=h_ok)
