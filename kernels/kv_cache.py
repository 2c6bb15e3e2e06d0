"""Device code of the KV-cache writes (bf16 / fp8 / int8, static or dynamic scales) and of
the MLA latent cache write. Host side: :mod:`fp4comm.attention`.

Format codes (``FMT`` constexpr): 0 = bf16, 1 = fp8 (E4M3), 2 = int8.
Scales are decode direction (``x ~= q * scale``); quantization divides with ``div_rn``
(IEEE) so results match the plain-torch reference bit for bit on GPUs too.
"""

import triton
import triton.language as tl

FMT_BF16 = tl.constexpr(0)
FMT_FP8 = tl.constexpr(1)
FMT_INT8 = tl.constexpr(2)


@triton.jit
def e4m3_round(v):
    """FP32 ``v`` (finite, ``|v| <= 448``) rounded to the nearest E4M3 value, ties to even,
    returned as FP32 (exactly representable, so the later cast to fp8 does not round).

    Done with bit arithmetic rather than relying on the cast: Triton's interpreter rounds
    subnormal ties differently from the GPU, and this way both match torch.
    """
    bits = v.to(tl.uint32, bitcast=True)
    # normals (|v| >= 2^-6): keep 3 mantissa bits, round to nearest even on bit 20
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & 0xFFF00000).to(tl.float32, bitcast=True)
    # subnormals: multiples of 2^-9; 1.5 * 2^23 forces the FP32 add to round to an integer (RNE)
    sub = ((v * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    sub = (sub.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)  # keep -0
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def bf16_rne(x):
    """FP32 -> BF16, round to nearest even (NaN and Inf kept), by bit arithmetic.

    The GPU cast already rounds to nearest even; Triton's interpreter truncates, so kernels
    whose output must match torch bit for bit round explicitly before casting.
    """
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    r = tl.where(x != x, 0x7FC00000, r)  # canonical quiet NaN, as torch
    return r.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def quantize_tile(x, scale, FMT: tl.constexpr, INTERPRET: tl.constexpr):
    """Quantize an FP32 tile with a decode-direction ``scale`` (broadcastable FP32).

    fp8: ``sat(x / scale)`` to +-448, RNE, NaN -> NaN (byte 0x7F); int8: clamp to +-127 then
    round half to even, NaN -> 0; bf16: RNE cast (``scale`` unused).

    The E4M3 rounding: on the GPU the cast of the clamped value (sm_90 emits
    ``cvt.rn.satfinite.e4m3x2.f32``: RNE, subnormals and the sign of zero kept, 1 F2F per
    pair; bit-exact vs torch on H200); under the interpreter (``INTERPRET``), whose cast
    rounds subnormal ties differently, :func:`e4m3_round` first (about 15 integer ops).
    """
    if FMT == 0:
        return bf16_rne(x)
    elif FMT == 1:
        v = tl.math.div_rn(x, scale)
        c = tl.minimum(tl.maximum(v, -448.0), 448.0)
        c = tl.where(v != v, 0.0, c)
        if INTERPRET:
            c = e4m3_round(c)
        b = c.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        b = tl.where(v != v, 0x7F, b)
        return b.to(tl.float8e4nv, bitcast=True)
    else:
        v = tl.math.div_rn(x, scale)
        c = tl.minimum(tl.maximum(v, -127.0), 127.0)
        c = tl.where(v != v, 0.0, c)
        r = (c + 12582912.0) - 12582912.0  # |c| <= 127: exact round half to even
        return r.to(tl.int8)


@triton.jit
def dynamic_scale_rows(x, QMAX: tl.constexpr):
    """Per-row decode scale of an FP32 tile ``[R, C]``: ``amax(finite |x|) / QMAX``, 0 -> 1."""
    a = tl.abs(x)
    a = tl.where(a < float("inf"), a, 0.0)  # drops Inf and NaN
    s = tl.math.div_rn(tl.max(a, axis=1), QMAX)
    return tl.where(s == 0.0, 1.0, s)


@triton.jit
def _load_x(x_ptr, row, offs_d, mask, EVICT: tl.constexpr):
    """Rows ``row`` (element offsets, ``[R]``) of ``x``, ``BLOCK_D`` wide, in ``x``'s dtype."""
    ptrs = x_ptr + row[:, None] + offs_d[None, :]
    if EVICT:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _quantize_store(
    x, cache_ptr, crow, offs_d, mask, rmask, offs_h,
    scale_ptr, stride_scale, sc_ptr, sc_row,
    FMT: tl.constexpr, DYNAMIC: tl.constexpr, RAW: tl.constexpr, INTERPRET: tl.constexpr, EVICT: tl.constexpr,
):
    """Quantize the loaded tile ``x [R, BLOCK_D]`` and store it at cache rows ``crow``;
    dynamic formats also store each row's scale at ``sc_ptr + sc_row`` (rows in ``rmask``).
    ``RAW``: a BF16 tile into a BF16 cache is stored as loaded (bit for bit what the
    reference's ``x.to(bfloat16)`` returns, NaN payloads included)."""
    if RAW:
        q = x
    else:
        x = x.to(tl.float32)
        if FMT == 0:
            q = quantize_tile(x, 1.0, FMT, INTERPRET)
        elif DYNAMIC:
            if FMT == 1:
                s = dynamic_scale_rows(x, 448.0)
            else:
                s = dynamic_scale_rows(x, 127.0)
            q = quantize_tile(x, s[:, None], FMT, INTERPRET)
            tl.store(sc_ptr + sc_row, s, mask=rmask)
        else:
            s = tl.load(scale_ptr + offs_h * stride_scale, mask=rmask, other=1.0)
            q = quantize_tile(x, s[:, None], FMT, INTERPRET)
    dst = cache_ptr + crow[:, None] + offs_d[None, :]
    if EVICT:
        tl.store(dst, q, mask=mask, cache_modifier=".cs")
    else:
        tl.store(dst, q, mask=mask)


@triton.jit
def _write_one(
    x_ptr, stride_xt, stride_xh, t,
    cache_ptr, stride_cb, stride_cs, stride_ch, blk, off,
    scale_ptr, stride_scale,
    sc_ptr, stride_sb, stride_ss, stride_sh,
    offs_h, offs_d, rmask, mask,
    FMT: tl.constexpr, DYNAMIC: tl.constexpr, RAW: tl.constexpr, INTERPRET: tl.constexpr, EVICT: tl.constexpr,
):
    """Load, quantize and store one tensor's rows: token ``t`` (scalar or ``[R]``) head
    ``offs_h [R]`` -> block ``blk`` row ``off`` (scalars or ``[R]``)."""
    x = _load_x(x_ptr, t * stride_xt + offs_h * stride_xh, offs_d, mask, EVICT)
    _quantize_store(x, cache_ptr, blk * stride_cb + off * stride_cs + offs_h * stride_ch, offs_d, mask, rmask,
                    offs_h, scale_ptr, stride_scale, sc_ptr, blk * stride_sb + off * stride_ss + offs_h * stride_sh,
                    FMT, DYNAMIC, RAW, INTERPRET, EVICT)


@triton.jit
def _load_item(
    item, slot_ptr, T, block_size, offs_r, offs_h, offs_d, hmask, dmask,
    a_ptr, stride_at, stride_ah, b_ptr, stride_bt, stride_bh,
    TOK: tl.constexpr, BLOCK_H: tl.constexpr, TWO: tl.constexpr, EVICT: tl.constexpr,
):
    """Issue every load of work item ``item`` (tokens ``[item * TOK, item * TOK + TOK)``,
    row ``r`` = token ``r // BLOCK_H``, head ``offs_h[r]``) at once: the slots and the ``a``
    (with ``TWO`` also ``b``) tiles, no load waiting for another's result. Returns
    ``(blk, off, rmask, a, b)`` per row (``b`` = 0 without ``TWO``); ``rmask`` is false for
    rows past ``T`` or ``num_heads`` and for negative slots."""
    t = item.to(tl.int64) * TOK + offs_r // BLOCK_H
    tmask = t < T
    slot = tl.load(slot_ptr + t, mask=tmask, other=-1).to(tl.int64)
    lmask = (tmask & hmask)[:, None] & dmask[None, :]
    a = _load_x(a_ptr, t * stride_at + offs_h * stride_ah, offs_d, lmask, EVICT)
    b = 0
    if TWO:
        b = _load_x(b_ptr, t * stride_bt + offs_h * stride_bh, offs_d, lmask, EVICT)
    return slot // block_size, slot % block_size, tmask & hmask & (slot >= 0), a, b


@triton.jit
def _store_item(
    blk, off, rmask, offs_h, offs_d, dmask, a, b,
    ac_ptr, stride_acb, stride_acs, stride_ach, a_scale_ptr, stride_a_scale,
    asc_ptr, stride_asb, stride_ass, stride_ash,
    bc_ptr, stride_bcb, stride_bcs, stride_bch, b_scale_ptr, stride_b_scale,
    bsc_ptr, stride_bsb, stride_bss, stride_bsh,
    FMT: tl.constexpr, DYNAMIC: tl.constexpr, RAW: tl.constexpr, INTERPRET: tl.constexpr, EVICT: tl.constexpr,
    TWO: tl.constexpr,
):
    """Quantize and store the tiles of one :func:`_load_item`."""
    mask = rmask[:, None] & dmask[None, :]
    _quantize_store(a, ac_ptr, blk * stride_acb + off * stride_acs + offs_h * stride_ach, offs_d, mask, rmask,
                    offs_h, a_scale_ptr, stride_a_scale, asc_ptr,
                    blk * stride_asb + off * stride_ass + offs_h * stride_ash, FMT, DYNAMIC, RAW, INTERPRET, EVICT)
    if TWO:
        _quantize_store(b, bc_ptr, blk * stride_bcb + off * stride_bcs + offs_h * stride_bch, offs_d, mask, rmask,
                        offs_h, b_scale_ptr, stride_b_scale, bsc_ptr,
                        blk * stride_bsb + off * stride_bss + offs_h * stride_bsh, FMT, DYNAMIC, RAW, INTERPRET,
                        EVICT)


@triton.jit
def write_kv_cache_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    k_scale_ptr, v_scale_ptr, ksc_ptr, vsc_ptr,
    T, num_heads, head_dim, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_k_scale, stride_v_scale,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    FMT: tl.constexpr, DYNAMIC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr, HOIST: tl.constexpr = False, TOK: tl.constexpr = 1,
    SPLIT_KV: tl.constexpr = False, PERSISTENT: tl.constexpr = False, RAW: tl.constexpr = False,
    EVICT: tl.constexpr = False,
):
    """Grid ``(P, cdiv(num_heads, BLOCK_H), 2 if SPLIT_KV else 1)``; heads ``[h0, h0 + BLOCK_H)``.

    Without ``HOIST`` (the H200-measured default; ``TOK`` = 1, ``P`` = ``T``): program ``t``
    loads slot ``t``, skips a negative one, then loads, quantizes and stores K, then V:
    three dependent memory round trips a program (slot -> K -> V: a K store may alias the V
    load, so V is not loaded earlier).

    With ``HOIST`` a program's work item is ``TOK`` tokens (rows ``[TOK * BLOCK_H,
    BLOCK_D]``); the slot, K and V loads are all issued first (unmasked by the slot, which
    only masks the stores): one round trip. ``SPLIT_KV``: the third grid dim picks K or V, so
    a program moves one tensor (twice the programs, half the registers). ``PERSISTENT``:
    ``P`` programs walk the items grid-stride, the next item's loads issued before the
    current item is stored (a register double buffer), so no program waits for a launch.
    ``RAW``: BF16 K/V into a BF16 cache are copied bit for bit; ``EVICT``: streaming cache
    hints (loads evict-first, stores ``.cs``).
    """
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < head_dim
    if not HOIST:
        t = tl.program_id(0).to(tl.int64)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            blk = slot // block_size
            off = slot % block_size
            hmask = offs_h < num_heads
            mask = hmask[:, None] & dmask[None, :]
            _write_one(k_ptr, stride_kt, stride_kh, t, kc_ptr, stride_kcb, stride_kcs, stride_kch, blk, off,
                       k_scale_ptr, stride_k_scale, ksc_ptr, stride_ksb, stride_kss, stride_ksh,
                       offs_h, offs_d, hmask, mask, FMT, DYNAMIC, RAW, INTERPRET, EVICT)
            _write_one(v_ptr, stride_vt, stride_vh, t, vc_ptr, stride_vcb, stride_vcs, stride_vch, blk, off,
                       v_scale_ptr, stride_v_scale, vsc_ptr, stride_vsb, stride_vss, stride_vsh,
                       offs_h, offs_d, hmask, mask, FMT, DYNAMIC, RAW, INTERPRET, EVICT)
    else:
        offs_r = tl.arange(0, TOK * BLOCK_H)
        offs_h = tl.program_id(1) * BLOCK_H + offs_r % BLOCK_H
        hmask = offs_h < num_heads
        if SPLIT_KV:  # this program's tensor becomes "a" (K and V have the same dtypes)
            is_k = tl.program_id(2) == 0
            k_ptr = tl.where(is_k, k_ptr, v_ptr)
            stride_kt = tl.where(is_k, stride_kt, stride_vt)
            stride_kh = tl.where(is_k, stride_kh, stride_vh)
            kc_ptr = tl.where(is_k, kc_ptr, vc_ptr)
            stride_kcb = tl.where(is_k, stride_kcb, stride_vcb)
            stride_kcs = tl.where(is_k, stride_kcs, stride_vcs)
            stride_kch = tl.where(is_k, stride_kch, stride_vch)
            k_scale_ptr = tl.where(is_k, k_scale_ptr, v_scale_ptr)
            stride_k_scale = tl.where(is_k, stride_k_scale, stride_v_scale)
            ksc_ptr = tl.where(is_k, ksc_ptr, vsc_ptr)
            stride_ksb = tl.where(is_k, stride_ksb, stride_vsb)
            stride_kss = tl.where(is_k, stride_kss, stride_vss)
            stride_ksh = tl.where(is_k, stride_ksh, stride_vsh)
        TWO: tl.constexpr = not SPLIT_KV
        item = tl.program_id(0)
        blk, off, rmask, a, b = _load_item(item, slot_ptr, T, block_size, offs_r, offs_h, offs_d, hmask, dmask,
                                           k_ptr, stride_kt, stride_kh, v_ptr, stride_vt, stride_vh,
                                           TOK, BLOCK_H, TWO, EVICT)
        if PERSISTENT:
            num_items = tl.cdiv(T, TOK)
            while item < num_items:
                nxt = item + tl.num_programs(0)
                blk2, off2, rmask2, a2, b2 = _load_item(
                    nxt, slot_ptr, T, block_size, offs_r, offs_h, offs_d, hmask, dmask,
                    k_ptr, stride_kt, stride_kh, v_ptr, stride_vt, stride_vh, TOK, BLOCK_H, TWO, EVICT)
                _store_item(blk, off, rmask, offs_h, offs_d, dmask, a, b,
                            kc_ptr, stride_kcb, stride_kcs, stride_kch, k_scale_ptr, stride_k_scale,
                            ksc_ptr, stride_ksb, stride_kss, stride_ksh,
                            vc_ptr, stride_vcb, stride_vcs, stride_vch, v_scale_ptr, stride_v_scale,
                            vsc_ptr, stride_vsb, stride_vss, stride_vsh,
                            FMT, DYNAMIC, RAW, INTERPRET, EVICT, TWO)
                item, blk, off, rmask, a, b = nxt, blk2, off2, rmask2, a2, b2
        else:
            _store_item(blk, off, rmask, offs_h, offs_d, dmask, a, b,
                        kc_ptr, stride_kcb, stride_kcs, stride_kch, k_scale_ptr, stride_k_scale,
                        ksc_ptr, stride_ksb, stride_kss, stride_ksh,
                        vc_ptr, stride_vcb, stride_vcs, stride_vch, v_scale_ptr, stride_v_scale,
                        vsc_ptr, stride_vsb, stride_vss, stride_vsh,
                        FMT, DYNAMIC, RAW, INTERPRET, EVICT, TWO)


@triton.jit
def write_mla_cache_kernel(
    lat_ptr, rope_ptr, slot_ptr,
    c8_ptr, c32_ptr, c16_ptr,
    block_size,
    stride_lt, stride_rt,
    stride_c8b, stride_c8s, stride_c32b, stride_c32s, stride_c16b, stride_c16s,
    IS_FP8: tl.constexpr, LATENT: tl.constexpr, ROPE: tl.constexpr, GROUP: tl.constexpr,
    SCALE_OFF32: tl.constexpr, ROPE_OFF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Grid ``(T,)``. The cache storage is passed three times, viewed as fp8 (``c8``),
    FP32 (``c32``) and BF16 (``c16``), each with its own element strides; ``SCALE_OFF32``
    and ``ROPE_OFF16`` are the scale / rope offsets in FP32 / BF16 elements of a slot."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        NG: tl.constexpr = LATENT // GROUP
        offs_g = tl.arange(0, NG)
        offs_c = tl.arange(0, GROUP)
        x = tl.load(lat_ptr + t * stride_lt + offs_g[:, None] * GROUP + offs_c[None, :]).to(tl.float32)
        r = bf16_rne(tl.load(rope_ptr + t * stride_rt + tl.arange(0, ROPE)).to(tl.float32))
        tl.store(c16_ptr + blk * stride_c16b + off * stride_c16s + ROPE_OFF16 + tl.arange(0, ROPE), r)
        if IS_FP8:
            s = dynamic_scale_rows(x, 448.0)
            q = quantize_tile(x, s[:, None], 1, INTERPRET)
            tl.store(c8_ptr + blk * stride_c8b + off * stride_c8s + offs_g[:, None] * GROUP + offs_c[None, :], q)
            tl.store(c32_ptr + blk * stride_c32b + off * stride_c32s + SCALE_OFF32 + offs_g, s)
        else:
            tl.store(c16_ptr + blk * stride_c16b + off * stride_c16s + offs_g[:, None] * GROUP + offs_c[None, :],
                     bf16_rne(x))
