"""Dispatch layout: who sends what to whom, computed from ``topk_ids`` alone.

A token is sent **once per destination rank** (the ranks owning any of its top-k experts),
never once per expert. Expert ``e`` lives on rank ``e // (E // R)``. ``topk_ids == -1``
means "not routed". Duplicate ids within a token are allowed: each ``(token, k)`` pair
gets its own slot on the receiver.

Everything here is plain torch (cumsums), deterministic, and runs on the tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_tensor


@dataclass
class DispatchLayout:
    """Result of :func:`get_dispatch_layout` for ``T`` tokens, ``R`` ranks, ``E`` experts.

    Attributes:
        num_tokens_per_rank: ``[R]`` int32, tokens this rank sends to each rank (one message
            row per token and destination rank).
        num_tokens_per_expert: ``[E]`` int32, ``(token, k)`` pairs routed to each expert.
        is_token_in_rank: ``[T, R]`` bool, token ``t`` is sent to rank ``r``.
        rank_offset: ``[T, R]`` int32, row index of token ``t`` inside the block of rows sent
            to rank ``r`` (exclusive prefix sum over tokens, so rows keep token order);
            ``-1`` where ``is_token_in_rank`` is False.
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    rank_offset: torch.Tensor

    @property
    def num_ranks(self) -> int:
        return self.num_tokens_per_rank.shape[0]

    @property
    def num_experts(self) -> int:
        return self.num_tokens_per_expert.shape[0]


def get_dispatch_layout(topk_ids: torch.Tensor, num_experts: int, num_ranks: int) -> DispatchLayout:
    """Per-rank / per-expert counts and each token's row within each destination.

    Args:
        topk_ids: ``[T, K]`` int32 or int64, global expert ids in ``[-1, num_experts)``.
        num_experts: ``E``, a multiple of ``num_ranks``.
        num_ranks: ``R``.

    Returns:
        :class:`DispatchLayout` (tensors on ``topk_ids.device``).

    Raises ``ValueError`` naming the argument for ids outside ``[-1, E)`` (this check syncs
    with the host; :class:`~fp4comm.ep.EPBuffer` folds it into its count exchange instead).
    """
    check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64), ndim=2)
    check_positive_int("num_ranks", num_ranks)
    check_positive_int("num_experts", num_experts)
    if num_experts % num_ranks:
        raise ValueError(f"num_experts: must be a multiple of num_ranks={num_ranks}, got {num_experts}")
    if topk_ids.numel() and bool(((topk_ids < -1) | (topk_ids >= num_experts)).any()):
        bad = topk_ids[(topk_ids < -1) | (topk_ids >= num_experts)][0].item()
        raise ValueError(f"topk_ids: values must lie in [-1, {num_experts}), found {bad}")
    return _layout(topk_ids, num_experts, num_ranks)


def _layout(topk_ids: torch.Tensor, num_experts: int, num_ranks: int) -> DispatchLayout:
    """:func:`get_dispatch_layout` without validation (ids assumed in range; ids outside
    ``[-1, E)`` are treated as -1 so a bad input never indexes out of bounds)."""
    ids = topk_ids.long()
    T = ids.shape[0]
    dev = ids.device
    valid = (ids >= 0) & (ids < num_experts)
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    per_expert = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    per_expert.scatter_add_(0, safe.flatten(), valid.flatten().long())
    e_local = num_experts // num_ranks
    in_rank = torch.zeros(T, num_ranks, dtype=torch.int64, device=dev)
    if T:
        in_rank.scatter_add_(1, safe // e_local, valid.long())
    is_in = in_rank > 0
    # scan along the contiguous dim of the [R, T] transpose: CUDA's outer-dim scan over a
    # [T, R] tensor with few columns runs ~30x slower (225 us at T=4096, R=2 on an H200)
    incl = torch.cumsum(is_in.t().int(), dim=1, dtype=torch.int32).t()
    rank_offset = torch.where(is_in, incl - 1, torch.full_like(incl, -1)).contiguous()
    return DispatchLayout(
        num_tokens_per_rank=is_in.sum(0, dtype=torch.int32),
        num_tokens_per_expert=per_expert.int(),
        is_token_in_rank=is_in,
        rank_offset=rank_offset.int(),
    )
