"""Masked-layout dequantization: NVFP4 / FP8-block activations ``[E, max_m, K]`` -> BF16,
rows ``< masked_m[e]`` only (the rows a masked grouped GEMM reads).

This is the first half of the two-pass expert GEMM on Hopper (no FP4 tensor cores): one
memory-bound pass lands BF16 operands, then the BF16 grouped GEMM runs at BF16 speed. The
wire and the receive buffer stay 4-bit; only the GEMM input is widened.

Rounding (the reference is ``fp4comm.reference.moe.dequantize_masked_ref``):
NVFP4 ``bf16((e2m1(q) * sf) * r)`` with ``r = 1 / gs`` rounded once per row (``e2m1 * sf``
is exact in FP32); FP8 ``bf16(e4m3(q) * s)``.
"""

import triton
import triton.language as tl

from .common import e2m1_decode, e4m3_decode, reciprocal_rn, store_rounded, swizzled_sf_offset
from .gemm import GS_PER_EXPERT, GS_PER_ROW  # the GEMM operand's global-scale modes


@triton.jit
def _masked_rows(mm_ptr, MAX_M, ROWS: tl.constexpr):
    """Rows ``[m0, m0 + ROWS)`` (grid dim 0) of expert ``e`` (grid dim 2) in the masked layout
    -> ``(e, any row below masked_m[e], rows, rows < masked_m[e], flat rows e * MAX_M + rows)``."""
    e = tl.program_id(2)
    m0 = tl.program_id(0) * ROWS
    mm = tl.minimum(tl.load(mm_ptr + e), MAX_M)
    rows = m0 + tl.arange(0, ROWS)
    return e, m0 < mm, rows, rows < mm, e.to(tl.int64) * MAX_M + rows


@triton.jit
def nvfp4_masked_dequant_kernel(
    q_ptr,  # int32 words [E * MAX_M, KW], 8 codes each (low nibble = even element)
    sf_ptr,  # uint8 scales: linear [E, MAX_M, KSF] or swizzled [E, MT*128, KT*4]
    gs_ptr,  # fp32: [1] static, [E] per expert, [E, MAX_M] per row
    mm_ptr,  # int32 [E]
    out_ptr,  # bf16 [E, MAX_M, KW * 8]
    MAX_M,
    KW,
    KSF,
    MT,
    KT,
    GS_MODE: tl.constexpr,
    SWIZZLE: tl.constexpr,
    ROWS: tl.constexpr,
    BW: tl.constexpr,
):
    e, active, rows, row_ok, grow = _masked_rows(mm_ptr, MAX_M, ROWS)
    if active:
        w = tl.program_id(1) * BW + tl.arange(0, BW)
        mask = row_ok[:, None] & (w < KW)[None, :]
        words = tl.load(q_ptr + grow[:, None] * KW + w[None, :], mask=mask, other=0)
        blk = (w // 2).to(tl.int64)
        if SWIZZLE:
            sf_off = swizzled_sf_offset(e.to(tl.int64), rows[:, None].to(tl.int64), blk[None, :], MT, KT)
        else:
            sf_off = grow[:, None] * KSF + blk[None, :]
        sf = e4m3_decode(tl.load(sf_ptr + sf_off, mask=mask, other=0).to(tl.int32))
        if GS_MODE == GS_PER_ROW:
            gs = tl.load(gs_ptr + grow, mask=row_ok, other=1.0)
        elif GS_MODE == GS_PER_EXPERT:
            gs = tl.zeros((ROWS,), tl.float32) + tl.load(gs_ptr + e)
        else:
            gs = tl.zeros((ROWS,), tl.float32) + tl.load(gs_ptr)
        r = reciprocal_rn(gs)
        shifts = tl.arange(0, 8) * 4
        codes = (words[:, :, None] >> shifts[None, None, :]) & 15
        v = (e2m1_decode(codes) * sf[:, :, None]) * r[:, None, None]
        offs = grow[:, None, None] * (KW * 8) + w[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        store_rounded(out_ptr + offs, v, mask[:, :, None])


@triton.jit
def fp8_masked_dequant_kernel(
    q_ptr,  # uint8 E4M3 [E * MAX_M, K]
    s_ptr,  # fp32 [E * MAX_M, K / 128]
    mm_ptr,
    out_ptr,  # bf16 [E, MAX_M, K]
    MAX_M,
    K,
    HW_CVT: tl.constexpr,  # GPU: hardware E4M3 -> FP32 conversion (same values)
    ROWS: tl.constexpr,
    BK: tl.constexpr,  # multiple of 128
):
    _, active, rows, row_ok, grow = _masked_rows(mm_ptr, MAX_M, ROWS)
    if active:
        k = tl.program_id(1) * BK + tl.arange(0, BK)
        mask = row_ok[:, None] & (k < K)[None, :]
        offs = grow[:, None] * K + k[None, :]
        qb = tl.load(q_ptr + offs, mask=mask, other=0)
        if HW_CVT:
            x = qb.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            x = e4m3_decode(qb.to(tl.int32))
        s = tl.load(s_ptr + grow[:, None] * (K // 128) + (k // 128)[None, :], mask=mask, other=0.0)
        store_rounded(out_ptr + offs, x * s, mask)
