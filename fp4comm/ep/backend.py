"""The transport interface :class:`~fp4comm.ep.EPBuffer` calls: one small ABC.

A backend moves bytes; the buffer owns every kernel (pack, permute, reduce) and hands the
backend *callbacks* that fill destination tensors. So the same pack kernel can write into
a local send buffer (``torch`` backend: then ``all_to_all_single``) or straight into
peers' symmetric memory (``nvlink`` backend: the destination tensors are peer views), and
the receiver-side permute is one kernel for every backend.

Row orders every backend must keep (the permute and both reduces rely on them):

* dispatch: on the receiver, rows are grouped by **source rank** (ascending), and within
  one source keep the order the sender's ``pack`` wrote them (token order);
* combine: the partial row for ``(token t, rank r)`` returns to the same position the
  token's dispatch row had in the block sent to ``r``.

Adding a backend: subclass :class:`EPBackend`, then add one line to
``fp4comm.ep.buffer.BACKENDS`` (``"name": "module.path:ClassName"``, imported lazily).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass(frozen=True)
class TransferPlan:
    """Row counts of one dispatch (and of the combine that undoes it), known on every rank.

    Attributes:
        rank: this rank.
        counts: ``counts[s][r]`` = message rows rank ``s`` sends to rank ``r`` (``R x R``,
            identical on every rank: it comes from :meth:`EPBackend.exchange_meta`).
        row_bytes: bytes of one dispatch message row (:class:`~fp4comm.ep.message.MessageLayout`).
        hidden: ``H``; a combine row is ``H`` BF16 values.
    """

    rank: int
    counts: tuple[tuple[int, ...], ...]
    row_bytes: int
    hidden: int

    @property
    def num_ranks(self) -> int:
        return len(self.counts)

    @property
    def send_counts(self) -> list[int]:
        """Rows this rank sends to each rank (dispatch direction)."""
        return list(self.counts[self.rank])

    @property
    def recv_counts(self) -> list[int]:
        """Rows this rank receives from each rank (dispatch direction)."""
        return [row[self.rank] for row in self.counts]

    @property
    def send_offsets(self) -> list[int]:
        """Exclusive prefix sum of :attr:`send_counts`."""
        return [0, *accumulate(self.send_counts)][:-1]

    @property
    def recv_offsets(self) -> list[int]:
        """Exclusive prefix sum of :attr:`recv_counts`."""
        return [0, *accumulate(self.recv_counts)][:-1]

    def offset_in_receiver(self, r: int) -> int:
        """Row where this rank's block starts inside rank ``r``'s contiguous receive buffer
        (rows of lower source ranks come first)."""
        return sum(self.counts[s][r] for s in range(self.rank))

    @property
    def num_send(self) -> int:
        return sum(self.send_counts)

    @property
    def num_recv(self) -> int:
        return sum(self.recv_counts)


#: ``pack(dests)``: fill ``dests[r]`` (``[plan.send_counts[r], row_bytes]`` uint8, any memory
#: the kernels can store to) with this rank's message rows for rank ``r``.
PackFn = Callable[[list[torch.Tensor]], None]
#: ``reduce(dests)``: fill ``dests[s]`` (``[plan.recv_counts[s], H]`` bfloat16) with the
#: expert-side partial sums of the rows received from rank ``s``, in receive order.
ReduceFn = Callable[[list[torch.Tensor]], None]


class EPBackend(ABC):
    """Transport behind an :class:`~fp4comm.ep.EPBuffer` (one instance per buffer).

    Args (of ``__init__``, called by the buffer):
        group: the ``torch.distributed`` process group.
        device: the device every tensor lives on (``cuda:<local rank>`` or ``cpu``).
        config: the buffer's :class:`~fp4comm.ep.EPConfig` (capacities for fixed buffers:
            ``max_tokens_per_rank``, ``max_recv_tokens``).
    """

    name: str = "?"

    def __init__(self, group, device: torch.device, config) -> None:
        self.group = group
        self.device = device
        self.config = config

    @abstractmethod
    def exchange_meta(self, meta: torch.Tensor) -> torch.Tensor:
        """All-gather a small vector: ``meta`` ``[W]`` int64 on :attr:`device` ->
        ``[R, W]`` int64 **on the CPU** (row ``s`` from rank ``s``). A host sync; the buffer
        calls it once per dispatch (counts + validation codes) and once per combine
        (validation codes), so every rank sees every rank's errors and counts."""

    @abstractmethod
    def dispatch_rows(self, plan: TransferPlan, pack: PackFn) -> torch.Tensor:
        """Call ``pack`` once with one destination tensor per rank, move the rows, and
        return this rank's received rows: ``[plan.num_recv, row_bytes]`` uint8 on
        :attr:`device`, grouped by source rank (ascending), each group in the sender's order.
        The tensor stays valid until the next ``dispatch_rows`` (for reusable buffers)."""

    @abstractmethod
    def combine_rows(self, plan: TransferPlan, reduce: ReduceFn) -> list[torch.Tensor]:
        """Call ``reduce`` once with one destination tensor per source rank, move the
        partial rows back, and return, for each rank ``r``, this rank's partial rows from
        ``r``: ``[plan.send_counts[r], H]`` bfloat16, in the order the dispatch rows were
        sent to ``r``."""

    def destroy(self) -> None:  # noqa: B027 - optional hook
        """Free backend resources (symmetric memory, streams). Idempotent."""


def pointer_table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[len(tensors)]`` int64 device tensor of base addresses (for kernels that take a
    destination table). Empty tensors get their (possibly 0) address; kernels never touch
    them because no row points into them."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)
