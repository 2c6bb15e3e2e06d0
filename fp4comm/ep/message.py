"""The dispatch message row: one per (token, destination rank), shared by every backend.

A token routed to rank ``r`` (any of its top-k experts lives on ``r``) is sent to ``r``
exactly once, as one fixed-size byte row::

    [ payload | scales | global_scale | topk_ids | topk_weights | src_index | pad ]

=============  =====================================  ======================================
section        nvfp4 / fp8 / bf16                     notes
=============  =====================================  ======================================
payload        H/2 B E2M1 / H B E4M3 / 2H B BF16      starts at byte 0
scales         H/16 B E4M3 / 4*H/128 B FP32 / none    16-byte aligned offset, linear order
global_scale   4 B FP32 (nvfp4 only)                  encode-direction ``gs`` of the token
topk_ids       4*K B int32                            *global* expert ids, -1 = not routed
topk_weights   4*K B FP32
src_index      4 B int32                              token index on the source rank
=============  =====================================  ======================================

Sections start 16-byte aligned where they hold vectors (payload, scales, metadata) and
the row length is a multiple of 16, so kernels can move rows with 16-byte accesses.
NVFP4 at H=7168, K=8: 3584 + 448 + 72 (+8 pad) = 4112 B, vs 14336 + 72 for BF16.

Both the ``torch`` backend (rows packed into a send buffer, moved with
``all_to_all_single``) and the ``nvlink`` backend (rows stored straight into the
receiver's buffer) use this layout, so the receiver-side permute is one kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .._runtime import round_up
from ..formats import FP8_BLOCK, NVFP4_BLOCK

PAYLOADS = ("nvfp4", "fp8", "bf16")


@dataclass(frozen=True)
class MessageLayout:
    """Byte offsets of one dispatch message row (see module docstring). The derived sizes
    and offsets are computed once per instance (``cached_property``: kernel launches read
    them on every call)."""

    payload: str
    hidden: int
    num_topk: int

    def __post_init__(self) -> None:
        if self.payload not in PAYLOADS:
            raise ValueError(f"payload: must be one of {list(PAYLOADS)}, got {self.payload!r}")
        if self.hidden <= 0 or self.hidden % NVFP4_BLOCK:
            raise ValueError(f"hidden: must be a positive multiple of 16, got {self.hidden}")
        if self.payload == "fp8" and self.hidden % FP8_BLOCK:
            raise ValueError(f"hidden: must be a multiple of {FP8_BLOCK} for the fp8 payload, got {self.hidden}")
        if self.num_topk <= 0:
            raise ValueError(f"num_topk: must be > 0, got {self.num_topk}")

    # ---- sizes
    @cached_property
    def payload_bytes(self) -> int:
        return {"nvfp4": self.hidden // 2, "fp8": self.hidden, "bf16": 2 * self.hidden}[self.payload]

    @cached_property
    def scale_bytes(self) -> int:
        return {"nvfp4": self.hidden // NVFP4_BLOCK, "fp8": 4 * (self.hidden // FP8_BLOCK), "bf16": 0}[self.payload]

    @cached_property
    def num_scales(self) -> int:
        """Scale elements in a row (E4M3 for nvfp4, FP32 for fp8)."""
        return {"nvfp4": self.hidden // NVFP4_BLOCK, "fp8": self.hidden // FP8_BLOCK, "bf16": 0}[self.payload]

    # ---- offsets (bytes from the row start)
    @cached_property
    def scale_offset(self) -> int:
        return round_up(self.payload_bytes, 16)

    @cached_property
    def meta_offset(self) -> int:
        return round_up(self.scale_offset + self.scale_bytes, 16)

    @cached_property
    def gs_offset(self) -> int:
        return self.meta_offset

    @cached_property
    def ids_offset(self) -> int:
        return self.meta_offset + (4 if self.payload == "nvfp4" else 0)

    @cached_property
    def weights_offset(self) -> int:
        return self.ids_offset + 4 * self.num_topk

    @cached_property
    def src_offset(self) -> int:
        return self.weights_offset + 4 * self.num_topk

    @cached_property
    def row_bytes(self) -> int:
        return round_up(self.src_offset + 4, 16)

    @cached_property
    def wire_bytes(self) -> int:
        """Bytes of payload + scales (+ global scale) a token puts on the wire (no metadata)."""
        return self.payload_bytes + self.scale_bytes + (4 if self.payload == "nvfp4" else 0)


@dataclass
class MessageFields:
    """Unpacked message rows (``N`` rows).

    payload: ``[N, H/2]`` uint8 (nvfp4), ``[N, H]`` float8_e4m3fn (fp8) or ``[N, H]`` bfloat16.
    scales: ``[N, H/16]`` float8_e4m3fn (nvfp4), ``[N, H/128]`` float32 (fp8), ``None`` (bf16).
    global_scale: ``[N]`` float32 (nvfp4) or ``None``.
    topk_ids: ``[N, K]`` int32, topk_weights: ``[N, K]`` float32, src_index: ``[N]`` int32.
    """

    payload: torch.Tensor
    scales: torch.Tensor | None
    global_scale: torch.Tensor | None
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    src_index: torch.Tensor


def _bytes_of(t: torch.Tensor, n: int) -> torch.Tensor:
    row_bytes = math.prod(t.shape[1:]) * t.element_size()  # explicit: reshape(0, -1) is ambiguous
    return t.contiguous().view(torch.uint8).reshape(n, row_bytes)


def pack_messages(layout: MessageLayout, f: MessageFields) -> torch.Tensor:
    """Reference packer: fields -> ``[N, row_bytes]`` uint8 rows (padding bytes zero)."""
    n = f.topk_ids.shape[0]
    rows = torch.zeros(n, layout.row_bytes, dtype=torch.uint8, device=f.topk_ids.device)
    rows[:, : layout.payload_bytes] = _bytes_of(f.payload, n)
    if layout.scale_bytes:
        rows[:, layout.scale_offset : layout.scale_offset + layout.scale_bytes] = _bytes_of(f.scales, n)
    if layout.payload == "nvfp4":
        rows[:, layout.gs_offset : layout.gs_offset + 4] = _bytes_of(f.global_scale.float(), n)
    k = layout.num_topk
    rows[:, layout.ids_offset : layout.ids_offset + 4 * k] = _bytes_of(f.topk_ids.int(), n)
    rows[:, layout.weights_offset : layout.weights_offset + 4 * k] = _bytes_of(f.topk_weights.float(), n)
    rows[:, layout.src_offset : layout.src_offset + 4] = _bytes_of(f.src_index.int(), n)
    return rows


def unpack_messages(layout: MessageLayout, rows: torch.Tensor) -> MessageFields:
    """Reference unpacker: ``[N, row_bytes]`` uint8 -> fields (copies)."""
    n = rows.shape[0]
    k = layout.num_topk

    def sec(off: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        return rows[:, off : off + nbytes].contiguous().view(dtype)

    payload_dtype = {"nvfp4": torch.uint8, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[layout.payload]
    payload = sec(0, layout.payload_bytes, payload_dtype)
    scales = None
    if layout.payload == "nvfp4":
        scales = sec(layout.scale_offset, layout.scale_bytes, torch.float8_e4m3fn)
    elif layout.payload == "fp8":
        scales = sec(layout.scale_offset, layout.scale_bytes, torch.float32)
    gs = sec(layout.gs_offset, 4, torch.float32).reshape(n) if layout.payload == "nvfp4" else None
    return MessageFields(
        payload=payload,
        scales=scales,
        global_scale=gs,
        topk_ids=sec(layout.ids_offset, 4 * k, torch.int32),
        topk_weights=sec(layout.weights_offset, 4 * k, torch.float32),
        src_index=sec(layout.src_offset, 4, torch.int32).reshape(n),
    )


# ----------------------------------------------------------------------------- combine rows
COMBINE_PAYLOADS = ("bf16", "fp8", "nvfp4")


@dataclass(frozen=True)
class CombineLayout:
    """One combine row (expert side -> source, one per (token, rank)) on the wire::

        bf16:  [ H BF16 ]                                     2H B
        fp8:   [ H E4M3 | H/128 FP32 scales (16-aligned) ]    H + H/32 B, rounded to 16
        nvfp4: [ H/2 E2M1 | H/16 E4M3 (16-aligned) | gs FP32 (16-aligned) | pad to 16 ]

    The same layout as the low-latency combine rows (``kernels/nvlink.py`` ``_store_row``).
    """

    payload: str
    hidden: int

    def __post_init__(self) -> None:
        if self.payload not in COMBINE_PAYLOADS:
            raise ValueError(f"combine_payload: must be one of {list(COMBINE_PAYLOADS)}, got {self.payload!r}")

    @cached_property
    def payload_bytes(self) -> int:
        return {"nvfp4": self.hidden // 2, "fp8": self.hidden, "bf16": 2 * self.hidden}[self.payload]

    @cached_property
    def num_scales(self) -> int:
        return {"nvfp4": self.hidden // NVFP4_BLOCK, "fp8": self.hidden // FP8_BLOCK, "bf16": 0}[self.payload]

    @cached_property
    def scale_bytes(self) -> int:
        return self.num_scales * (4 if self.payload == "fp8" else 1)

    @cached_property
    def scale_offset(self) -> int:
        return round_up(self.payload_bytes, 16)

    @cached_property
    def gs_offset(self) -> int:
        return round_up(self.scale_offset + self.scale_bytes, 16)

    @cached_property
    def row_bytes(self) -> int:
        return self.gs_offset + (16 if self.payload == "nvfp4" else 0)


def combine_row_bytes(config) -> int:
    """Bytes of one combine row of an ``EPConfig`` (its ``combine_payload`` and ``hidden``)."""
    return CombineLayout(getattr(config, "combine_payload", "bf16"), config.hidden).row_bytes
