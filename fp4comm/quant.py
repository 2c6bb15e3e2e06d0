"""Public quantization API: NVFP4 and DeepEP-style FP8 block, Triton kernels with a
plain-torch reference twin (``fp4comm.reference.quant``) that they match bit for bit."""

from __future__ import annotations

import math

import torch
import triton

from ._checks import check_choice, check_tensor
from ._runtime import cdiv, use_triton
from .formats import (
    E4M3_NAN_BYTE,
    FP8_BLOCK,
    NVFP4_BLOCK,
    SCALE_LAYOUTS,
    SWIZZLE_COLS,
    FP8BlockTensor,
    NVFP4Tensor,
    swizzled_shape,
)
from .reference import quant as _ref

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

__all__ = [
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "quantize_fp8_blockwise",
    "dequantize_fp8_blockwise",
]


def _launch_config(row_elems: int) -> int:
    """num_warps for the one-tile-per-program kernels (dequantize, FP8 block quantize).

    A program holds ~8K FP32 values (one H = 7168 row, or several short rows) in registers;
    8 warps keep that at <= 32 values a thread; small tiles use 4 warps.
    """
    return 8 if row_elems >= 4096 else 4


#: NVFP4 quantize: blocks of 16 per chunk when a row is streamed (1024 values a chunk).
_QUANT_CHUNK_BLOCKS = 64


def _quant_config(H: int, N: int) -> tuple[int, int, int, int]:
    """(rows per program, blocks per chunk, chunks per row, num_warps) for NVFP4 quantize.

    The kernel gives each thread whole 16-value blocks (two 16-byte loads for 16-bit inputs,
    one 8-byte store of codes), so a tile of ``rows * blocks`` blocks wants ``tile / 32``
    warps. Rows longer than one chunk of 64 blocks are streamed chunk by chunk with 2 warps
    (one block a thread per chunk; a per-token scale costs a second, L2-resident read of
    the row); rows of <= 64 blocks are packed several to a tile of <= 256 blocks, one pass.
    Issue 2 (H200, H = 7168): the kernel is bound by ALU issue, not by memory or occupancy,
    so the layout avoids replicated and cross-thread work.
    """
    ksf = H // 16
    if ksf <= _QUANT_CHUNK_BLOCKS:
        nb = triton.next_power_of_2(ksf)
        rows = min(max(1, 256 // nb), triton.next_power_of_2(max(N, 1)))
        return rows, nb, 1, max(1, min(8, rows * nb // 32))
    return 1, _QUANT_CHUNK_BLOCKS, cdiv(ksf, _QUANT_CHUNK_BLOCKS), _quant_warps()


def _quant_warps() -> int:
    """num_warps of the streamed NVFP4 quantize: 2 = one block (16 values) a thread per
    64-block chunk; 1 = two blocks a thread (more than 2 replicates work)."""
    return 2


# Measured on H200 (H = 7168, bf16, per-token gs, linear scales; kernel time as a CUDA-graph
# replay after an L2 flush, % of a D2D copy of the same bytes at T = 4096 / 16384):
#   portable kernel, second pass read from L2 (session 3 default)        71-72% / 82-83%
#   + block maxima by max.u16x2 on the words, prmt packing               77%    / 86%
#   + 16-bit rows kept in registers between the two passes (default)     85-87% / 94-95%
# Removed, slower: the amax pass by max.u16x2 too (56 registers; the compiler then keeps fewer
# loads in flight) 63-65% / 75-76%; the next chunk's loads issued before the current chunk's
# stores 73% / 84%; a whole row in one tile of 4 / 8 / 16 warps (masked to 512 blocks)
# 67% / 67%, 60% / 57%, 55% / 53%. Earlier (session 3): whole rows held in registers by the
# portable kernel (167 registers) slower; several rows of a 128-row swizzle tile per program
# 65% / 73% (4 rows), 53% / 58% (8 rows) swizzled; a 64-register cap 58% / 73%.


#: NVFP4 quantize of BF16/FP16 rows: block maxima by ``max.u16x2`` on the input words and codes
#: packed by ``prmt`` byte permutes (inline PTX). None: on CUDA tensors (the interpreter cannot
#: run PTX; the portable twins give the same bits); True/False force it (compile tests).
_QUANT_HW: bool | None = None


def _rows_per_program(H: int, N: int) -> int:
    """Rows a dequantize program handles: enough short rows to fill a ~4K-element tile (fewer
    launches, full vectors for H < 4096; also ~20x fewer interpreter steps on CPU), one row
    when the row alone fills the tile. A power of two, never more than N rounded up."""
    want = max(1, 4096 // triton.next_power_of_2(H))
    return min(want, triton.next_power_of_2(max(N, 1)))


def _check_input(x: object, name: str = "x") -> torch.Tensor:
    check_tensor(name, x, dtype=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape [..., H] with H > 0, got {list(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (got strides {x.stride()}); call .contiguous() first")
    return x


def _as_pairs(x: torch.Tensor) -> torch.Tensor:
    """View ``x [..., H]`` as words holding two elements each (int32 for 16-bit inputs, int64
    for FP32), so the kernel loads element pairs with wide accesses. A view whose storage
    offset is not word-aligned is copied first."""
    word = torch.int32 if x.element_size() == 2 else torch.int64
    try:
        return x.view(word)
    except RuntimeError:
        return x.clone().view(word)


def _normalize_global_scale(global_scale, lead: torch.Size, device: torch.device):
    """-> (mode, tensor): mode 'per_token' (tensor None), 'static' (0-dim FP32) or 'per_row' ([*lead] FP32)."""
    if isinstance(global_scale, str):
        check_choice("global_scale", global_scale, ["per_token"])
        return "per_token", None
    if isinstance(global_scale, bool):
        raise TypeError("global_scale: expected 'per_token', a float or a tensor, got bool")
    if isinstance(global_scale, (int, float)):
        g = float(global_scale)
        if not (math.isfinite(g) and g > 0):
            raise ValueError(f"global_scale: must be finite and > 0, got {global_scale}")
        return "static", torch.tensor(g, dtype=torch.float32, device=device)
    if isinstance(global_scale, torch.Tensor):
        if not global_scale.is_floating_point():
            raise TypeError(f"global_scale: must be a floating-point tensor, got {global_scale.dtype}")
        if global_scale.device != device and not (global_scale.device.type == device.type == "cuda"):
            raise ValueError(f"global_scale: is on {global_scale.device} but x is on {device}")
        g = global_scale.to(device=device, dtype=torch.float32)
        if g.dim() == 0 or (g.dim() == 1 and g.numel() == 1 and tuple(lead) != (1,)):
            return "static", g.reshape(())
        if tuple(g.shape) != tuple(lead):
            raise ValueError(
                f"global_scale: expected a scalar or one scale per row with shape {list(lead)}, got {list(g.shape)}"
            )
        return "per_row", g.contiguous()
    raise TypeError(f"global_scale: expected 'per_token', a float or a tensor, got {type(global_scale).__name__}")


def _raise_nonfinite_rows(x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x).all(dim=-1)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        where = tuple(idx) if len(idx) != 1 else idx[0]
        raise ValueError(f"x: row {where} holds NaN or Inf (check_finite=True)")


def quantize_nvfp4(
    x: torch.Tensor,
    global_scale: str | float | torch.Tensor = "per_token",
    *,
    scale_layout: str = "linear",
    check_finite: bool = False,
    pad_scales: bool = False,
    impl: str = "auto",
) -> NVFP4Tensor:
    """Quantize ``x [..., H]`` (BF16/FP16/FP32, contiguous, CPU or CUDA) to NVFP4.

    Args:
        x: ``[*lead, H]``, ``H`` a multiple of 16.
        global_scale: encode-direction FP32 scale ``gs`` (``x ~= e2m1 * sf / gs``):
            ``"per_token"`` (default; ``gs = 2688 / amax`` of each row, computed on device),
            a float (one static, calibrated scale), a 0-dim tensor (static, stays on device,
            no host sync) or a tensor of shape ``[*lead]`` (one given scale per row).
        scale_layout: ``"linear"`` (scales ``[*lead, H/16]``) or ``"swizzled"`` (the 128x4
            layout of block-scaled GEMMs; the last lead dim is the row dim ``M``, earlier
            lead dims are batch/expert dims; scales ``[*batch, Mp, Kp]``).
        check_finite: raise ``ValueError`` naming the first row holding NaN/Inf (one host
            sync). Otherwise such blocks get scale byte 0x7F and dequantize to NaN.
        pad_scales: with ``"swizzled"``, allow ``H`` not a multiple of 64 (scale columns are
            zero-padded to a multiple of 4).
        impl: ``"auto"`` (Triton on CUDA or under TRITON_INTERPRET=1, else the reference),
            ``"triton"`` or ``"reference"``.

    Returns:
        :class:`~fp4comm.formats.NVFP4Tensor`; ``global_scale`` is 0-dim for a static scale,
        ``[*lead]`` otherwise.
    """
    x = _check_input(x)
    check_choice("scale_layout", scale_layout, SCALE_LAYOUTS)
    H = x.shape[-1]
    if H % NVFP4_BLOCK:
        raise ValueError(f"x: hidden size (last dim) must be a multiple of {NVFP4_BLOCK}, got {H}")
    KSF = H // NVFP4_BLOCK
    if scale_layout == "swizzled" and KSF % SWIZZLE_COLS and not pad_scales:
        raise ValueError(
            f"x: hidden size must be a multiple of 64 for scale_layout='swizzled' (got {H}); "
            "pass pad_scales=True to zero-pad the scale columns"
        )
    lead = x.shape[:-1]
    mode, gs = _normalize_global_scale(global_scale, lead, x.device)
    if check_finite:
        _raise_nonfinite_rows(x)

    if not use_triton(x.device, impl):
        return _ref.quantize_nvfp4_ref(x, "per_token" if mode == "per_token" else gs, scale_layout=scale_layout)

    N = x.numel() // H
    M = lead[-1] if len(lead) else 1
    batch = lead[:-1] if len(lead) else ()
    data = torch.empty(*lead, H // 2, dtype=torch.uint8, device=x.device)
    if scale_layout == "swizzled":
        Mp, Kp = swizzled_shape(M, KSF)
        # the kernel writes every scale of the unpadded layout; only padding needs a zero fill
        # (a memset launch costs more than the whole quantize for small N)
        alloc = torch.empty if (Mp, Kp) == (M, KSF) else torch.zeros
        scales = alloc(*batch, Mp, Kp, dtype=torch.uint8, device=x.device)
    else:
        Mp, Kp = M, KSF
        scales = torch.empty(*lead, KSF, dtype=torch.uint8, device=x.device)
    if mode == "per_token":
        gs = torch.empty(lead, dtype=torch.float32, device=x.device)
    gs_mode = {"static": 0, "per_row": 1, "per_token": 2}[mode]  # kernels/quant.py GS_MODE_*
    if N:
        from .kernels import quant as _k

        rows, nb, nchunk, warps = _quant_config(H, N)
        _k.nvfp4_quantize_kernel[(cdiv(N, rows),)](
            _as_pairs(x), data, scales, gs, N, H, KSF, max(M, 1), cdiv(Mp, 128), cdiv(Kp, 4),
            GS_MODE=gs_mode, SWIZZLE=scale_layout == "swizzled", IN_BITS=8 * x.element_size(),
            IS_BF16=x.dtype == torch.bfloat16, NB=nb, NCHUNK=nchunk, ROWS=rows, EVEN_K=nchunk > 1 and nb * nchunk == KSF,
            HW=x.is_cuda if _QUANT_HW is None else _QUANT_HW, num_warps=warps,
        )  # fmt: skip
    return NVFP4Tensor(
        data=data,
        scales=scales.view(torch.float8_e4m3fn),
        global_scale=gs,
        scale_layout=scale_layout,
        shape=x.shape,
    )


def _check_nvfp4(t: object) -> NVFP4Tensor:
    if not isinstance(t, NVFP4Tensor):
        raise TypeError(f"t: expected an NVFP4Tensor, got {type(t).__name__}")
    shape = torch.Size(t.shape)
    H = shape[-1]
    lead = shape[:-1]
    check_tensor("t.data", t.data, dtype=torch.uint8, shape=[*lead, H // 2])
    check_tensor("t.scales", t.scales, dtype=(torch.float8_e4m3fn, torch.uint8))
    if t.scale_layout == "linear":
        check_tensor("t.scales", t.scales, shape=[*lead, H // NVFP4_BLOCK])
    elif t.scale_layout == "swizzled":
        M = lead[-1] if len(lead) else 1
        Mp, Kp = swizzled_shape(M, H // NVFP4_BLOCK)
        check_tensor("t.scales", t.scales, shape=[*lead[:-1], Mp, Kp])
    else:
        check_choice("t.scale_layout", t.scale_layout, SCALE_LAYOUTS)
    check_tensor("t.global_scale", t.global_scale, dtype=torch.float32)
    if t.global_scale.dim() != 0 and tuple(t.global_scale.shape) != tuple(lead):
        raise ValueError(f"t.global_scale: expected shape [] or {list(lead)}, got {list(t.global_scale.shape)}")
    for name in ("scales", "global_scale"):
        if getattr(t, name).device != t.data.device:
            raise ValueError(f"t.{name}: is on {getattr(t, name).device} but t.data is on {t.data.device}")
    return t


def dequantize_nvfp4(t: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16, *, impl: str = "auto") -> torch.Tensor:
    """NVFP4 -> ``[*lead, H]`` in ``dtype``: ``e2m1(q) * float(sf) / gs`` in FP32, rounded once.

    Blocks quantized from NaN/Inf come back as NaN. The E4M3 block scale rounds up by at most
    6.25%, so rows whose amax is within that of the output dtype's maximum (FP32: ~3.2e38,
    FP16: ~61600) can dequantize to Inf.
    """
    t = _check_nvfp4(t)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: must be one of bfloat16, float16, float32, got {dtype}")
    if not use_triton(t.device, impl):
        return _ref.dequantize_nvfp4_ref(t, dtype)
    shape = torch.Size(t.shape)
    H = shape[-1]
    KSF = H // NVFP4_BLOCK
    lead = shape[:-1]
    N = shape.numel() // H
    out = torch.empty(shape, dtype=dtype, device=t.device)
    M = lead[-1] if len(lead) else 1
    Mp, Kp = swizzled_shape(M, KSF) if t.scale_layout == "swizzled" else (M, KSF)
    if N:
        from .kernels import quant as _k

        rows = _rows_per_program(H, N)
        _k.nvfp4_dequantize_kernel[(cdiv(N, rows),)](
            t.data, t.scales.view(torch.uint8), t.global_scale, out, N, H, KSF, max(M, 1),
            cdiv(Mp, 128), cdiv(Kp, 4), GS_PER_ROW=t.global_scale.dim() > 0,
            SWIZZLE=t.scale_layout == "swizzled", NB=triton.next_power_of_2(KSF), ROWS=rows,
            num_warps=_launch_config(H * rows),
        )  # fmt: skip
    return out


def quantize_fp8_blockwise(
    x: torch.Tensor,
    block: int = FP8_BLOCK,
    ue8m0: bool = False,
    *,
    check_finite: bool = False,
    impl: str = "auto",
) -> FP8BlockTensor:
    """DeepEP-compatible FP8: ``x [..., H]`` -> E4M3 ``[..., H]`` + FP32 scales ``[..., H/block]``.

    Per ``block`` channels of a row: ``s = max(amax, 1e-4) / 448`` (decode direction),
    rounded up to a power of two when ``ue8m0``; values ``e4m3(x * (1 / s))``.
    ``block`` must be a power of two >= 16 dividing ``H``.
    """
    x = _check_input(x)
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block: must be a power of two >= 16, got {block!r}")
    H = x.shape[-1]
    if H % block:
        raise ValueError(f"x: hidden size (last dim) must be a multiple of block={block}, got {H}")
    if check_finite:
        _raise_nonfinite_rows(x)
    if not use_triton(x.device, impl):
        return _ref.quantize_fp8_blockwise_ref(x, block, ue8m0)
    N = x.numel() // H
    nblk = H // block
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    s = torch.empty(*x.shape[:-1], nblk, dtype=torch.float32, device=x.device)
    if N:
        from .kernels import quant as _k

        _k.fp8_block_quantize_kernel[(N,)](
            x, q, s, N, H, nblk, BLOCK=block, NB=triton.next_power_of_2(nblk), UE8M0=bool(ue8m0), HW_CVT=x.is_cuda,
            num_warps=_launch_config(H),
        )  # fmt: skip
    return FP8BlockTensor(data=q.view(torch.float8_e4m3fn), scales=s, block=block, ue8m0=bool(ue8m0))


def dequantize_fp8_blockwise(
    t: FP8BlockTensor, dtype: torch.dtype = torch.bfloat16, *, impl: str = "auto"
) -> torch.Tensor:
    """FP8 block -> ``dtype``: ``float(q) * s`` in FP32."""
    if not isinstance(t, FP8BlockTensor):
        raise TypeError(f"t: expected an FP8BlockTensor, got {type(t).__name__}")
    check_tensor("t.data", t.data, dtype=torch.float8_e4m3fn)
    H = t.data.shape[-1]
    if H % t.block:
        raise ValueError(f"t.data: last dim {H} is not a multiple of t.block={t.block}")
    check_tensor("t.scales", t.scales, dtype=torch.float32, shape=[*t.data.shape[:-1], H // t.block])
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: must be one of bfloat16, float16, float32, got {dtype}")
    if not use_triton(t.device, impl):
        return _ref.dequantize_fp8_blockwise_ref(t, dtype)
    N = t.data.numel() // H
    nblk = H // t.block
    out = torch.empty(t.data.shape, dtype=dtype, device=t.device)
    if N:
        from .kernels import quant as _k

        _k.fp8_block_dequantize_kernel[(N,)](
            t.data.view(torch.uint8), t.scales, out, N, H, nblk, BLOCK=t.block, NB=triton.next_power_of_2(nblk),
            num_warps=_launch_config(H),
        )  # fmt: skip
    return out


def nonfinite_blocks(t: NVFP4Tensor) -> torch.Tensor:
    """Bool mask ``[*lead, H/16]`` of blocks that held NaN/Inf (scale byte 0x7F)."""
    return _ref.linear_scales(t).view(torch.uint8) == E4M3_NAN_BYTE
