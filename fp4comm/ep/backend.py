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
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import torch


@dataclass(frozen=True)
class TransferPlan:
    """Row counts of one dispatch (and of the combine that undoes it), known on every rank.

    Attributes:
        rank: this rank.
        counts: ``counts[s][r]`` = message rows rank ``s`` sends to rank ``r`` (``R x R``,
            identical on every rank: it comes from :meth:`EPBackend.exchange_meta`).
        row_bytes: bytes of one dispatch message row (:class:`~fp4comm.ep.message.MessageLayout`).
        hidden: ``H``.
        vec: ``[len(PLAN_ROWS), R]`` int64 on the device: the row offsets kernels index
            with (:func:`plan_array`), copied once per dispatch without a host sync
            (:class:`HostStager`).
    """

    rank: int
    counts: tuple[tuple[int, ...], ...]
    row_bytes: int
    hidden: int
    vec: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def row(self, name: str) -> torch.Tensor:
        """``[R]`` int64 device vector ``name`` of :data:`PLAN_ROWS`."""
        return self.vec[PLAN_ROWS.index(name)]

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


#: device vectors of a plan (rows of ``TransferPlan.vec``), for rank ``r`` / source ``s``:
PLAN_ROWS = (
    "send_start",  # first row of the block for r in this rank's send order
    "in_receiver",  # first row of this rank's block inside r's receive buffer
    "recv_start",  # first received row from s
    "recv_end",  # end (exclusive) of the received rows from s
    "at_source_shift",  # (first row of this rank's block in s's send order) - recv_start[s]
    "plus_one",  # s + 1
    "send_status",  # send_start[r] + r
    "recv_status",  # recv_start[s] + s
    "send_data",  # send_start[r] + r + 1
)


def plan_array(counts: np.ndarray, rank: int) -> np.ndarray:
    """Host values of :data:`PLAN_ROWS` for ``counts[s][r]``: ``counts`` ``[R, R]`` int64 ->
    ``[len(PLAN_ROWS), R]``."""
    R = counts.shape[0]
    send, recv = counts[rank], counts[:, rank]
    out = np.empty((len(PLAN_ROWS), R), dtype=np.int64)
    ar = np.arange(R, dtype=np.int64)
    np.cumsum(send, out=out[0])
    out[0] -= send  # send_start
    out[1] = counts[:rank].sum(0)  # in_receiver
    np.cumsum(recv, out=out[2])
    out[2] -= recv  # recv_start
    out[3] = out[2] + recv  # recv_end
    out[4] = counts[:, :rank].sum(1) - out[2]  # at_source_shift
    out[5] = ar + 1
    out[6] = out[0] + ar
    out[7] = out[2] + ar
    out[8] = out[6] + 1
    return out


class HostStager:
    """Small int64 host tables -> the device, without a host sync and without a pinned
    allocation per call: a ring of ``slots`` fixed pinned staging buffers and device
    tables; a staging buffer is rewritten only after the copy that last read it completed
    (its CUDA event), and a device table is overwritten ``slots`` calls later (in stream
    order). On the CPU the array itself (no copy)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, slots: int = 2) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._i = 0
        if self.cuda:
            self._host = [torch.empty(shape, dtype=torch.int64, pin_memory=True) for _ in range(slots)]
            self._np = [h.numpy() for h in self._host]
            self._dev = [torch.empty(shape, dtype=torch.int64, device=device) for _ in range(slots)]
            self._events = [None] * slots

    def put(self, arr: np.ndarray) -> torch.Tensor:
        if not self.cuda:
            return torch.from_numpy(arr)
        i = self._i
        self._i = (i + 1) % len(self._host)
        ev = self._events[i]
        if ev is not None:
            ev.synchronize()  # the copy that last read this staging buffer (long done, in practice)
        else:
            ev = self._events[i] = torch.cuda.Event()
        self._np[i][...] = arr
        self._dev[i].copy_(self._host[i], non_blocking=True)
        ev.record()
        return self._dev[i]


@dataclass(frozen=True)
class DevicePlan:
    """Row bases a sender computes on the device, for a pack launched before the host has
    seen the counts (:meth:`EPBackend.exchange_meta_and_send`).

    Attributes:
        meta: int64 on the device: ``[R, width]`` exchanged vectors (``[code, range_bad,
            rows to each rank (R), ...]`` of every rank), then ``[R]`` timeout words of the
            exchange (non-zero: that rank's vector never came).
        width: ``W``, the length of one vector.
        rank: the sending rank.
        max_recv: rows a receive buffer holds.

    The pack kernel stores nothing if any rank reported an error or never answered, or if
    a receiver would overflow (the host raises after its sync, on every rank alike).
    """

    meta: torch.Tensor
    width: int
    rank: int
    max_recv: int


@dataclass
class RowTargets:
    """Where a kernel stores (or reads) the rows for rank ``r``: row ``row_base[r] + i`` of the
    buffer at address ``table[r]`` (row ``i`` of ``views[r]``).

    Attributes:
        views: ``R`` tensors, the block of each rank (the ``impl="reference"`` path writes them);
            ``None`` with ``device_plan`` (the sizes are not known on the host yet), and from
            the ``nvlink`` combine when the kernels are Triton (they use ``table`` alone).
        table: ``[R]`` int64 device addresses; cached by the backend (fixed buffers).
        row_base: ``[R]`` int64 on the device (a row of ``TransferPlan.vec``); ignored with
            ``device_plan``.
        device_plan: the pack kernel computes the row bases itself (see :class:`DevicePlan`).
    """

    views: list[torch.Tensor] | None
    table: torch.Tensor
    row_base: torch.Tensor
    device_plan: DevicePlan | None = None


#: ``pack(t)``: store this rank's message rows for rank ``r`` (``plan.send_counts[r]`` rows of
#: ``row_bytes``) at ``t`` (any memory the kernels can store to).
PackFn = Callable[[RowTargets], None]
#: ``reduce(t)``: store the expert-side combine rows of the rows received from rank ``s`` at
#: ``t`` (``t.row_base[s]`` here is the shift: received row ``n`` goes to row ``n + shift[s]``).
ReduceFn = Callable[[RowTargets], None]


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

    def exchange_meta(self, meta: torch.Tensor) -> torch.Tensor:
        """All-gather a small vector: ``meta`` ``[W]`` int64 on :attr:`device` ->
        ``[R, W]`` int64 **on the CPU** (row ``s`` from rank ``s``). One collective
        (``all_gather_into_tensor`` into a fixed buffer) and one host sync (a non-blocking
        copy into a fixed pinned buffer, then a stream sync); the buffer calls it once per
        dispatch (counts + validation codes), never in combine. The result is a fixed
        buffer too: valid until the next call."""
        import torch.distributed as dist

        W = meta.shape[0]
        bufs = getattr(self, "_meta_bufs", None)
        if bufs is None or bufs[0].shape[1] != W:
            R = dist.get_world_size(self.group)
            cuda = self.device.type == "cuda"
            flat = torch.empty(R * W, dtype=torch.int64, device=self.device)  # gloo wants it 1-d
            out = flat.view(R, W)
            host = torch.empty(R, W, dtype=torch.int64, pin_memory=True) if cuda else out
            bufs = self._meta_bufs = (out, host, flat)
        out, host, flat = bufs
        if meta.dtype != torch.int64 or meta.device != self.device:
            meta = meta.to(self.device, torch.int64)
        dist.all_gather_into_tensor(flat, meta.contiguous(), group=self.group)
        if host is not out:
            host.copy_(out, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return host

    #: whether :meth:`exchange_meta_and_send` is implemented (same value on every rank)
    sends_with_meta: bool = False

    def exchange_meta_and_send(self, meta: torch.Tensor, pack: PackFn | None) -> torch.Tensor:
        """:meth:`exchange_meta`, with this rank's rows sent before the host sync: right after
        the exchange (stream order) ``pack`` is called with :class:`RowTargets` carrying a
        :class:`DevicePlan` (row bases from the exchanged vectors, on the device), then the
        transfer's completion is signalled; the host waits for the vectors only, so its
        checks overlap the send. ``pack`` is ``None`` on a rank whose input is bad (it only
        signals). The buffer then takes this rank's rows from :meth:`received_rows` instead
        of calling :meth:`dispatch_rows`. The plan's device rows (``TransferPlan.vec``) are
        computed on the device too and left in :attr:`plan_rows` (valid until the next call).
        Only backends with :attr:`sends_with_meta`."""
        raise NotImplementedError(f"backend {self.name!r} does not send with the count exchange")

    def received_rows(self, plan: TransferPlan) -> torch.Tensor:
        """After :meth:`exchange_meta_and_send`: the received rows, as :meth:`dispatch_rows`
        returns them. Only backends with :attr:`sends_with_meta`."""
        raise NotImplementedError(f"backend {self.name!r} does not send with the count exchange")

    @abstractmethod
    def dispatch_rows(self, plan: TransferPlan, pack: PackFn) -> torch.Tensor:
        """Call ``pack`` once with the destination of every rank's rows, move the rows, and
        return this rank's received rows: ``[plan.num_recv, row_bytes]`` uint8 on
        :attr:`device`, grouped by source rank (ascending), each group in the sender's order.
        The tensor stays valid until the next ``dispatch_rows`` (fixed buffers)."""

    @abstractmethod
    def combine_rows(self, plan: TransferPlan, reduce: ReduceFn, crow_bytes: int, code: int) -> RowTargets:
        """Call ``reduce`` once (unless ``code`` != 0: this rank's combine input is bad, it
        sends ``code`` instead of rows), move the combine rows (``crow_bytes`` each) back,
        and return where this rank's rows from each rank ``r`` are (``plan.send_counts[r]``
        rows, in the order the dispatch rows were sent to ``r``). No host sync: the codes
        every rank sent travel with the rows and :meth:`check` reads them."""

    def check(self, what: str) -> list[int]:
        """After the kernels of a ``dispatch`` / ``combine`` were launched: host sync if the
        backend has anything to report; raises ``TimeoutError`` naming a silent peer, and
        returns the code each rank sent with its combine rows (``what == "combine"``)."""
        return [0] * dist_world(self.group)

    def destroy(self) -> None:  # noqa: B027 - optional hook
        """Free backend resources (symmetric memory, streams). Idempotent."""


def dist_world(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def pointer_table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[len(tensors)]`` int64 device tensor of base addresses (for kernels that take a
    destination table). Empty tensors get their (possibly 0) address; kernels never touch
    them because no row points into them."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)
