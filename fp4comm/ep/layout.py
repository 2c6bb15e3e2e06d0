"""Dispatch layout: who sends what to whom, computed from ``topk_ids`` alone.

A token is sent **once per destination rank** (the ranks owning any of its top-k experts),
never once per expert. Expert ``e`` lives on rank ``e // (E // R)``. ``topk_ids == -1``
means "not routed". Duplicate ids within a token are allowed: each ``(token, k)`` pair
gets its own slot on the receiver.

Where Triton runs (GPU, or CPU under ``TRITON_INTERPRET=1``) one kernel
(``kernels/dispatch.py:ep_layout_kernel``, :func:`layout_meta`) computes everything; the
plain-torch twin (:func:`_layout`, cumsums) is the reference. Both are deterministic and run
on the tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_tensor
from .._launch import launch
from .._runtime import next_pow2, use_triton


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
    if not use_triton(topk_ids.device):
        _check_range(topk_ids, num_experts, None)
        return _layout(topk_ids, num_experts, num_ranks)
    meta, rank_offset = layout_meta(topk_ids, num_experts, num_ranks)
    R = num_ranks
    _check_range(topk_ids, num_experts, meta[1])
    return DispatchLayout(
        num_tokens_per_rank=meta[2 : 2 + R].int(),
        num_tokens_per_expert=meta[2 + R :].int(),
        is_token_in_rank=rank_offset >= 0,
        rank_offset=rank_offset,
    )


def _check_range(topk_ids: torch.Tensor, num_experts: int, flag: torch.Tensor | None) -> None:
    """``ValueError`` naming the first id outside ``[-1, E)`` (``flag``: the kernel's 0-dim
    range flag, read instead of a scan)."""
    if not topk_ids.numel() or (flag is not None and not int(flag)):
        return
    bad_mask = (topk_ids < -1) | (topk_ids >= num_experts)
    if flag is None and not bool(bad_mask.any()):
        return
    bad = topk_ids[bad_mask][0].item()
    raise ValueError(f"topk_ids: values must lie in [-1, {num_experts}), found {bad}")


#: the layout kernel holds a ``[BLOCK_T, RP]`` int32 tile (tokens x padded ranks)
_LAYOUT_TILE = 4096
#: parallel layout: at most this many programs (chunks of tokens), ~one per SM of an H200
_LAYOUT_PROGRAMS = 128
#: parallel layout: at least this many tokens a program (one warp's worth)
_LAYOUT_MIN_CHUNK = 32


def _parallel_chunk(T: int, R: int) -> int:
    """Tokens a program of the parallel layout: up to :data:`_LAYOUT_PROGRAMS` programs of
    at least :data:`_LAYOUT_MIN_CHUNK` tokens, the ``[BLOCK_T, RP]`` tile within
    :data:`_LAYOUT_TILE` (so very large ``T * R`` gets more programs)."""
    want = max(_LAYOUT_MIN_CHUNK, next_pow2(-(-max(T, 1) // _LAYOUT_PROGRAMS)))
    return max(1, min(want, _LAYOUT_TILE // next_pow2(R)))


def layout_scratch(max_tokens: int, num_experts: int, num_ranks: int, device) -> torch.Tensor:
    """Zeroed int32 scratch for :func:`layout_meta` ``(parallel=True)`` with up to
    ``max_tokens`` tokens: ``[counter, range flag, EP histogram accumulators, NPROG * RP
    chunk totals]``. The kernel leaves the first ``2 + EP`` entries zero again, so one
    scratch serves every call on its stream (not two launches at once)."""
    return torch.zeros(_scratch_entries(max_tokens, num_experts, num_ranks), dtype=torch.int32, device=device)


def _scratch_entries(T: int, E: int, R: int) -> int:
    """int32 entries of the parallel layout's scratch for ``T`` tokens (see :func:`layout_scratch`)."""
    return 2 + next_pow2(E) + -(-max(T, 1) // _parallel_chunk(T, R)) * next_pow2(R)


def layout_meta(
    topk_ids: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    meta: torch.Tensor | None = None,
    *,
    parallel: bool = False,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel launch (no validation, no host sync): ``meta`` ``[2 + R + E]`` int64 =
    ``[0, range_bad, num_tokens_per_rank (R), num_tokens_per_expert (E)]`` (the vector
    :class:`~fp4comm.ep.EPBuffer` all-gathers; ``range_bad`` = 1 if an id lies outside
    ``[-1, E)``, such ids count as -1) and ``rank_offset`` ``[T, R]`` int32 (see
    :class:`DispatchLayout`). ``topk_ids`` must be contiguous; ``meta``: optional output
    (every entry written).

    ``parallel``: the chunked kernel (up to :data:`_LAYOUT_PROGRAMS` programs, the last to
    finish scans; same results) with ``scratch`` from :func:`layout_scratch` (sized for at
    least this ``T``); without one a zeroed scratch is allocated (an extra fill launch)."""
    from ..kernels.dispatch import ep_layout_kernel

    T, K = topk_ids.shape
    R, E = num_ranks, num_experts
    dev = topk_ids.device
    if meta is None:
        meta = torch.empty(2 + R + E, dtype=torch.int64, device=dev)
    rank_offset = torch.empty(T, R, dtype=torch.int32, device=dev)
    RP, EP = next_pow2(R), next_pow2(E)
    if parallel:
        block_t = _parallel_chunk(T, R)
        nprog = -(-max(T, 1) // block_t)
        if scratch is None:
            scratch = layout_scratch(T, E, R, dev)
        elif scratch.numel() < _scratch_entries(T, E, R):
            raise ValueError(f"scratch: {scratch.numel()} entries, T={T} needs {_scratch_entries(T, E, R)}")
        launch(ep_layout_kernel, (nprog,),
            topk_ids, meta, rank_offset, T, R, E, E // R, scratch, nprog, K=K, BLOCK_T=block_t, RP=RP, EP=EP,
            PARALLEL=True, KP=next_pow2(K), FIX_T=max(1, _LAYOUT_TILE // RP),
            CB=max(1, _LAYOUT_TILE // RP), GPU=dev.type == "cuda", num_warps=4,
        )  # fmt: skip
        return meta, rank_offset
    block_t = max(16, min(next_pow2(max(T, 1)), _LAYOUT_TILE // RP))
    launch(ep_layout_kernel, (1,),
        topk_ids, meta, rank_offset, T, R, E, E // R, meta, 1, K=K, BLOCK_T=block_t, RP=RP, EP=EP, num_warps=4
    )  # fmt: skip
    return meta, rank_offset


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
