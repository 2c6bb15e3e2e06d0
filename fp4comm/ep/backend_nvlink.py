"""``backend="nvlink"``: message rows stored straight into peers' symmetric memory.

High-throughput path of :class:`~fp4comm.ep.EPBuffer` inside one NVLink domain:

* dispatch: the buffer's fused pack kernel (quantize once, one row per destination rank)
  gets, as its destination table, **peer views** of every receiver's symmetric receive
  buffer at the offset where this source's block belongs (``TransferPlan.offset_in_receiver``:
  blocks of lower source ranks first). So rows land on the receiver already grouped by
  source rank, no staging copy, no all-to-all. Then one tiny kernel (grid ``R``) writes a
  flag per (source, receiver) with a release store at system scope and waits, acquire with
  a bounded spin, for the flags of every source; the permute kernel reads the received rows.
* combine: the buffer's expert-side reduce kernel stores each partial BF16 row into the
  source rank's symmetric combine buffer (block of this rank at the source's
  ``send_offsets``), same flag exchange, then the source-side reduce runs on local memory.

Flags hold a call counter (epoch) and are never reset: ``flag >= epoch`` means done.
Fixed buffers: ``max_recv_tokens`` rows (default ``R * max_tokens_per_rank``) to receive,
``R * max_tokens_per_rank`` BF16 rows for combine. Reuse is safe because every dispatch
starts with the count exchange, which no rank passes before every rank's previous
permute / reduce ran on its stream.

Symmetric memory: NVSHMEM (``fp4comm.ep.symmem.init_nvshmem``) on GPUs; on CPU (tests) the
``/dev/shm`` mapping of :class:`~fp4comm.ep.symmem.ShmMemory` with interpreter kernels and
a host barrier between signalling and waiting.

Per call: dispatch = the count exchange (:data:`META_EXCHANGE`: the base class's NCCL
all-gather, or a symmetric-memory flag exchange with no NCCL call) + one flag kernel. With
:data:`SEND_WITH_META` (default) the pack and the flag kernel are queued right behind the
exchange, before the host has seen the counts: the pack computes its row bases on the
device from the exchanged vectors and stores nothing if any rank is bad or silent or a
receiver would overflow (:class:`~fp4comm.ep.backend.DevicePlan`), and the flag kernel
writes the plan's device rows; the host then waits for the vectors alone, so its checks
and the permute launches overlap the send (EP4, 4x H200, 4096 tok/rank, profile_ep with
per-phase timers: dispatch host path 1091 -> 1038 us, wall 1126 -> 1070 us);
combine = one flag kernel, no collective: a rank whose combine input is bad sends its error code in the low
bits of its flag (``(epoch << 8) | code``) and stores no rows, so every rank learns about it
from the flag it waits for anyway. Destination pointer tables are the symmetric buffers'
``peer_ptrs`` (fixed, on the device); per-call row offsets come with the plan.

Timeouts: every wait is bounded (``config.timeout_s`` seconds of ``%globaltimer`` on GPUs,
given to ``EPBuffer(timeout_s=...)``; a few reads under the interpreter). When a
``TimeoutError`` (naming the silent peer) is raised:

* count exchange (``"symmem"``): in the same ``dispatch``, right after its host sync;
* dispatch flags: at the end of the same ``dispatch`` (:meth:`NVLinkBackend.check`, after
  the buffer launched every kernel of the call); with :data:`DEFER_DISPATCH_CHECK`, at the
  next host sync of this backend instead: the next ``combine``'s check or the next
  ``dispatch``'s count exchange (whichever comes first), before that call returns anything;
  a timeout status still unread at ``destroy`` is dropped;
* combine flags: at the end of the same ``combine`` (its one host sync).

The flag and count-exchange kernels are compiled when the backend is built, followed by
one barrier, so a rank never spins while a peer compiles them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .._launch import launch
from .._runtime import next_pow2, use_triton
from .backend import PLAN_ROWS, DevicePlan, EPBackend, PackFn, ReduceFn, RowTargets, TransferPlan
from .message import MessageLayout, combine_row_bytes
from .symmem import SymmetricMemory

#: how ``dispatch`` exchanges its count vector (same value on every rank; read per call):
#: ``"nccl"``: the base class's ``all_gather_into_tensor``;
#: ``"symmem"``: :func:`~kernels.nvlink.meta_exchange_kernel` stores the vector into every
#: peer's symmetric slot + a release flag, waits for the peers' flags (bounded), and one
#: D2H copy brings the vectors, the exchange's timeout words and the status words
#: (no NCCL call, no second copy). The default: 4x H200, EP4, 4096 tok/rank, with
#: DEFER_DISPATCH_CHECK (benchmarks/profile_ep.py, per-phase timers on): dispatch wall 831 us
#: vs 1262 us for NCCL and the end-of-call check (128 tok: 922 vs 1175 us).
META_EXCHANGE = "symmem"
#: ``False``: ``dispatch`` reads the flag status at its end (a host sync that waits for the
#: permute). ``True`` (default): that read is deferred to the next host sync of this backend
#: (the next call's count exchange or combine check), which raises the dispatch's
#: ``TimeoutError`` there; ``dispatch`` then returns without waiting for the GPU.
DEFER_DISPATCH_CHECK = True

#: ``True`` (default, needs ``META_EXCHANGE == "symmem"`` and the v2 pack kernel): ``dispatch``
#: launches the pack and the flags right after the count exchange, with row bases computed
#: on the device (:meth:`NVLinkBackend.exchange_meta_and_send`); the host sync waits for the
#: count vectors only. ``False``: the host reads the counts, then launches the pack.
SEND_WITH_META = True

#: named host-path variants, ``(META_EXCHANGE, DEFER_DISPATCH_CHECK, SEND_WITH_META)``
#: (tests, benchmarks); the defaults are ``"send_with_meta"``
HOST_VARIANTS = {
    "baseline": ("nccl", False, False),
    "symmem": ("symmem", False, False),
    "symmem_defer": ("symmem", True, False),
    "send_with_meta": ("symmem", True, True),
}


def set_host_variant(name: str) -> None:
    """Set :data:`META_EXCHANGE`, :data:`DEFER_DISPATCH_CHECK` and :data:`SEND_WITH_META` from
    :data:`HOST_VARIANTS` (every rank must use the same variant for a call)."""
    global META_EXCHANGE, DEFER_DISPATCH_CHECK, SEND_WITH_META
    if name not in HOST_VARIANTS:
        raise ValueError(f"name: must be one of {list(HOST_VARIANTS)}, got {name!r}")
    META_EXCHANGE, DEFER_DISPATCH_CHECK, SEND_WITH_META = HOST_VARIANTS[name]


DEFAULT_TIMEOUT_S = 60.0
CPU_TIMEOUT_SPINS = 2
_INT32_MAX = (1 << 31) - 1

ST_DISPATCH = 0
ST_COMBINE = 1


class NVLinkBackend(EPBackend):
    name = "nvlink"

    def __init__(self, group, device: torch.device, config, mem: SymmetricMemory | None = None) -> None:
        super().__init__(group, device, config)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if mem is None:
            if device.type == "cuda":
                from .symmem import init_nvshmem

                mem = init_nvshmem(group, device)
            else:
                from .._runtime import triton_interpreting
                from .symmem import ShmMemory

                if not triton_interpreting():
                    raise ValueError("backend: 'nvlink' on CPU needs TRITON_INTERPRET=1 (tests only)")
                mem = ShmMemory(group, device)
        self.mem = mem
        # the buffer's kernels are Triton (rows addressed through tables): no per-call views
        self._kernels = use_triton(device, config.impl)
        R, H, TMAX = self.world_size, config.hidden, config.max_tokens_per_rank
        self.row_bytes = MessageLayout(config.payload, H, config.num_topk).row_bytes
        self.max_recv = config.max_recv_tokens or R * TMAX
        self.max_send = R * TMAX
        self.crow_bytes = combine_row_bytes(config)
        self._recv = mem.alloc((self.max_recv * self.row_bytes,), torch.uint8)
        self._comb = mem.alloc((self.max_send * self.crow_bytes,), torch.uint8)
        self._dflags = mem.alloc((R,), torch.int64)
        self._cflags = mem.alloc((R,), torch.int64)
        self._comb_local = torch.full((R,), self._comb.local.data_ptr(), dtype=torch.int64, device=device)
        # count exchange (META_EXCHANGE="symmem"): slots [2, R, W] and flags; one local int64
        # buffer holds what comes back to the host in one copy: [R, W] vectors, [R] timeout
        # words of the exchange, then the int32 status words of the flag kernels
        self._meta_w = 2 + R + config.num_experts
        self._meta_slots = mem.alloc((2 * R * self._meta_w,), torch.int64)
        self._mflags = mem.alloc((R,), torch.int64)
        n_meta = R * self._meta_w + R
        self._meta_out = torch.zeros(n_meta + (4 + R + 1) // 2, dtype=torch.int64, device=device)
        self._status = self._meta_out[n_meta:].view(torch.int32)[: 4 + R]
        cuda = device.type == "cuda"
        self._meta_host = torch.empty_like(self._meta_out, device="cpu", pin_memory=True) if cuda else self._meta_out
        hnp = self._meta_host.numpy()
        self._host_rows = self._meta_host[: n_meta - R].view(R, self._meta_w)
        self._host_late = hnp[n_meta - R : n_meta]
        self._host_status = hnp[n_meta:].view(np.int32)[: 4 + R]
        self._epoch_m = 0
        self._sink = torch.zeros(2, dtype=torch.int64, device=device)
        self._epoch_d = 0
        self._epoch_c = 0
        self._pending: int | None = None  # status slot to read in check()
        self._unwaited: tuple | None = None  # (pending status slot,) of an exchange not waited for
        # the transfer plan's device rows, written by the dispatch flag kernel of the early send
        self._plan_vec = torch.zeros(len(PLAN_ROWS), R, dtype=torch.int64, device=device)
        # what a dispatch that does not wait for the counts permutes (receive_capacity)
        self._capacity = (
            self._recv.local.view(-1, self.row_bytes)[: self.max_recv],
            self._plan_vec[PLAN_ROWS.index("recv_end"), -1:],
        )
        self._meta_ready = torch.cuda.Event() if device.type == "cuda" else None
        self.timeout_spins = CPU_TIMEOUT_SPINS
        self.timeout_s = float(getattr(config, "timeout_s", None) or DEFAULT_TIMEOUT_S)
        self._alive = True
        if device.type == "cuda":
            self._flags(self._dflags, 0, ST_DISPATCH, 0, warmup=True)
            self._meta_kernel(self._meta_out[: self._meta_w], 0, warmup=True)
            self.mem.barrier()
            torch.cuda.current_stream(device).synchronize()

    # ------------------------------------------------------------------ interface
    @property
    def sends_with_meta(self) -> bool:  # same on every rank (module knob, config)
        return SEND_WITH_META and META_EXCHANGE == "symmem"

    def exchange_meta_and_send(self, meta: torch.Tensor, pack: PackFn | None, wait: bool = True) -> torch.Tensor | None:
        """The count exchange, then (stream order, no host sync in between) the pack into
        peers' receive buffers with row bases computed on the device from the exchanged
        vectors (:class:`~fp4comm.ep.backend.DevicePlan`: nothing is stored if any rank is
        bad or silent, or a receiver would overflow) and the dispatch flags; the host waits
        for the vectors alone (an event after their copy), so its checks, the plan and the
        permute launches overlap the send. Every rank launches the flags, also one whose
        input is bad (``pack=None``), so epochs stay equal on every rank.

        ``wait=False``: return ``None`` at once (nothing waited for); :meth:`finish_exchange`
        later waits for the vectors and returns them (before the next exchange)."""
        if meta.shape[0] != self._meta_w:
            raise ValueError(f"meta: {meta.shape[0]} words, the exchange carries {self._meta_w}")
        R, W = self.world_size, self._meta_w

        def send() -> None:
            if pack is not None:
                dp = DevicePlan(self._meta_out[: R * W + R], W, self.rank, self.max_recv)
                pack(RowTargets(None, self._recv.peer_ptrs, self._recv.peer_ptrs, dp))
            self._signal_dispatch(plan=True)

        return self._exchange_symmem(meta, send, wait)

    def finish_exchange(self) -> torch.Tensor:
        """The vectors of the latest ``exchange_meta_and_send(..., wait=False)``: waits for
        their copy, raises a dispatch status left unread before that exchange, then a
        timeout of the exchange (see :meth:`_exchange_symmem`)."""
        if self._unwaited is None:
            raise RuntimeError("finish_exchange: no exchange is waiting")
        pending, self._unwaited = self._unwaited[0], None
        return self._finish_exchange(pending)

    def receive_capacity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole receive buffer ``[max_recv, row_bytes]`` uint8 and a 1-element int64
        device view of the rows received in the latest early send (the plan's ``recv_end``
        of the last source, written by its flag kernel): what a permute that does not wait
        for the counts reads."""
        return self._capacity

    @property
    def plan_rows(self) -> torch.Tensor:
        """``[len(PLAN_ROWS), R]`` int64 device rows of the latest :meth:`exchange_meta_and_send`."""
        return self._plan_vec

    def received_rows(self, plan: TransferPlan) -> torch.Tensor:
        return self._recv.local.view(-1, self.row_bytes)[: plan.num_recv]

    def dispatch_rows(self, plan: TransferPlan, pack: PackFn) -> torch.Tensor:
        R, RB = self.world_size, self.row_bytes
        worst = max(sum(plan.counts[s][r] for s in range(R)) for r in range(R))
        if worst > self.max_recv:
            # identical on every rank (counts are global): nobody stores anything
            raise ValueError(
                f"max_recv_tokens: a rank would receive {worst} rows, more than the nvlink receive buffer's "
                f"{self.max_recv}; raise EPConfig.max_recv_tokens"
            )
        views = []
        for r in range(R):
            off = plan.offset_in_receiver(r)
            views.append(self._recv.peer(r).view(-1, RB)[off : off + plan.send_counts[r]])
        pack(RowTargets(views, self._recv.peer_ptrs, plan.row("in_receiver")))
        self._signal_dispatch()
        return self.received_rows(plan)

    def _signal_dispatch(self, plan: bool = False) -> None:
        """The dispatch flags of a new epoch (see :meth:`_flags`)."""
        self._epoch_d += 1
        self._flags(self._dflags, self._epoch_d, ST_DISPATCH, 0, plan=plan)

    def combine_rows(self, plan: TransferPlan, reduce: ReduceFn, crow_bytes: int, code: int) -> RowTargets:
        R, CRB = self.world_size, self.crow_bytes
        if crow_bytes != CRB:
            raise ValueError(f"crow_bytes: {crow_bytes} != the nvlink combine buffer's row of {CRB} bytes")
        if plan.num_send > self.max_send:
            raise ValueError(f"max_tokens_per_rank: {plan.num_send} combine rows exceed the buffer's {self.max_send}")
        if code == 0:
            views = None  # the Triton kernels address rows through the table alone
            if not self._kernels:
                views = []
                for s in range(R):
                    # on rank s, rows sent to rank r start at s's send offset for r
                    off = sum(plan.counts[s][r] for r in range(self.rank))
                    views.append(self._comb.peer(s).view(-1, CRB)[off : off + plan.recv_counts[s]])
            reduce(RowTargets(views, self._comb.peer_ptrs, plan.row("at_source_shift")))
        self._epoch_c += 1
        self._flags(self._cflags, self._epoch_c, ST_COMBINE, code)
        views = None if self._kernels else list(self._comb.local.view(-1, CRB)[: plan.num_send].split(plan.send_counts))
        return RowTargets(views, self._comb_local, plan.row("send_start"))

    def exchange_meta(self, meta: torch.Tensor) -> torch.Tensor:
        """:data:`META_EXCHANGE` ``"nccl"``: the base class's all-gather. ``"symmem"``: one
        :func:`~kernels.nvlink.meta_exchange_kernel` launch (GPU; under the interpreter its
        signal and wait halves around a host barrier), one D2H copy, one host wait for it.
        Either way a dispatch status left unread by :data:`DEFER_DISPATCH_CHECK` is read
        after the sync (for ``"symmem"`` from the same copy) and raises first."""
        if META_EXCHANGE != "symmem" or meta.shape[0] != self._meta_w:
            out = super().exchange_meta(meta)
            if self._pending == ST_DISPATCH:
                self._pending = None
                self._raise_status(self._status.tolist(), ST_DISPATCH)
            return out
        return self._exchange_symmem(meta)

    def _exchange_symmem(self, meta: torch.Tensor, send=None, wait: bool = True) -> torch.Tensor | None:
        """One :func:`~kernels.nvlink.meta_exchange_kernel` launch, the D2H copy of its output
        (vectors, timeout words, status words) and an event behind it; then ``send()``
        (kernels queued behind the exchange, before the host waits) and the wait for that
        event. A deferred dispatch status from the same copy raises first, then a timeout of
        the exchange."""
        if self._unwaited is not None:
            raise RuntimeError("exchange: the previous exchange was never finished (finish_exchange)")
        self._epoch_m += 1
        self._meta_kernel(meta.to(torch.int64).contiguous(), self._epoch_m)
        cuda = self.device.type == "cuda"
        if cuda:
            self._meta_host.copy_(self._meta_out, non_blocking=True)
            self._meta_ready.record()
        pending = self._pending
        if pending == ST_DISPATCH:
            self._pending = None
        if send is not None:
            send()
        if not wait:
            self._unwaited = (pending,)
            return None
        return self._finish_exchange(pending)

    def _finish_exchange(self, pending: int | None) -> torch.Tensor:
        if self.device.type == "cuda":
            self._meta_ready.synchronize()
        if pending == ST_DISPATCH:
            self._raise_status(self._host_status, ST_DISPATCH)
        if self._host_late.any():
            raise self._timeout("count exchange", int(np.flatnonzero(self._host_late)[0]))
        return self._host_rows

    def check(self, what: str) -> list[int]:
        """One host read of the status words: ``TimeoutError`` naming the silent peer, else
        the codes the peers sent with their combine flags. A dispatch under
        :data:`DEFER_DISPATCH_CHECK` reads nothing (the next sync does)."""
        R = self.world_size
        if what == "dispatch" and self._pending == ST_DISPATCH and DEFER_DISPATCH_CHECK:
            return [0] * R
        slot, self._pending = self._pending, None
        if slot is None:
            return [0] * R
        st = self._status.tolist()
        # a combine also reports a deferred dispatch timeout (the dispatch flag wait ran first)
        self._raise_status(st, ST_DISPATCH)
        self._raise_status(st, slot)
        return st[4 : 4 + R] if slot == ST_COMBINE else [0] * R

    def _raise_status(self, st: list[int], slot: int) -> None:
        if st[slot]:
            self._status.zero_()
            raise self._timeout("dispatch" if slot == ST_DISPATCH else "combine", st[slot] - 1)

    def _timeout(self, what: str, peer: int) -> TimeoutError:
        waited = f"{self.timeout_s:g} s" if self.device.type == "cuda" else f"{self.timeout_spins} reads"
        return TimeoutError(
            f"rank {self.rank}: nvlink {what} timed out waiting for rank {peer}'s rows "
            f"({waited}); is that rank alive and in the same call?"
        )

    # ------------------------------------------------------------------ flags
    def _flags(self, flags, epoch: int, slot: int, code: int, warmup: bool = False, plan: bool = False) -> None:
        """Signal ``(epoch << 8) | code`` to every peer and wait for theirs (no host sync:
        :meth:`check` reads the status later). ``plan``: the same launch writes the transfer
        plan's device rows from the exchanged vectors into :attr:`_plan_vec`."""
        from ..kernels.nvlink import signal_wait_kernel

        R = self.world_size
        args = (
            flags.peer_ptrs, flags.local, self._status, self._sink, self.rank, epoch, code, self.timeout_spins,
            self._timeout_us(), self._meta_out, self._plan_vec, self._meta_w,
        )  # fmt: skip
        kw = dict(PLAN=True, RP=next_pow2(R)) if plan else {}
        if warmup:  # GPU, compile only: the dispatch (with and without the plan) and the combine variant
            for sl, pk in ((ST_DISPATCH, {}), (ST_DISPATCH, dict(PLAN=True, RP=next_pow2(R))), (ST_COMBINE, {})):
                signal_wait_kernel.warmup(*args, grid=(R,), STATUS_SLOT=sl, SIGNAL=True, WAIT=True, GPU=True,
                                          num_warps=1, **pk)  # fmt: skip
            return
        self._signal_wait(signal_wait_kernel, args, dict(STATUS_SLOT=slot, num_warps=1, **kw))
        self._pending = slot

    def _meta_kernel(self, meta: torch.Tensor, epoch: int, warmup: bool = False) -> None:
        """Launch the count exchange of call ``epoch`` (see :meth:`exchange_meta`)."""
        from ..kernels.nvlink import meta_exchange_kernel

        R, W = self.world_size, self._meta_w
        args = (
            meta, self._meta_slots.peer_ptrs, self._mflags.peer_ptrs, self._mflags.local, self._meta_slots.local,
            self._meta_out, self._sink, self.rank, epoch, W, self.timeout_spins, self._timeout_us(),
        )  # fmt: skip
        kw = dict(WP=1 << (W - 1).bit_length(), num_warps=1)
        if warmup:
            meta_exchange_kernel.warmup(*args, grid=(R,), SIGNAL=True, WAIT=True, GPU=True, **kw)
        else:
            self._signal_wait(meta_exchange_kernel, args, kw)

    def _signal_wait(self, kernel, args: tuple, kw: dict) -> None:
        """Launch a signal-and-wait ``kernel`` (grid ``R``): on GPUs one launch does both; under
        the interpreter every rank signals, meets the others at a host barrier, then waits."""
        R = self.world_size
        if self.device.type == "cuda":
            launch(kernel, (R,), *args, SIGNAL=True, WAIT=True, GPU=True, **kw)
        else:
            launch(kernel, (R,), *args, SIGNAL=True, WAIT=False, GPU=False, **kw)
            self.mem.barrier()
            launch(kernel, (R,), *args, SIGNAL=False, WAIT=True, GPU=False, **kw)

    def _timeout_us(self) -> int:
        return min(int(self.timeout_s * 1e6), _INT32_MAX)

    def destroy(self) -> None:
        if not self._alive:
            return
        self._alive = False
        for t in (self._recv, self._comb, self._dflags, self._cflags, self._meta_slots, self._mflags):
            self.mem.free(t)
