"""NVFP4 / FP8-block formats and scale layouts: pure math, plain torch, no Triton.

NVFP4 (DESIGN.md section 3):
  * element: E2M1, code bits ``s e e m``; magnitudes of codes 0..7 are
    ``0, 0.5, 1, 1.5, 2, 3, 4, 6``; two codes a byte, even element in the low nibble;
  * block: 16 consecutive hidden elements share one E4M3 scale ``S_dec_b``;
  * global scale ``gs`` (FP32, *encode* direction, "S_enc"): ``gs = 448 * 6 / amax``;
    dequantize as ``e2m1(q) * float(S_dec_b) / gs``.

The swizzled ("interleaved 128x4") scale layout is the one block-scaled GEMMs
read: for a scale matrix ``[M, Ksf]`` of expert ``e``, rows are padded to 128
and columns to 4 (padding bytes zero) and byte ``(m, k)`` lives at
:func:`sf_offset`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_tensor
from ._runtime import cdiv, round_up

# ----------------------------------------------------------------------------- constants
E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
#: ``gs = GS_NUMERATOR / amax`` (= 448 * 6, exact in FP32).
GS_NUMERATOR = E4M3_MAX * E2M1_MAX
#: Largest finite FP32; per-token ``gs`` and the per-block inverse scale are clamped to it
#: so rows with a (sub)normal ``amax`` below ``2688 / FP32_MAX`` never produce Inf.
FP32_MAX = torch.finfo(torch.float32).max
#: E4M3 byte for NaN (``S.1111.111``), the scale of a block holding NaN/Inf.
E4M3_NAN_BYTE = 0x7F
#: Magnitudes of E2M1 codes 0..7.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SWIZZLE_ROWS = 128
SWIZZLE_COLS = 4
SCALE_LAYOUTS = ("linear", "swizzled")
FP8_BLOCK = 128


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """FP32 values of the 16 E2M1 codes (index = code, sign bit 3)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


# ----------------------------------------------------------------------------- tensors
@dataclass
class NVFP4Tensor:
    """A tensor of shape ``shape = [*lead, H]`` stored as NVFP4.

    Attributes:
        data: ``[*lead, H // 2]`` ``torch.uint8``, two E2M1 codes a byte (even element low nibble).
        scales: E4M3 block scales (``torch.float8_e4m3fn``). ``linear``: ``[*lead, H // 16]``.
            ``swizzled``: ``[*batch, Mp, Kp]`` where the last lead dim ``M`` is the row dim,
            ``Mp = round_up(M, 128)``, ``Kp = round_up(H // 16, 4)``, bytes in 128x4 order
            (see :func:`sf_offset`), padding zero. ``batch`` are the lead dims before ``M``.
        global_scale: FP32 encode scale ``gs``: a 0-dim tensor (one static scale) or
            ``[*lead]`` (one per row).
        scale_layout: ``"linear"`` or ``"swizzled"``.
        shape: logical shape ``[*lead, H]`` of the unquantized tensor.
    """

    data: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    scale_layout: str
    shape: torch.Size

    @property
    def hidden(self) -> int:
        return self.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def per_row_global_scale(self) -> bool:
        return self.global_scale.dim() > 0

    def nbytes(self) -> int:
        """Bytes of payload + scales + global scales."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.global_scale))


@dataclass
class FP8BlockTensor:
    """DeepEP-compatible FP8 tensor: E4M3 values with one FP32 scale per ``block`` channels.

    Attributes:
        data: ``[*lead, H]`` ``torch.float8_e4m3fn``.
        scales: ``[*lead, H // block]`` ``torch.float32``, decode direction (``x ~= data * scale``,
            ``scale = amax / 448``, rounded up to a power of two when ``ue8m0``).
        block: channels per scale (128 in DeepEP).
        ue8m0: scales are powers of two.
    """

    data: torch.Tensor
    scales: torch.Tensor
    block: int = FP8_BLOCK
    ue8m0: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        return self.data.numel() + self.scales.numel() * 4


# ----------------------------------------------------------------------------- scalar math
def ieee_div(num: torch.Tensor | float, den: torch.Tensor | float) -> torch.Tensor:
    """``num / den`` rounded once (IEEE), as the kernels' ``tl.math.div_rn`` does.

    Plain ``/`` with a Python scalar is not that: torch evaluates ``scalar / tensor`` as
    reciprocal-then-multiply on CPU, and ``tensor / scalar`` as multiply-by-reciprocal on
    CUDA; both round twice. References divide through this function so they match the
    kernels bit for bit on either device.
    """
    like = num if isinstance(num, torch.Tensor) else den
    num = num if isinstance(num, torch.Tensor) else torch.full_like(like, num)
    den = den if isinstance(den, torch.Tensor) else torch.full_like(like, den)
    return num / den


def e4m3_rne_satfinite(x: torch.Tensor) -> torch.Tensor:
    """FP32 -> E4M3 with round-to-nearest-even, saturating finite overflow (and +-Inf) to +-448.

    NaN stays NaN. Returns ``torch.float8_e4m3fn``.
    """
    x = x.float()
    return torch.where(x.isnan(), x, x.clamp(-E4M3_MAX, E4M3_MAX)).to(torch.float8_e4m3fn)


def e2m1_rne_satfinite(v: torch.Tensor) -> torch.Tensor:
    """FP32 -> E2M1 codes (``torch.uint8`` in 0..15), round to nearest, ties to even.

    Ties: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4; |v| > 6 -> 6.  The sign
    bit is kept for negative values that round to zero (code 8), as the hardware conversion
    does. NaN gives code 0 (callers zero non-finite blocks before this).
    """
    a = v.float().abs()
    # Each boundary sits between codes c and c+1; ``>`` sends its tie down (c even),
    # ``>=`` sends it up (c+1 even).
    code = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    )
    sign = torch.signbit(v) & ~v.isnan()
    return code.to(torch.uint8) | (sign.to(torch.uint8) << 3)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """``[..., H]`` codes -> ``[..., H // 2]`` bytes, even element in the low nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """``[..., H // 2]`` bytes -> ``[..., H]`` codes."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


# ----------------------------------------------------------------------------- swizzle
def sf_offset(e: int, m: int, k: int, M: int, Ksf: int) -> int:
    """Byte offset of scale ``(m, k)`` of expert ``e`` in the swizzled 128x4 layout."""
    mt, kt = cdiv(M, SWIZZLE_ROWS), cdiv(Ksf, SWIZZLE_COLS)
    return ((e * mt + m // 128) * kt + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4


def swizzled_shape(M: int, Ksf: int) -> tuple[int, int]:
    """``(Mp, Kp)``: rows padded to 128, scale columns padded to 4."""
    return round_up(max(M, 0), SWIZZLE_ROWS), round_up(Ksf, SWIZZLE_COLS)


def swizzle_scales(s: torch.Tensor) -> torch.Tensor:
    """Linear scales ``[*batch, M, Ksf]`` -> swizzled buffer ``[*batch, Mp, Kp]`` (same dtype).

    Rows are padded to a multiple of 128 and columns to a multiple of 4 with zero bytes;
    the bytes of each ``[Mp, Kp]`` slab are in 128x4 order (:func:`sf_offset`).
    """
    check_tensor("s", s, ndim=(2, 3, 4, 5, 6))
    *batch, M, K = s.shape
    Mp, Kp = swizzled_shape(M, K)
    raw = _as_bytes(s).reshape(-1, M, K)
    E = raw.shape[0]
    padded = raw.new_zeros(E, Mp, Kp)
    padded[:, :M, :K] = raw
    out = padded.view(E, Mp // 128, 4, 32, Kp // 4, 4).permute(0, 1, 4, 3, 2, 5).contiguous()
    return _from_bytes(out.view(*batch, Mp, Kp), s.dtype)


def unswizzle_scales(s: torch.Tensor, M: int, Ksf: int) -> torch.Tensor:
    """Swizzled buffer ``[*batch, Mp, Kp]`` -> linear scales ``[*batch, M, Ksf]`` (inverse of
    :func:`swizzle_scales`, dropping the padding)."""
    check_tensor("s", s, ndim=(2, 3, 4, 5, 6))
    Mp, Kp = swizzled_shape(M, Ksf)
    if tuple(s.shape[-2:]) != (Mp, Kp):
        raise ValueError(f"s: expected trailing dims [{Mp}, {Kp}] for M={M}, Ksf={Ksf}, got {list(s.shape)}")
    batch = s.shape[:-2]
    raw = _as_bytes(s).reshape(-1, Mp // 128, Kp // 4, 32, 4, 4)
    lin = raw.permute(0, 1, 4, 3, 2, 5).reshape(-1, Mp, Kp)[:, :M, :Ksf].contiguous()
    return _from_bytes(lin.view(*batch, M, Ksf), s.dtype)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous()


def _from_bytes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.view(dtype) if t.dtype != dtype else t
