"""Plain-torch reference of expert-parallel dispatch, permute and combine.

No Triton, no pytest. Built on ``torch.distributed.all_to_all_single`` (like DeepEP's
``refs.py``); it is the executable spec the :class:`~fp4comm.ep.EPBuffer` kernels must match
**bit for bit**. The local steps (:func:`pack_rows_ref`, :func:`permute_index_ref`,
:func:`permute_ref`, :func:`combine_expert_ref`, :func:`combine_source_ref`) are also what
``EPBuffer(..., impl="reference")`` runs.

Conventions (``T`` tokens, ``H`` hidden, ``K`` top-k, ``E`` experts, ``R`` ranks,
``El = E // R``; expert ``e`` lives on rank ``e // El``; id ``-1`` = not routed):

1. A token goes to each rank owning any of its experts, **once** per rank, as one message
   row (``fp4comm/ep/message.py``). The send buffer holds the rows for rank 0 (tokens
   ascending), then rank 1, ...; the receiver's rows are therefore ordered by
   (source rank, source token).
2. Permute: every ``(received row n, k)`` whose expert is local gets the next free slot of
   that expert, scanning rows in receive order and ``k`` ascending inside a row, so the
   masked layout is ordered by (source rank, source token) in every expert, run after run.
3. Combine, rounding order (FP32 unless said):
   expert side, per received row: ``acc = 0; for k ascending, if (n, k) is local:
   acc = acc + w_k * float(out[slot])`` (product rounded, then sum rounded: no FMA),
   then one BF16 rounding (RNE) of ``acc``;
   source side, per token: ``acc = 0; for r ascending, if sent to r:
   acc = acc + float(partial_r)``, then BF16. A token sent nowhere gets zeros.
4. Combine wire ``fp8`` / ``nvfp4`` (optional): the BF16 partial row of step 3 is quantized
   per row on the expert side exactly as dispatch quantizes a token (fp8: 128-blocks,
   ``scale = amax / 448``; nvfp4: per-row ``gs = 2688 / amax``, 16-blocks, E4M3 scales),
   sent as a :class:`~fp4comm.ep.message.CombineLayout` row, and dequantized to FP32 on the
   source (``e4m3 * scale``; ``e2m1 * float(sf) / gs``) before the rank-ordered FP32 sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ep.message import CombineLayout, MessageFields, MessageLayout, pack_messages, unpack_messages
from ..formats import FP8_BLOCK, NVFP4_BLOCK, FP8BlockTensor, NVFP4Tensor, swizzle_scales
from .quant import (
    dequantize_fp8_blockwise_ref,
    dequantize_nvfp4_ref,
    quantize_fp8_blockwise_ref,
    quantize_nvfp4_ref,
)

MASKED_M_ALIGN = 128


# ----------------------------------------------------------------------------- local steps
def token_rank_offsets_ref(topk_ids: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """``[T, R]`` int32: row of token ``t`` in the block of rows sent to rank ``r`` (tokens
    ascending), ``-1`` if ``t`` is not sent to ``r``."""
    el = num_experts // num_ranks
    ids = topk_ids.long()
    dest = torch.where(ids >= 0, ids // el, torch.full_like(ids, -1))
    is_in = (dest[:, :, None] == torch.arange(num_ranks, device=ids.device)).any(1)  # [T, R]
    incl = torch.cumsum(is_in.int(), 0)
    return torch.where(is_in, incl - 1, torch.full_like(incl, -1)).int()


def quantize_rows_ref(
    x: torch.Tensor, payload: str, global_scale="per_token", ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Quantize ``x [T, H]`` per token for the wire: ``(payload, scales, gs [T] or None)``."""
    T = x.shape[0]
    if payload == "nvfp4":
        q = quantize_nvfp4_ref(x, global_scale, scale_layout="linear")
        return q.data, q.scales, q.global_scale.float().expand(T).contiguous()
    if payload == "fp8":
        q = quantize_fp8_blockwise_ref(x, 128, ue8m0)
        return q.data, q.scales, None
    return x.to(torch.bfloat16), None, None


def pack_rows_ref(
    msg: MessageLayout,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    rank_offset: torch.Tensor,
    global_scale="per_token",
    ue8m0: bool = False,
) -> torch.Tensor:
    """Message rows of ``x [T, H]`` BF16 for every destination: ``[N_send, row_bytes]`` uint8,
    ordered by destination rank, then token (``rank_offset [T, R]`` says which)."""
    T = x.shape[0]
    if T == 0 or not bool((rank_offset >= 0).any()):
        return torch.zeros(0, msg.row_bytes, dtype=torch.uint8, device=x.device)
    payload, scales, gs = quantize_rows_ref(x, msg.payload, global_scale, ue8m0)
    fields = MessageFields(
        payload=payload,
        scales=scales,
        global_scale=gs,
        topk_ids=topk_ids.int(),
        topk_weights=topk_weights.float(),
        src_index=torch.arange(T, dtype=torch.int32, device=x.device),
    )
    rows = pack_messages(msg, fields)
    order = [torch.nonzero(rank_offset[:, r] >= 0).flatten() for r in range(rank_offset.shape[1])]
    idx = torch.cat(order) if order else torch.zeros(0, dtype=torch.long, device=x.device)
    return rows[idx]


def permute_index_ref(
    topk_ids: torch.Tensor, expert_base: int, num_local_experts: int, max_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of the received rows' ``(n, k)`` pairs.

    Args:
        topk_ids: ``[N, K]`` int32, global ids of the received rows.
        expert_base: global id of this rank's first expert; ``num_local_experts``: ``El``.
        max_m: rows per expert in the masked layout.

    Returns:
        ``slot_map [N, K]`` int32 (``e_local * max_m + slot``, ``-1`` if not local) and
        ``masked_m [El]`` int32 (true counts; slots past ``max_m`` are not written).
    """
    N, K = topk_ids.shape
    ids = topk_ids.long()
    local = (ids >= expert_base) & (ids < expert_base + num_local_experts)
    el = torch.where(local, ids - expert_base, torch.full_like(ids, -1))
    onehot = (el[..., None] == torch.arange(num_local_experts, device=ids.device)).reshape(N * K, num_local_experts).int()
    excl = torch.cumsum(onehot, 0) - onehot  # (n, k) row-major
    slot = (excl * onehot).sum(-1).reshape(N, K)
    slot_map = torch.where(local & (slot < max_m), el * max_m + slot, torch.full_like(slot, -1))
    return slot_map.int(), onehot.sum(0, dtype=torch.int32)


@dataclass
class MaskedLayout:
    """Receiver-side masked per-expert layout (``El`` experts, ``max_m`` rows each).

    x: ``[El, max_m, H/2]`` uint8 (nvfp4), ``[El, max_m, H]`` float8_e4m3fn (fp8) or bfloat16.
    scales: nvfp4 ``[El, max_m, H/16]`` (linear) or ``[El, max_m, round_up(H/16, 4)]``
        (swizzled) float8_e4m3fn, zero padding; fp8 ``[El, max_m, H/128]`` float32; bf16 None.
    global_scale: ``[El, max_m]`` float32 (nvfp4; padding rows 1) or None.
    topk_weights: ``[El, max_m]`` float32, the weight of each slot's (token, expert) pair.
    Rows past ``masked_m[e]`` are zero in the reference (unspecified payload in kernels).
    """

    x: torch.Tensor
    scales: torch.Tensor | None
    global_scale: torch.Tensor | None
    topk_weights: torch.Tensor


def permute_ref(
    msg: MessageLayout,
    rows: torch.Tensor,
    slot_map: torch.Tensor,
    num_local_experts: int,
    max_m: int,
    scale_layout: str = "swizzled",
) -> MaskedLayout:
    """Received rows ``[N, row_bytes]`` uint8 -> :class:`MaskedLayout`."""
    f = unpack_messages(msg, rows)
    El, dev = num_local_experts, rows.device
    n_idx, k_idx = torch.nonzero(slot_map >= 0, as_tuple=True)
    dst = slot_map[n_idx, k_idx].long()
    x = torch.zeros(El * max_m, *f.payload.shape[1:], dtype=f.payload.dtype, device=dev)
    x.view(torch.uint8)[dst] = f.payload.view(torch.uint8)[n_idx]
    w = torch.zeros(El * max_m, dtype=torch.float32, device=dev)
    w[dst] = f.topk_weights[n_idx, k_idx]
    scales = gs = None
    if msg.payload in ("nvfp4", "fp8"):
        s = torch.zeros(El * max_m, msg.num_scales, dtype=f.scales.dtype, device=dev)
        s.view(torch.uint8)[dst] = f.scales.view(torch.uint8)[n_idx]
        scales = s.reshape(El, max_m, -1)
        if msg.payload == "nvfp4" and scale_layout == "swizzled":
            scales = swizzle_scales(scales)
    if msg.payload == "nvfp4":
        gs = torch.ones(El * max_m, dtype=torch.float32, device=dev)
        gs[dst] = f.global_scale[n_idx]
        gs = gs.reshape(El, max_m)
    return MaskedLayout(x=x.reshape(El, max_m, -1), scales=scales, global_scale=gs, topk_weights=w.reshape(El, max_m))


def combine_expert_ref(expert_out: torch.Tensor, slot_map: torch.Tensor, slot_weights: torch.Tensor) -> torch.Tensor:
    """Expert side of combine: ``[El, max_m, H]`` BF16 outputs -> ``[N, H]`` BF16 partial rows,
    ``sum_k w_k * out[slot(n, k)]`` over the row's local pairs (rounding order: module doc)."""
    H = expert_out.shape[-1]
    eo = expert_out.reshape(-1, H)
    sw = slot_weights.reshape(-1)
    N, K = slot_map.shape
    acc = torch.zeros(N, H, dtype=torch.float32, device=expert_out.device)
    for k in range(K):
        m = slot_map[:, k] >= 0
        idx = slot_map[m, k].long()
        acc[m] = acc[m] + sw[idx][:, None] * eo[idx].float()
    return acc.to(torch.bfloat16)


def encode_combine_rows_ref(partial: torch.Tensor, wire: str = "bf16") -> torch.Tensor:
    """BF16 partial rows ``[N, H]`` -> combine wire rows ``[N, CombineLayout.row_bytes]`` uint8
    (padding bytes zero)."""
    N, H = partial.shape
    lay = CombineLayout(wire, H)
    rows = torch.zeros(N, lay.row_bytes, dtype=torch.uint8, device=partial.device)
    if wire == "bf16":
        rows[:] = partial.contiguous().view(torch.uint8)
        return rows
    if wire == "fp8":
        q = quantize_fp8_blockwise_ref(partial, FP8_BLOCK)
        data, scales, gs = q.data.view(torch.uint8), q.scales.float().contiguous().view(torch.uint8), None
    else:
        q = quantize_nvfp4_ref(partial, "per_token", scale_layout="linear")
        data, scales = q.data, q.scales.contiguous().view(torch.uint8)
        gs = q.global_scale.float().expand(N).contiguous().view(torch.uint8).reshape(N, 4)
    rows[:, : lay.payload_bytes] = data.reshape(N, -1)
    rows[:, lay.scale_offset : lay.scale_offset + lay.scale_bytes] = scales.reshape(N, -1)
    if gs is not None:
        rows[:, lay.gs_offset : lay.gs_offset + 4] = gs
    return rows


def decode_combine_rows_ref(rows: torch.Tensor, hidden: int, wire: str = "bf16") -> torch.Tensor:
    """Combine wire rows ``[N, row_bytes]`` uint8 -> ``[N, H]`` float32 (exact for bf16)."""
    lay = CombineLayout(wire, hidden)
    N = rows.shape[0]

    def sec(off: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        return rows[:, off : off + nbytes].contiguous().view(dtype)

    if wire == "bf16":
        return sec(0, lay.payload_bytes, torch.bfloat16).float()
    if wire == "fp8":
        t = FP8BlockTensor(
            data=sec(0, lay.payload_bytes, torch.float8_e4m3fn),
            scales=sec(lay.scale_offset, lay.scale_bytes, torch.float32),
            block=FP8_BLOCK,
            ue8m0=False,
        )
        return dequantize_fp8_blockwise_ref(t, torch.float32)
    t = NVFP4Tensor(
        data=sec(0, lay.payload_bytes, torch.uint8),
        scales=sec(lay.scale_offset, hidden // NVFP4_BLOCK, torch.float8_e4m3fn),
        global_scale=sec(lay.gs_offset, 4, torch.float32).reshape(N),
        scale_layout="linear",
        shape=torch.Size((N, hidden)),
    )
    return dequantize_nvfp4_ref(t, torch.float32)


def combine_source_ref(
    parts: list[torch.Tensor], rank_offset: torch.Tensor, hidden: int, wire: str = "bf16"
) -> torch.Tensor:
    """Source side of combine: ``parts[r]`` = the rows back from rank ``r`` (in send order),
    ``[n_r, H]`` BF16 or ``[n_r, row_bytes]`` uint8 wire rows of ``wire`` -> ``[T, H]`` BF16,
    summed over ranks in rank order in FP32."""
    T = rank_offset.shape[0]
    acc = torch.zeros(T, hidden, dtype=torch.float32, device=rank_offset.device)
    for r, p in enumerate(parts):
        m = rank_offset[:, r] >= 0
        rows = p[rank_offset[m, r].long()]
        v = rows.float() if rows.dtype == torch.bfloat16 else decode_combine_rows_ref(rows, hidden, wire)
        acc[m] = acc[m] + v
    return acc.to(torch.bfloat16)


def round_max_m(counts) -> int:
    """``max_m`` derived from per-expert counts (a 1-D tensor or numpy array): the largest,
    rounded up to 128 (at least 128)."""
    m = int(counts.max()) if len(counts) else 0
    return max(MASKED_M_ALIGN, -(-m // MASKED_M_ALIGN) * MASKED_M_ALIGN)


# ----------------------------------------------------------------------------- distributed
@dataclass
class DispatchRef:
    """Everything :func:`dispatch_ref` produced on this rank (``N`` received rows)."""

    layout: MaskedLayout
    masked_m: torch.Tensor  # [El] int32
    rows: torch.Tensor  # [N, row_bytes] uint8, received, (source rank, token) order
    slot_map: torch.Tensor  # [N, K] int32
    rank_offset: torch.Tensor  # [T, R] int32
    send_counts: list[int]
    recv_counts: list[int]
    max_m: int
    hidden: int


def _a2a(t: torch.Tensor, out_rows: int, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    b = t.contiguous().view(torch.uint8).reshape(t.shape[0], t.shape[1] * t.element_size())
    out = torch.empty(out_rows, b.shape[1], dtype=torch.uint8, device=t.device)
    dist.all_to_all_single(out, b, out_splits, in_splits, group=group)
    return out


def dispatch_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    group=None,
    payload: str = "nvfp4",
    scale_layout: str = "swizzled",
    global_scale="per_token",
    ue8m0: bool = False,
    max_m: int | None = None,
) -> DispatchRef:
    """Reference dispatch of ``x [T, H]`` BF16 with ``topk_ids [T, K]`` / ``topk_weights [T, K]``
    (collective over ``group``). ``max_m`` None: :func:`round_max_m` of this rank's counts."""
    R = dist.get_world_size(group)
    rank = dist.get_rank(group)
    El = num_experts // R
    H = x.shape[1]
    msg = MessageLayout(payload, H, topk_ids.shape[1])
    rank_offset = token_rank_offsets_ref(topk_ids, num_experts, R)
    send_counts_t = (rank_offset >= 0).sum(0).long()
    recv_counts_t = torch.empty_like(send_counts_t)
    dist.all_to_all_single(recv_counts_t, send_counts_t, group=group)
    send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
    send = pack_rows_ref(msg, x, topk_ids, topk_weights, rank_offset, global_scale, ue8m0)
    rows = _a2a(send, sum(recv_counts), recv_counts, send_counts, group)
    ids = unpack_messages(msg, rows).topk_ids
    _, counts = permute_index_ref(ids, rank * El, El, 1 << 30)
    mm = round_max_m(counts) if max_m is None else max_m
    slot_map, masked_m = permute_index_ref(ids, rank * El, El, mm)
    lay = permute_ref(msg, rows, slot_map, El, mm, scale_layout)
    return DispatchRef(lay, masked_m, rows, slot_map, rank_offset, send_counts, recv_counts, mm, H)


def combine_ref(expert_out: torch.Tensor, d: DispatchRef, group=None, wire: str = "bf16") -> torch.Tensor:
    """Reference combine: ``expert_out [El, max_m, H]`` BF16 -> ``[T, H]`` BF16 on the source;
    ``wire``: ``"bf16"`` | ``"fp8"`` | ``"nvfp4"`` combine rows (module doc, step 4)."""
    partial = combine_expert_ref(expert_out, d.slot_map, d.layout.topk_weights)
    rows = encode_combine_rows_ref(partial, wire)
    back = _a2a(rows, sum(d.send_counts), d.send_counts, d.recv_counts, group)
    return combine_source_ref(list(back.split(d.send_counts)), d.rank_offset, d.hidden, wire)
