"""Plain-torch reference of the expert compute: the executable spec of ``fp4comm.moe``.

No Triton, no pytest. Everything is FP32 with IEEE round-to-nearest unless written otherwise.

* **Weight formats** (``[E, N, K]``, one matrix per expert, ``y = x @ w.T``):
  ``bf16``; ``fp8`` -- E4M3 with one FP32 decode scale per 128x128 block
  (``s = amax / 448`` over the block, clamped below at 1e-4 like the activations,
  ``q = e4m3_rne_satfinite(w * (1 / s))``, scales ``[E, ceil(N/128), K/128]``, the
  DeepSeek-V3 checkpoint format); ``nvfp4`` -- NVFP4 rows of K with one global scale per
  expert, ``gs[e] = 2688 / amax(w[e])`` (``global_scale [E]``).
* **Masked grouped GEMM**: ``out[e, :m_e] = deq(a[e, :m_e]) @ deq(b[e]).T`` in FP32 then
  ``out_dtype``; rows at or past ``m_e = masked_m[e]`` are not written.
* **silu_and_mul**: ``x [E, max_m, 2N]`` holds ``gate | up``;
  ``y = silu(g) * u = g / (1 + exp(-g)) * u`` in FP32, rounded to BF16 **once**, and
  that BF16 value is what NVFP4 re-quantization sees (the fused kernel quantizes exactly
  what an unfused ``quantize_nvfp4(silu_and_mul(x))`` would).
* **Routing** (DeepSeek-V3 style): ``scores = softmax(logits)`` or ``sigmoid(logits)``;
  for choice add the correction bias; with expert groups keep the ``topk_group`` groups
  whose best-2 (sigmoid) or best-1 (softmax) choice scores sum highest; top-k over the
  rest; weights are the *unbiased* scores of the chosen experts, renormalized to sum 1
  if asked, times ``routed_scaling_factor``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..formats import FP8_BLOCK, GS_NUMERATOR, FP8BlockTensor, NVFP4Tensor, e4m3_rne_satfinite, ieee_div
from .quant import dequantize_fp8_blockwise_ref, dequantize_nvfp4_ref, quantize_nvfp4_ref

WEIGHT_FORMATS = ("bf16", "fp8", "nvfp4")


# ----------------------------------------------------------------------------- weights
def quantize_weight_fp8_ref(w: torch.Tensor, block: int = FP8_BLOCK) -> FP8BlockTensor:
    """``w [E, N, K]`` -> E4M3 data ``[E, N, K]`` + FP32 scales ``[E, ceil(N/block), K/block]``."""
    E, N, K = w.shape
    nb = -(-N // block)
    wp = w.float().new_zeros(E, nb * block, K)
    wp[:, :N] = w.float()
    blocks = wp.view(E, nb, block, K // block, block)
    amax = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-4)  # [E, nb, K/block]
    s = ieee_div(amax, 448.0)
    q = e4m3_rne_satfinite(blocks * (1.0 / s)[:, :, None, :, None])
    return FP8BlockTensor(data=q.reshape(E, nb * block, K)[:, :N].contiguous(), scales=s, block=block)


def dequantize_weight_fp8_ref(t: FP8BlockTensor) -> torch.Tensor:
    """FP32 ``[E, N, K]`` from 128x128-block FP8 weights."""
    E, N, K = t.data.shape
    b = t.block
    s = t.scales.float().repeat_interleave(b, dim=1)[:, :N].repeat_interleave(b, dim=2)
    return t.data.float() * s


def quantize_weight_nvfp4_ref(w: torch.Tensor, scale_layout: str = "linear") -> NVFP4Tensor:
    """``w [E, N, K]`` -> NVFP4 with one encode scale per expert, ``global_scale [E]``."""
    E, N, K = w.shape
    amax = w.float().abs().reshape(E, -1).amax(dim=1)
    gs = torch.where(amax > 0, ieee_div(GS_NUMERATOR, amax), torch.ones_like(amax))
    t = quantize_nvfp4_ref(w, gs[:, None].expand(E, N).contiguous(), scale_layout=scale_layout)
    t.global_scale = gs
    return t


def dequantize_any_ref(t: torch.Tensor | FP8BlockTensor | NVFP4Tensor, *, weight: bool = False) -> torch.Tensor:
    """FP32 values of an operand in any supported format (activations ``[E, M, K]``: FP8 with
    per-row 1x128 scales; weights ``[E, N, K]`` (``weight=True``): FP8 with 128x128 scales,
    NVFP4 with a per-expert global scale)."""
    if isinstance(t, torch.Tensor):
        return t.float()
    if isinstance(t, FP8BlockTensor):
        if weight:
            return dequantize_weight_fp8_ref(t)
        return dequantize_fp8_blockwise_ref(t, torch.float32)
    if isinstance(t, NVFP4Tensor):
        gs = t.global_scale
        if gs.dim() == 1 and len(t.shape) == 3:  # per expert -> per row
            t = NVFP4Tensor(t.data, t.scales, gs[:, None].expand(*t.shape[:2]).contiguous(), t.scale_layout, t.shape)
        return dequantize_nvfp4_ref(t, torch.float32)
    raise TypeError(f"expected a tensor, FP8BlockTensor or NVFP4Tensor, got {type(t).__name__}")


def dequantize_masked_ref(a: FP8BlockTensor | NVFP4Tensor, masked_m: torch.Tensor) -> torch.Tensor:
    """BF16 ``[E, max_m, K]`` of a masked activation operand, rows ``< masked_m[e]`` (others 0).

    NVFP4: ``bf16((e2m1(q) * sf) * r)`` with ``r = 1 / gs`` rounded once (the product
    ``e2m1 * sf`` is exact); FP8: ``bf16(e4m3(q) * s)``. This is the rounding of the
    two-pass GEMM's dequantization kernel (``fp4comm.moe.dequantize_masked``).
    """
    E, max_m = a.shape[0], a.shape[1]
    if isinstance(a, NVFP4Tensor):
        r = ieee_div(1.0, a.global_scale.float().expand(E, max_m).contiguous())  # [] or [E, max_m]
        unit = NVFP4Tensor(a.data, a.scales, torch.ones(E, max_m, device=r.device), a.scale_layout, a.shape)
        x = dequantize_nvfp4_ref(unit, torch.float32) * r[..., None]  # / 1 is exact: e2m1 * sf
    elif isinstance(a, FP8BlockTensor):
        x = dequantize_fp8_blockwise_ref(a, torch.float32)
    else:
        raise TypeError(f"a: expected an FP8BlockTensor or NVFP4Tensor, got {type(a).__name__}")
    rows = torch.arange(max_m, device=x.device)[None, :] < masked_m.to(x.device).long()[:, None]
    return torch.where(rows[..., None], x, torch.zeros_like(x)).to(torch.bfloat16)


# ----------------------------------------------------------------------------- GEMM
def grouped_gemm_masked_ref(
    a, b, masked_m: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[e, :m_e] = deq(a)[e, :m_e] @ deq(b)[e].T`` in FP32; other rows untouched."""
    A = dequantize_any_ref(a)
    B = dequantize_any_ref(b, weight=True)
    E, max_m, _ = A.shape
    if out is None:
        out = torch.zeros(E, max_m, B.shape[1], dtype=out_dtype, device=A.device)
    for e in range(E):
        m = min(int(masked_m[e]), max_m)
        if m > 0:
            out[e, :m] = (A[e, :m] @ B[e].T).to(out.dtype)
    return out


# ----------------------------------------------------------------------------- activation
def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2N]`` (gate | up) -> ``silu(gate) * up`` in FP32 (not rounded)."""
    n = x.shape[-1] // 2
    g = x[..., :n].float()
    u = x[..., n:].float()
    return g / (1.0 + torch.exp(-g)) * u


# ----------------------------------------------------------------------------- routing
def select_experts_ref(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [T, E]`` -> (``topk_weights [T, top_k]`` FP32, ``topk_ids [T, top_k]`` int32)."""
    lf = logits.float()
    scores = torch.softmax(lf, dim=-1) if scoring == "softmax" else torch.sigmoid(lf)
    choice = scores if correction_bias is None else scores + correction_bias.float()[None, :]
    T, E = choice.shape
    if num_expert_group is not None and num_expert_group > 1:
        g = choice.view(T, num_expert_group, E // num_expert_group)
        if scoring == "sigmoid":  # DeepSeek-V3: sum of the best two
            group_score = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(dim=-1)
        else:  # DeepSeek-V2: the best one
            group_score = g.amax(dim=-1)
        keep = group_score.topk(topk_group, dim=-1).indices
        gmask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~gmask[:, :, None].expand_as(g).reshape(T, E), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    return (w * routed_scaling_factor).float(), ids.to(torch.int32)


# ----------------------------------------------------------------------------- dense MoE
def routed_experts_ref(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``sum_k w_k * expert(e_k, x_t)`` ``[T, H]`` FP32 over the routed experts (ids ``-1``
    skipped); ``expert(e, xe)`` maps the FP32 rows ``xe`` routed to expert ``e`` to its output."""
    xf = x.float()
    out = torch.zeros_like(xf)
    for e in torch.unique(topk_ids[topk_ids >= 0]).tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        out.index_add_(0, tok, expert(e, xf[tok]) * topk_weights[tok, slot].float()[:, None])
    return out


def moe_forward_ref(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Dense FP32 MoE: ``x [T, H]``, ``gate_up [E, 2I, H]`` (gate rows first), ``down [E, H, I]``
    -> ``sum_k w_k * down_e(silu(gate_e x) * up_e x)`` ``[T, H]`` FP32. ids ``-1`` skipped."""
    n = gate_up.shape[1] // 2
    return routed_experts_ref(
        x, topk_weights, topk_ids, lambda e, xe: mlp_ref(xe, gate_up[e, :n], gate_up[e, n:], down[e])
    )


def mlp_ref(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Dense SwiGLU MLP in FP32 (the shared expert): ``down(silu(gate x) * up x)``."""
    xf = x.float()
    return (F.silu(xf @ gate.float().T) * (xf @ up.float().T)) @ down.float().T
