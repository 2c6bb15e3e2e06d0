"""``backend="torch"``: ``torch.distributed`` collectives (NCCL on GPUs, gloo on CPU).

Dispatch packs every message row into one local send buffer ordered by destination rank
then token, then one ``all_to_all_single`` of uint8 rows with the split sizes of the
count exchange. Combine is the reverse ``all_to_all_single`` of combine rows (bytes, since
gloo has no bfloat16 all-to-all). Works anywhere, multi-node included; it is the
correctness reference for every other backend.

Per call: dispatch = the buffer's count all-gather + one all-to-all; combine = one
all-to-all and nothing else. Each combine block to a source rank starts with one
**status row** whose first int64 is the sender's error code (0 = fine), so every rank
learns about a bad ``combine`` argument on any rank from the data it receives anyway
(:meth:`TorchBackend.check` reads the ``R`` codes: the one host sync of a combine).

Fixed buffers, allocated on first use at full capacity and reused (so their addresses, and
the device pointer tables built from them, never change):
send ``[R * max_tokens_per_rank, row_bytes]``, receive ``[max_recv_tokens, row_bytes]``,
combine ``[max_recv_tokens + R, crow_bytes]`` out and ``[R * max_tokens_per_rank + R, crow_bytes]`` back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backend import EPBackend, PackFn, ReduceFn, RowTargets, TransferPlan


class TorchBackend(EPBackend):
    name = "torch"

    def __init__(self, group, device: torch.device, config) -> None:
        super().__init__(group, device, config)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self._bufs: dict[str, torch.Tensor] = {}
        self._tables: dict[str, torch.Tensor] = {}
        self._codes: torch.Tensor | None = None

    # ------------------------------------------------------------------ fixed buffers
    def _buf(self, name: str, rows: int, row_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed ``[rows, row_bytes]`` uint8 buffer ``name`` and its ``[R]`` pointer table
        (every entry its base address), allocated once."""
        b = self._bufs.get(name)
        if b is None or b.shape != (rows, row_bytes):
            b = torch.empty(rows, row_bytes, dtype=torch.uint8, device=self.device)
            self._bufs[name] = b
            self._tables[name] = torch.full((self.world_size,), b.data_ptr(), dtype=torch.int64, device=self.device)
        return b, self._tables[name]

    def _capacity(self) -> tuple[int, int]:
        cfg, R = self.config, self.world_size
        return R * cfg.max_tokens_per_rank, cfg.max_recv_tokens or R * cfg.max_tokens_per_rank

    # ------------------------------------------------------------------ interface
    def dispatch_rows(self, plan: TransferPlan, pack: PackFn) -> torch.Tensor:
        max_send, max_recv = self._capacity()
        send, stab = self._buf("send", max_send, plan.row_bytes)
        recv, _ = self._buf("recv", max_recv, plan.row_bytes)
        views = list(send[: plan.num_send].split(plan.send_counts))
        pack(RowTargets(views, stab, plan.row("send_start")))
        out = recv[: plan.num_recv]
        dist.all_to_all_single(out, send[: plan.num_send], plan.recv_counts, plan.send_counts, group=self.group)
        return out

    def combine_rows(self, plan: TransferPlan, reduce: ReduceFn, crow_bytes: int, code: int) -> RowTargets:
        R = self.world_size
        max_send, max_recv = self._capacity()
        part, ptab = self._buf("comb_out", max_recv + R, crow_bytes)
        back, btab = self._buf("comb_back", max_send + R, crow_bytes)
        n_out, n_back = plan.num_recv + R, plan.num_send + R
        words = part.view(torch.int64)
        words.index_fill_(0, plan.row("recv_status"), code)  # one status row per source block
        if code == 0:
            starts = [a + s + 1 for s, a in enumerate(plan.recv_offsets)]
            views = [part[a : a + n] for a, n in zip(starts, plan.recv_counts)]
            reduce(RowTargets(views, ptab, plan.row("plus_one")))
        in_splits = [n + 1 for n in plan.recv_counts]
        out_splits = [n + 1 for n in plan.send_counts]
        dist.all_to_all_single(back[:n_back], part[:n_out], out_splits, in_splits, group=self.group)
        self._codes = back.view(torch.int64)[:, 0].index_select(0, plan.row("send_status"))
        starts = [a + r + 1 for r, a in enumerate(plan.send_offsets)]
        views = [back[a : a + n] for a, n in zip(starts, plan.send_counts)]
        return RowTargets(views, btab, plan.row("send_data"))

    def check(self, what: str) -> list[int]:
        if what != "combine" or self._codes is None:
            return [0] * self.world_size
        codes, self._codes = self._codes.tolist(), None
        return codes

    def destroy(self) -> None:
        self._bufs.clear()
        self._tables.clear()
