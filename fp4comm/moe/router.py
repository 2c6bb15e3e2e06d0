"""Top-k routing: softmax or sigmoid scores, optional DeepSeek-style group-limited
selection with a correction bias, renormalization and a routed scaling factor.

The math lives in :func:`fp4comm.reference.moe.select_experts_ref` (plain torch, FP32, the
same on every device); this module validates arguments.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_positive_int, check_tensor
from ..reference.moe import select_experts_ref

__all__ = ["select_experts", "SCORINGS"]

SCORINGS = ("softmax", "sigmoid")


def select_experts(
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
    """Pick ``top_k`` experts per token.

    Args:
        logits: ``[T, E]`` router logits (any float dtype; computed on in FP32).
        top_k: experts per token.
        scoring: ``"softmax"`` (Mixtral, DeepSeek-V2) or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: scale the chosen weights to sum to 1.
        num_expert_group, topk_group: group-limited routing: experts split into
            ``num_expert_group`` equal groups, only the ``topk_group`` best groups are eligible
            (group score: sum of the best two choice scores with sigmoid, the best one with softmax).
        correction_bias: ``[E]`` added to the scores for *choosing* only (DeepSeek-V3
            ``e_score_correction_bias``); weights use the unbiased scores.
        routed_scaling_factor: multiplies the final weights.

    Returns:
        ``topk_weights [T, top_k]`` float32, ``topk_ids [T, top_k]`` int32.
    """
    check_tensor("logits", logits, dtype=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
    T, E = logits.shape
    check_positive_int("top_k", top_k)
    if top_k > E:
        raise ValueError(f"top_k: must be <= num_experts={E}, got {top_k}")
    check_choice("scoring", scoring, SCORINGS)
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError("num_expert_group: give both num_expert_group and topk_group, or neither")
    if num_expert_group is not None:
        check_positive_int("num_expert_group", num_expert_group)
        check_positive_int("topk_group", topk_group)
        if E % num_expert_group:
            raise ValueError(f"num_expert_group: must divide num_experts={E}, got {num_expert_group}")
        if topk_group > num_expert_group:
            raise ValueError(f"topk_group: must be <= num_expert_group={num_expert_group}, got {topk_group}")
        if top_k > topk_group * (E // num_expert_group):
            raise ValueError(f"top_k: {top_k} experts do not fit in topk_group={topk_group} groups of {E // num_expert_group}")
    if correction_bias is not None:
        check_tensor("correction_bias", correction_bias, shape=[E], device=logits.device)
    return select_experts_ref(
        logits, top_k, scoring=scoring, renormalize=renormalize, num_expert_group=num_expert_group,
        topk_group=topk_group, correction_bias=correction_bias, routed_scaling_factor=float(routed_scaling_factor),
    )  # fmt: skip
