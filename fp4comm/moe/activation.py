"""Fused ``silu_and_mul`` between the two expert GEMMs, with optional NVFP4 re-quantization.

Rounding, exactly: ``y = silu(g) * u`` is computed in FP32 and rounded to BF16 once; that
BF16 value is the output (``quantize="none"``) or what NVFP4 quantization sees
(``quantize="nvfp4"``), so the fused result equals ``quantize_nvfp4(silu_and_mul(x))``
byte for byte. (``exp`` differs between a GPU and torch by an FP32 ulp or so, hence the
BF16 output, not the codes, is what tests hold to a tolerance.)
"""

from __future__ import annotations

import torch
import triton

from .._checks import check_choice, check_same_device, check_tensor
from .._runtime import cdiv, triton_interpreting, use_triton
from ..formats import NVFP4_BLOCK, NVFP4Tensor, swizzled_shape
from ..reference import moe as _ref
from ..reference.quant import quantize_nvfp4_ref

__all__ = ["silu_and_mul"]

X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _normalize_gs(global_scale, device):
    if isinstance(global_scale, str):
        check_choice("global_scale", global_scale, ["per_token"])
        return None
    if isinstance(global_scale, bool):
        raise TypeError("global_scale: expected 'per_token', a float or a 0-dim tensor, got bool")
    if isinstance(global_scale, (int, float)):
        g = float(global_scale)
        if not (g > 0 and g < float("inf")):
            raise ValueError(f"global_scale: must be finite and > 0, got {global_scale}")
        return torch.tensor(g, dtype=torch.float32, device=device)
    if isinstance(global_scale, torch.Tensor):
        if global_scale.dim() != 0 or not global_scale.is_floating_point():
            raise ValueError(
                f"global_scale: a tensor must be a 0-dim float (one static scale), got {global_scale.dtype} "
                f"shape {list(global_scale.shape)}"
            )
        check_same_device(x=torch.empty(0, device=device), global_scale=global_scale)
        return global_scale.to(torch.float32)
    raise TypeError(f"global_scale: expected 'per_token', a float or a 0-dim tensor, got {type(global_scale).__name__}")


def silu_and_mul(
    x: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    quantize: str = "none",
    global_scale: str | float | torch.Tensor = "per_token",
    scale_layout: str = "swizzled",
    impl: str = "auto",
) -> torch.Tensor | NVFP4Tensor:
    """``silu(gate) * up`` of each valid row of the GEMM1 output, in one kernel.

    Args:
        x: ``[E, max_m, 2N]`` (``bfloat16``/``float16``/``float32``): ``gate`` in ``[..., :N]``,
            ``up`` in ``[..., N:]`` (the gate_up weight stacks gate rows first).
        masked_m: ``[E]`` ``torch.int32``; rows at or past ``masked_m[e]`` are not read or written.
        quantize: ``"none"`` -> BF16 ``[E, max_m, N]``; ``"nvfp4"`` -> :class:`NVFP4Tensor`
            ``[E, max_m, N]`` for GEMM2 (``N`` a multiple of 16).
        global_scale: NVFP4 encode scale: ``"per_token"`` (``global_scale [E, max_m]``, rows past
            ``masked_m`` hold 1) or one static float / 0-dim tensor.
        scale_layout: ``"swizzled"`` (128x4, padding zero) or ``"linear"``.
        impl: ``"auto"``, ``"triton"`` or ``"reference"``.
    """
    check_tensor("x", x, dtype=X_DTYPES, ndim=3, contiguous=True)
    E, max_m, two_n = x.shape
    if two_n % 2:
        raise ValueError(f"x: last dim must be even (gate | up), got {two_n}")
    N = two_n // 2
    check_tensor("masked_m", masked_m, dtype=torch.int32, shape=[E])
    device = check_same_device(x=x, masked_m=masked_m)
    check_choice("quantize", quantize, ["none", "nvfp4"])
    check_choice("scale_layout", scale_layout, ["linear", "swizzled"])
    if masked_m.device.type == "cpu" and E and (int(masked_m.max()) > max_m or int(masked_m.min()) < 0):
        raise ValueError(f"masked_m: values must lie in [0, max_m={max_m}], got {masked_m.tolist()}")
    quant = quantize == "nvfp4"
    if quant and N % NVFP4_BLOCK:
        raise ValueError(f"x: N = x.shape[-1] / 2 must be a multiple of {NVFP4_BLOCK} for nvfp4, got {N}")
    gs_static = _normalize_gs(global_scale, device) if quant else None

    if not use_triton(device, impl):
        return _silu_and_mul_reference(x, masked_m, quant, gs_static, scale_layout)

    ksf = N // NVFP4_BLOCK
    dummy8 = torch.empty(1, dtype=torch.uint8, device=device)
    if quant:
        q = torch.empty(E, max_m, N // 2, dtype=torch.uint8, device=device)
        if scale_layout == "swizzled":
            sf = torch.zeros(E, *swizzled_shape(max_m, ksf), dtype=torch.uint8, device=device)
        else:
            sf = torch.empty(E, max_m, ksf, dtype=torch.uint8, device=device)
        gs = torch.ones(E, max_m, dtype=torch.float32, device=device) if gs_static is None else gs_static
        out = torch.empty(1, dtype=torch.bfloat16, device=device)
    else:
        q, sf, gs = dummy8, dummy8, torch.empty(1, dtype=torch.float32, device=device)
        out = torch.empty(E, max_m, N, dtype=torch.bfloat16, device=device)
    if E and max_m and N:
        from ..kernels.activation import silu_and_mul_kernel

        nb = triton.next_power_of_2(cdiv(N, 16))
        rows = 1 if _gpu_codegen(device) else 16  # interpreter: fewer, longer programs
        silu_and_mul_kernel[(cdiv(max_m, rows), E)](
            x, out, q, sf, gs.reshape(-1) if gs.dim() else gs.reshape(1), masked_m,
            max_m, N, ksf, cdiv(max_m, 128), cdiv(ksf, 4),
            QUANT=quant, GS_PER_TOKEN=gs_static is None, SWIZZLE=scale_layout == "swizzled", NB=nb, ROWS=rows,
            num_warps=8 if N >= 4096 else 4,
        )  # fmt: skip
    if not quant:
        return out
    return NVFP4Tensor(
        data=q, scales=sf.view(torch.float8_e4m3fn), global_scale=gs, scale_layout=scale_layout,
        shape=torch.Size([E, max_m, N]),
    )  # fmt: skip


def _gpu_codegen(device: torch.device) -> bool:
    """True when the kernel is compiled for a GPU (not run by the interpreter)."""
    return device.type == "cuda" and not triton_interpreting()


def _silu_and_mul_reference(x, masked_m, quant, gs_static, scale_layout):
    E, max_m, two_n = x.shape
    N = two_n // 2
    y = torch.zeros(E, max_m, N, dtype=torch.bfloat16, device=x.device)
    for e in range(E):
        m = int(masked_m[e])
        if m:
            y[e, :m] = _ref.silu_and_mul_ref(x[e, :m]).to(torch.bfloat16)
    if not quant:
        return y
    return quantize_nvfp4_ref(y, "per_token" if gs_static is None else gs_static, scale_layout=scale_layout)
