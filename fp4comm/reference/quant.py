"""Plain-torch reference of every quantization op: the executable spec of DESIGN.md section 3.

No Triton, no pytest. Every step is FP32 with IEEE round-to-nearest, in the order written:

NVFP4, for each row (token) of ``x [..., H]`` and each 16-element block ``b`` of it:
  1. ``gs``: the given static scalar, the given per-row value, or per token
     ``gs = 2688 / amax`` over the row's *finite* ``|x|`` (Inf when ``amax`` is subnormal,
     so it is clamped to FP32_MAX); a row whose ``amax`` is 0 gets ``gs = 1``.
  2. ``vmax = max |x_b|`` over the block's finite values.
  3. ``sf = e4m3_rne_satfinite(gs * vmax / 6)`` -- the product rounds once, then the
     division rounds once (not ``vmax * (gs / 6)``).
  4. ``inv = gs / float(sf)`` (clamped to FP32_MAX) if ``sf != 0`` else ``0``.
  5. ``q = e2m1_rne_satfinite(x * inv)``; a negative product that rounds to zero keeps
     its sign (code 8).
  6. A block holding NaN/Inf gets scale byte 0x7F (E4M3 NaN) and zero codes.
Dequantize: ``e2m1(q) * float(sf)`` (exact) ``/ gs`` (rounds once), then the output dtype.

FP8 block (DeepEP ``per_token_cast_to_fp8``): per 128 channels ``amax = max|x|`` clamped
below at 1e-4, ``s = amax / 448`` (``ue8m0``: rounded up to a power of two by bit
arithmetic, exact), ``q = e4m3_rne_satfinite(x * (1 / s))``; ``x ~= q * s``. A block holding
NaN/Inf gets NaN codes (0x7F) and a NaN scale.
"""

from __future__ import annotations

import torch

from ..formats import (
    E4M3_NAN_BYTE,
    FP32_MAX,
    GS_NUMERATOR,
    NVFP4_BLOCK,
    FP8BlockTensor,
    NVFP4Tensor,
    e2m1_rne_satfinite,
    e2m1_table,
    e4m3_rne_satfinite,
    ieee_div,
    pack_e2m1,
    swizzle_scales,
    unpack_e2m1,
    unswizzle_scales,
)


def _per_token_global_scale(vmax: torch.Tensor) -> torch.Tensor:
    """``[N, KSF]`` finite block maxima -> ``[N]`` encode scales."""
    amax = vmax.amax(dim=-1) if vmax.shape[-1] else vmax.new_zeros(vmax.shape[0])
    gs = ieee_div(GS_NUMERATOR, amax).clamp(max=FP32_MAX)
    return torch.where(amax > 0, gs, torch.ones_like(gs))


def quantize_nvfp4_ref(
    x: torch.Tensor,
    global_scale: str | float | torch.Tensor = "per_token",
    *,
    scale_layout: str = "linear",
) -> NVFP4Tensor:
    """Reference NVFP4 quantization of ``x [..., H]`` (no validation beyond shapes)."""
    shape = x.shape
    H = shape[-1]
    lead = shape[:-1]
    xf = x.float().reshape(-1, H // NVFP4_BLOCK, NVFP4_BLOCK)
    N, KSF = xf.shape[0], xf.shape[1]
    finite = xf.abs() < float("inf")
    bad = ~finite.all(dim=-1)  # [N, KSF]
    vmax = torch.where(finite, xf.abs(), torch.zeros_like(xf)).amax(dim=-1) if N else xf.new_zeros(0, KSF)

    if isinstance(global_scale, str):
        gs_rows = _per_token_global_scale(vmax)
        gs_out = gs_rows.reshape(lead)
    else:
        # a 0-dim tensor or a float is one static scale; otherwise one scale per row
        g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
        if g.dim() == 0:
            gs_out = g.clone()
            gs_rows = gs_out.expand(N)
        else:
            gs_out = g.reshape(lead).clone()
            gs_rows = gs_out.reshape(N)

    prod = gs_rows[:, None] * vmax
    sf = e4m3_rne_satfinite(ieee_div(prod, 6.0))
    sff = sf.float()
    inv = torch.where(sff != 0, (gs_rows[:, None] / sff).clamp(max=FP32_MAX), torch.zeros_like(sff))
    codes = e2m1_rne_satfinite(xf * inv[..., None])
    codes = torch.where(bad[..., None], torch.zeros_like(codes), codes)
    sf_bytes = torch.where(bad, torch.full_like(sf.view(torch.uint8), E4M3_NAN_BYTE), sf.view(torch.uint8))

    data = pack_e2m1(codes.reshape(N, H)).reshape(*lead, H // 2)
    scales = sf_bytes.view(torch.float8_e4m3fn).reshape(*lead, KSF)
    if scale_layout == "swizzled":
        scales = swizzle_scales(scales if len(lead) >= 1 else scales.reshape(1, KSF))
    return NVFP4Tensor(data=data, scales=scales, global_scale=gs_out, scale_layout=scale_layout, shape=shape)


def linear_scales(t: NVFP4Tensor) -> torch.Tensor:
    """The block scales of ``t`` as ``[*lead, H/16]`` E4M3, whatever its layout."""
    H = t.shape[-1]
    KSF = H // NVFP4_BLOCK
    if t.scale_layout == "linear":
        return t.scales
    lead = tuple(t.shape[:-1]) or (1,)
    return unswizzle_scales(t.scales, lead[-1], KSF).reshape(*t.shape[:-1], KSF)


def dequantize_nvfp4_ref(t: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference NVFP4 dequantization: ``e2m1(q) * float(sf) / gs`` in FP32, then ``dtype``."""
    H = t.shape[-1]
    codes = unpack_e2m1(t.data).reshape(-1, H // NVFP4_BLOCK, NVFP4_BLOCK)
    vals = e2m1_table(t.data.device)[codes.long()]
    sf = linear_scales(t).float().reshape(-1, H // NVFP4_BLOCK, 1)
    gs = t.global_scale.float().reshape(-1, 1, 1) if t.global_scale.dim() else t.global_scale.float()
    return ((vals * sf) / gs).reshape(t.shape).to(dtype)


def ue8m0_round_up(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``s`` for positive normal FP32 ``s`` (exact, by bits)."""
    bits = s.float().contiguous().view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def quantize_fp8_blockwise_ref(x: torch.Tensor, block: int = 128, ue8m0: bool = False) -> FP8BlockTensor:
    """Reference DeepEP-style FP8 quantization of ``x [..., H]`` (H a multiple of ``block``)."""
    shape = x.shape
    H = shape[-1]
    xf = x.float().reshape(-1, H // block, block)
    finite = xf.abs() < float("inf")
    bad = ~finite.all(dim=-1)
    amax = xf.abs().amax(dim=-1).clamp(min=1e-4) if xf.shape[0] else xf.new_zeros(0, H // block)
    s = ieee_div(amax, 448.0)
    if ue8m0:
        s = ue8m0_round_up(s)
    inv = ieee_div(1.0, s)
    q = e4m3_rne_satfinite(xf * inv[..., None]).view(torch.uint8)
    q = torch.where(bad[..., None], torch.full_like(q, E4M3_NAN_BYTE), q)
    s = torch.where(bad, torch.full_like(s, float("nan")), s)
    return FP8BlockTensor(
        data=q.view(torch.float8_e4m3fn).reshape(shape),
        scales=s.reshape(*shape[:-1], H // block),
        block=block,
        ue8m0=ue8m0,
    )


def dequantize_fp8_blockwise_ref(t: FP8BlockTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    H = t.shape[-1]
    q = t.data.float().reshape(-1, H // t.block, t.block)
    return (q * t.scales.float().reshape(-1, H // t.block, 1)).reshape(t.shape).to(dtype)
