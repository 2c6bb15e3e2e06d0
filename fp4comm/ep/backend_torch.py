"""``backend="torch"``: ``torch.distributed`` collectives (NCCL on GPUs, gloo on CPU).

Dispatch packs every message row into one local send buffer ordered by destination rank
then token, then one ``all_to_all_single`` of uint8 rows with the split sizes of the
count exchange. Combine is the reverse ``all_to_all_single`` of BF16 rows (sent as bytes,
since gloo has no bfloat16 all-to-all). Works anywhere, multi-node included; it is the
correctness reference for every other backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backend import EPBackend, PackFn, ReduceFn, TransferPlan


class TorchBackend(EPBackend):
    name = "torch"

    def exchange_meta(self, meta: torch.Tensor) -> torch.Tensor:
        R = dist.get_world_size(self.group)
        meta = meta.to(self.device, torch.int64).contiguous()
        out = [torch.empty_like(meta) for _ in range(R)]
        dist.all_gather(out, meta, group=self.group)
        return torch.stack(out).cpu()

    def dispatch_rows(self, plan: TransferPlan, pack: PackFn) -> torch.Tensor:
        send = torch.empty(plan.num_send, plan.row_bytes, dtype=torch.uint8, device=self.device)
        pack(list(send.split(plan.send_counts)))
        recv = torch.empty(plan.num_recv, plan.row_bytes, dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(recv, send, plan.recv_counts, plan.send_counts, group=self.group)
        return recv

    def combine_rows(self, plan: TransferPlan, reduce: ReduceFn) -> list[torch.Tensor]:
        H = plan.hidden
        partial = torch.empty(plan.num_recv, H, dtype=torch.bfloat16, device=self.device)
        reduce(list(partial.split(plan.recv_counts)))
        back = torch.empty(plan.num_send, H, dtype=torch.bfloat16, device=self.device)
        dist.all_to_all_single(
            back.view(torch.uint8), partial.view(torch.uint8), plan.send_counts, plan.recv_counts, group=self.group
        )
        return list(back.split(plan.send_counts))
