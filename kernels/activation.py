"""Fused SiLU-and-mul on the GEMM1 output, with optional NVFP4 re-quantization for GEMM2.

``x [E, max_m, 2N]`` holds ``gate | up`` per row; ``y = silu(gate) * up`` in FP32, rounded
to BF16 once (RNE on every backend). Without quantization that BF16 row is stored; with
it, the BF16 value (widened back to FP32, exactly) is quantized to NVFP4 in registers --
the same bytes an unfused ``quantize_nvfp4(silu_and_mul(x))`` produces. One program per
(row block, expert); rows at or past ``masked_m[e]`` do nothing.
"""

import triton
import triton.language as tl

from .common import (
    nvfp4_block_stats,
    nvfp4_global_scale,
    nvfp4_quantize_tile,
    store_rounded,
    swizzled_sf_offset,
    to_bf16_rne,
)


@triton.jit
def silu_and_mul_kernel(
    x_ptr,  # [E, max_m, 2N] bf16/fp16/fp32
    out_ptr,  # QUANT=0: [E, max_m, N] bf16
    q_ptr,  # QUANT=1: [E, max_m, N/2] uint8
    sf_ptr,  # QUANT=1: uint8 linear [E, max_m, N/16] or swizzled [E, Mp, Kp]
    gs_ptr,  # QUANT=1: fp32 [1] static, or [E, max_m] per token (written)
    masked_m_ptr,  # int32 [E]
    MAX_M,
    N,
    KSF,  # N / 16
    MT,  # cdiv(max_m, 128)
    KT,  # cdiv(KSF, 4)
    QUANT: tl.constexpr,
    GS_PER_TOKEN: tl.constexpr,
    SWIZZLE: tl.constexpr,
    NB: tl.constexpr,  # power of two >= cdiv(N, 16)
    ROWS: tl.constexpr,  # rows a program walks (1 on GPU; more under the interpreter, fewer programs)
):
    e = tl.program_id(1).to(tl.int64)
    m = tl.minimum(tl.load(masked_m_ptr + e), MAX_M)
    row0 = tl.program_id(0) * ROWS
    if row0 < m:
        for i in tl.static_range(ROWS):
            if row0 + i < m:
                _row(x_ptr, out_ptr, q_ptr, sf_ptr, gs_ptr, e, row0 + i, MAX_M, N, KSF, MT, KT,
                     QUANT, GS_PER_TOKEN, SWIZZLE, NB)


@triton.jit
def _row(x_ptr, out_ptr, q_ptr, sf_ptr, gs_ptr, e, row, MAX_M, N, KSF, MT, KT,
         QUANT: tl.constexpr, GS_PER_TOKEN: tl.constexpr, SWIZZLE: tl.constexpr, NB: tl.constexpr):
    """Row ``row`` of expert ``e``: silu(gate) * up, stored as BF16 or quantized."""
    r = e * MAX_M + row  # flat row index (int64)
    blk = tl.arange(0, NB)
    offs = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = offs < N
    g = tl.load(x_ptr + r * (2 * N) + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + r * (2 * N) + N + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u
    if QUANT:
        yf = to_bf16_rne(y).to(tl.float32)  # what an unfused BF16 output would hold
        vmax, bad = nvfp4_block_stats(yf)
        if GS_PER_TOKEN:
            gs = nvfp4_global_scale(vmax)
            tl.store(gs_ptr + r, gs)
        else:
            gs = tl.load(gs_ptr)
        packed, sfb = nvfp4_quantize_tile(yf, vmax, bad, gs)
        bmask = blk < KSF
        qoffs = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
        tl.store(q_ptr + r * (N // 2) + qoffs, packed, mask=bmask[:, None])
        if SWIZZLE:
            sf_off = swizzled_sf_offset(e, row, blk.to(tl.int64), MT, KT)
        else:
            sf_off = r * KSF + blk
        tl.store(sf_ptr + sf_off, sfb, mask=bmask)
    else:
        store_rounded(out_ptr + r * N + offs, y, mask)
