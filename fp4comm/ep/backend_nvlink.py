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

Per call: dispatch = the buffer's count all-gather + one flag kernel; combine = one flag
kernel, no collective: a rank whose combine input is bad sends its error code in the low
bits of its flag (``(epoch << 8) | code``) and stores no rows, so every rank learns about it
from the flag it waits for anyway. Destination pointer tables are the symmetric buffers'
``peer_ptrs`` (fixed, on the device); per-call row offsets come with the plan.

Timeouts: the flag wait is bounded (``config.timeout_s`` seconds of ``%globaltimer`` on GPUs,
given to ``EPBuffer(timeout_s=...)``; a few reads under the interpreter). The host reads the
status words once per call in :meth:`NVLinkBackend.check`, after the buffer launched every
kernel of the call (permute / source reduce), and raises ``TimeoutError`` naming the peer.
The flag kernel is compiled when the backend is built, followed by one barrier, so a rank
never spins while a peer compiles it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._launch import launch
from .backend import EPBackend, PackFn, ReduceFn, RowTargets, TransferPlan
from .message import MessageLayout, combine_row_bytes
from .symmem import SymmetricMemory

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
        self._status = torch.zeros(4 + R, dtype=torch.int32, device=device)
        self._sink = torch.zeros(2, dtype=torch.int64, device=device)
        self._epoch_d = 0
        self._epoch_c = 0
        self._pending: int | None = None  # status slot to read in check()
        self.timeout_spins = CPU_TIMEOUT_SPINS
        self.timeout_s = float(getattr(config, "timeout_s", None) or DEFAULT_TIMEOUT_S)
        self._alive = True
        if device.type == "cuda":
            self._flags(self._dflags, 0, ST_DISPATCH, 0, warmup=True)
            self.mem.barrier()
            torch.cuda.current_stream(device).synchronize()

    # ------------------------------------------------------------------ interface
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
        self._epoch_d += 1
        self._flags(self._dflags, self._epoch_d, ST_DISPATCH, 0)
        return self._recv.local.view(-1, RB)[: plan.num_recv]

    def combine_rows(self, plan: TransferPlan, reduce: ReduceFn, crow_bytes: int, code: int) -> RowTargets:
        R, CRB = self.world_size, self.crow_bytes
        if crow_bytes != CRB:
            raise ValueError(f"crow_bytes: {crow_bytes} != the nvlink combine buffer's row of {CRB} bytes")
        if plan.num_send > self.max_send:
            raise ValueError(f"max_tokens_per_rank: {plan.num_send} combine rows exceed the buffer's {self.max_send}")
        if code == 0:
            views = []
            for s in range(R):
                # on rank s, rows sent to rank r start at s's send offset for r
                off = sum(plan.counts[s][r] for r in range(self.rank))
                views.append(self._comb.peer(s).view(-1, CRB)[off : off + plan.recv_counts[s]])
            reduce(RowTargets(views, self._comb.peer_ptrs, plan.row("at_source_shift")))
        self._epoch_c += 1
        self._flags(self._cflags, self._epoch_c, ST_COMBINE, code)
        views = list(self._comb.local.view(-1, CRB)[: plan.num_send].split(plan.send_counts))
        return RowTargets(views, self._comb_local, plan.row("send_start"))

    def check(self, what: str) -> list[int]:
        """One host read of the status words: ``TimeoutError`` naming the silent peer, else
        the codes the peers sent with their combine flags."""
        slot, self._pending = self._pending, None
        R = self.world_size
        if slot is None:
            return [0] * R
        st = self._status.tolist()
        if st[slot]:
            self._status.zero_()
            what = "dispatch" if slot == ST_DISPATCH else "combine"
            waited = f"{self.timeout_s:g} s" if self.device.type == "cuda" else f"{self.timeout_spins} reads"
            raise TimeoutError(
                f"rank {self.rank}: nvlink {what} timed out waiting for rank {st[slot] - 1}'s rows "
                f"({waited}); is that rank alive and in the same call?"
            )
        return st[4 : 4 + R] if slot == ST_COMBINE else [0] * R

    # ------------------------------------------------------------------ flags
    def _flags(self, flags, epoch: int, slot: int, code: int, warmup: bool = False) -> None:
        """Signal ``(epoch << 8) | code`` to every peer and wait for theirs (no host sync:
        :meth:`check` reads the status later)."""
        from ..kernels.nvlink import signal_wait_kernel

        R = self.world_size
        gpu = self.device.type == "cuda"
        timeout_us = min(int(self.timeout_s * 1e6), _INT32_MAX)
        args = (flags.peer_ptrs, flags.local, self._status, self._sink, self.rank, epoch, code, self.timeout_spins, timeout_us)
        if gpu:
            kw = dict(STATUS_SLOT=slot, SIGNAL=True, WAIT=True, GPU=True, num_warps=1)
            if warmup:  # compile only, the dispatch and the combine variant
                for sl in (ST_DISPATCH, ST_COMBINE):
                    signal_wait_kernel.warmup(*args, grid=(R,), **{**kw, "STATUS_SLOT": sl})
                return
            launch(signal_wait_kernel, (R,), *args, **kw)
        else:  # interpreter: every rank signals before anyone waits
            launch(signal_wait_kernel, (R,), *args, STATUS_SLOT=slot, SIGNAL=True, WAIT=False, GPU=False)
            self.mem.barrier()
            launch(signal_wait_kernel, (R,), *args, STATUS_SLOT=slot, SIGNAL=False, WAIT=True, GPU=False)
        self._pending = slot

    def destroy(self) -> None:
        if not self._alive:
            return
        self._alive = False
        for t in (self._recv, self._comb, self._dflags, self._cflags):
            self.mem.free(t)
