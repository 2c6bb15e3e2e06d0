"""``EPBuffer``: expert-parallel dispatch (BF16 tokens -> masked per-expert NVFP4 / FP8 / BF16
layout on the expert's rank) and combine (expert outputs -> weighted top-k sum per token).

Flow of one dispatch (``T`` tokens, ``R`` ranks, ``E`` experts, ``El = E // R`` local):

1. layout from ``topk_ids`` (:func:`~fp4comm.ep.get_dispatch_layout`), then **one** small
   all-gather of ``[error code, id-range flag, per-rank counts, per-expert counts]`` so every
   rank knows every count (split sizes, ``max_m``, capacity) and every rank's input errors:
   bad input raises the same error on every rank, before any payload moves;
2. pack: each token is quantized once in registers and stored as one message row per
   destination rank (``fp4comm/ep/message.py``) through the backend's destination table;
3. transport (backend); 4. permute into the masked layout (deterministic order).

Combine sends one BF16 row per (token, rank) back and reduces on the source. The exact
rounding order is in :meth:`EPBuffer.combine` and ``fp4comm/reference/ep.py``.
"""

from __future__ import annotations

import functools
import importlib
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from .._checks import check_choice, check_positive_int, check_tensor
from .._launch import launch
from .._runtime import IMPLS, cdiv, next_pow2, round_up, use_triton
from ..formats import FP8_BLOCK, NVFP4_BLOCK, SCALE_LAYOUTS, FP8BlockTensor, NVFP4Tensor
from ..reference import ep as ref
from .backend import PLAN_ROWS, EPBackend, HostStager, RowTargets, TransferPlan, plan_array, pointer_table
from .layout import _layout, layout_meta, layout_scratch
from .message import COMBINE_PAYLOADS, PAYLOADS, CombineLayout, MessageLayout

#: backend name -> "module:Class" (imported on first use). One line per backend.
BACKENDS: dict[str, str] = {
    "torch": "fp4comm.ep.backend_torch:TorchBackend",
    "nvlink": "fp4comm.ep.backend_nvlink:NVLinkBackend",
}

#: masked-layout rows are a multiple of this (block-scaled GEMM tiles, 128x4 scale swizzle)
MAX_M_ALIGN = 128

#: kernel variants of the Triton path (identical results, bit for bit; read per call, the
#: same value on every rank). ``"v1"``: the H200-measured kernels. ``"v2"``: parallel layout
#: (``layout_meta(parallel=True)``: one program per token chunk instead of one program);
#: pack and combine store / load rows through pointers of visible 16-byte alignment (V1's
#: table-cast pointers give byte / 2-byte accesses, many small writes over NVLink) with
#: their per-rank tables and slot indices loaded in one round trip; permute with a
#: ``tl.histogram`` phase 1, block reads of the earlier histograms in phase 2, and
#: :data:`_PERMUTE_ROWS_V2` slots a copy program (whole rows in one load). ``"best"``
#: (default): per kernel, the variant the H200 measured faster (:data:`_BEST_V2`). Timed
#: side by side by ``benchmarks/profile_ep.py --variants symmem_defer,kernels_v2``.
KERNEL_VARIANTS = ("v1", "v2", "best")
KERNELS = "best"
#: kernels whose v2 the H200 measured faster (EP4, 4096 tok/rank, nvlink, GPU us per call,
#: v1 -> v2): layout 94 -> 29, pack 171 -> 135, permute (hist + index + copy) 183 -> 173,
#: combine_source 79 -> 65. The v2 expert-side combine is no faster over NVLink (636-682 ->
#: 667; with :data:`COMBINE_SPREAD` 471 -> 447, a tie) and slower into local memory (torch
#: backend: 195 -> 281), so it stays v1. The v2 permute has since become histogram + column
#: scan + one-step index programs with scales copied as words (one H200, the EP4 receiver's
#: 14.8k rows, swizzled scales: 3 + 6 + 22 + 76 us, was 3 + 70 + 100; the index step by
#: pairwise comparison instead of a one-hot scan: 22 -> 11.4 us).
_BEST_V2 = frozenset({"layout", "pack", "permute", "combine_source"})
#: the expert-side combine takes the source ranks in turn (program p -> source (p + rank) % R)
#: instead of received-row order, in which every rank stores to the same peer at a time.
#: EP4, 4x H200, 4096 tok/rank, BF16 wire: that kernel 736 -> 471 us GPU, combine wall 939 ->
#: 666 us (profile_ep, same run); the v2 kernel with this order: 447 us (a tie), so "best"
#: keeps v1
COMBINE_SPREAD = True


def _v2(kernel: str) -> bool:
    """Whether ``kernel`` (layout, pack, permute, combine_expert, combine_source) runs its v2."""
    check_choice("KERNELS", KERNELS, list(KERNEL_VARIANTS))
    return KERNELS == "v2" or (KERNELS == "best" and kernel in _BEST_V2)


def get_backend_class(name: str) -> type[EPBackend]:
    """The backend class registered as ``name``; ``ImportError`` (with the reason) if its
    module cannot be imported on this machine, ``ValueError`` if ``name`` is unknown."""
    check_choice("backend", name, list(BACKENDS))
    mod, _, cls = BACKENDS[name].partition(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"backend: {name!r} is not available here ({BACKENDS[name]}: {exc})") from exc


def available_backends() -> list[str]:
    """Registered backends whose module imports on this machine."""
    out = []
    for name in BACKENDS:
        try:
            get_backend_class(name)
            out.append(name)
        except ImportError:
            pass
    return out


# ----------------------------------------------------------------------------- config / handle
@dataclass(frozen=True)
class EPConfig:
    """Static configuration of an :class:`EPBuffer` (identical on every rank).

    Attributes:
        hidden: ``H``, a multiple of 16 (of 128 for ``payload="fp8"``).
        num_experts: ``E``, a multiple of the world size.
        num_topk: ``K``.
        max_tokens_per_rank: largest ``T`` a rank may dispatch.
        payload: ``"nvfp4"`` | ``"fp8"`` | ``"bf16"``, the wire and masked-layout format.
        scale_layout: nvfp4 scales in the masked layout, ``"swizzled"`` (128x4) or ``"linear"``.
        backend: key of :data:`BACKENDS`.
        max_m: ``None``: rows per expert derived per call (largest local count rounded up
            to 128, at least 128; shapes vary between calls). An int (multiple of 128):
            fixed rows per expert (static shapes, e.g. for CUDA graphs); a call routing more
            than ``max_m`` pairs to one expert raises on every rank.
        max_recv_tokens: receive capacity in message rows per rank (fixed buffers of the
            ``nvlink`` backend); default ``R * max_tokens_per_rank`` (never overflows).
        fp8_ue8m0: fp8 scales rounded up to powers of two.
        impl: ``"auto"`` | ``"triton"`` | ``"reference"`` (see ``fp4comm._runtime``).
        combine_payload: combine wire, ``"bf16"`` (default) | ``"fp8"`` | ``"nvfp4"``: each
            per-(token, rank) partial row is quantized per row on the expert side and
            dequantized to FP32 on the source before the sum (``fp4comm/reference/ep.py``).
        timeout_s: ``nvlink`` backend, GPU: seconds a flag wait spins before a silent peer
            raises ``TimeoutError`` (launchers may take it from the environment; the
            library never reads it there).
        host_sync: ``True`` (default): ``dispatch`` waits for the count exchange and checks
            every rank's counts before it returns (any error raises there, on every rank).
            ``False`` (``nvlink`` backend, an int ``max_m``, Triton kernels): ``dispatch``
            never waits for the device; the receive side reads the row count on the device,
            and the checks of the exchanged counts (another rank's bad input, ids out of
            range, receive or ``max_m`` overflow) run at this buffer's next ``combine`` or
            ``dispatch``, which raises the same error on every rank before it launches
            anything. The dispatch output of such a call is then invalid (no rows of a bad
            call are sent; ``masked_m`` may exceed ``max_m`` after a ``max_m`` overflow, which
            ``grouped_gemm_masked`` clamps). This rank's own bad input still raises in its
            ``dispatch``. ``DispatchOutput.num_recv_tokens`` waits for the counts when read.
    """

    hidden: int
    num_experts: int
    num_topk: int
    max_tokens_per_rank: int
    payload: str = "nvfp4"
    scale_layout: str = "swizzled"
    backend: str = "torch"
    max_m: int | None = None
    max_recv_tokens: int | None = None
    fp8_ue8m0: bool = False
    impl: str = "auto"
    combine_payload: str = "bf16"
    timeout_s: float = 60.0
    host_sync: bool = True

    def encode(self, world_size: int) -> list[int]:
        """Integers compared across ranks at construction (invalid values encode as -1)."""

        def code(v, choices):
            return choices.index(v) if v in choices else -1

        def num(v):
            return v if isinstance(v, int) and not isinstance(v, bool) else -1

        return [
            num(self.hidden),
            num(self.num_experts),
            num(self.num_topk),
            num(self.max_tokens_per_rank),
            code(self.payload, PAYLOADS),
            code(self.scale_layout, SCALE_LAYOUTS),
            code(self.backend, list(BACKENDS)),
            -2 if self.max_m is None else num(self.max_m),
            -2 if self.max_recv_tokens is None else num(self.max_recv_tokens),
            int(bool(self.fp8_ue8m0)),
            code(self.combine_payload, COMBINE_PAYLOADS),
            code(self.host_sync, [True, False]),
            world_size,
        ]

    ENCODED_NAMES = (
        "hidden",
        "num_experts",
        "num_topk",
        "max_tokens_per_rank",
        "payload",
        "scale_layout",
        "backend",
        "max_m",
        "max_recv_tokens",
        "fp8_ue8m0",
        "combine_payload",
        "host_sync",
        "group (world size)",
    )


_BUFFER_IDS = itertools.count(1)


@dataclass(frozen=True)
class EPHandle:
    """What :meth:`EPBuffer.combine` needs from the dispatch that produced it.

    Valid until the buffer's next ``dispatch`` or ``destroy`` (``generation`` is checked):
    ``slot_map`` is a view of a fixed buffer the next dispatch overwrites.

    Attributes:
        buffer_id, generation: identify the dispatch.
        plan: row counts between every pair of ranks, and their device offsets (``plan.vec``).
        num_tokens: ``T`` of this rank's dispatch.
        rank_offset: ``[T, R]`` int32, row of token ``t`` in the block sent to rank ``r``, -1 if not sent.
        slot_map: ``[N_recv, K]`` int32, ``e_local * max_m + slot`` of each received ``(row, k)``
            pair routed to a local expert, -1 otherwise (the map back).
        slot_weights: ``[El * max_m]`` float32, weight of each slot (the dispatch output's
            ``topk_weights``, flattened).
        max_m: rows per expert of the masked layout.
    """

    buffer_id: int
    generation: int
    plan_ref: TransferPlan | _DeferredPlan = field(repr=False)
    num_tokens: int
    rank_offset: torch.Tensor
    slot_map_all: torch.Tensor = field(repr=False)  # [>= N_recv, K]: rows past N_recv unused
    slot_weights: torch.Tensor
    max_m: int

    @property
    def plan(self) -> TransferPlan:
        """The dispatch's :class:`TransferPlan` (with ``host_sync=False``: waits for the
        count exchange and runs its checks, raising as the buffer's next call would)."""
        p = self.plan_ref
        return p.get() if isinstance(p, _DeferredPlan) else p

    @property
    def slot_map(self) -> torch.Tensor:
        return self.slot_map_all[: self.plan.num_recv]


class _DeferredPlan:
    """The plan of a ``host_sync=False`` dispatch: built from the exchanged counts by the
    buffer's resolver the first time it is asked for (at the latest by the next call)."""

    def __init__(self, resolve) -> None:
        self._resolve, self._plan, self.resolved = resolve, None, False

    def get(self) -> TransferPlan:
        if not self.resolved:  # still the buffer's pending dispatch
            self._resolve()
        if self._plan is None:
            raise RuntimeError("handle: its dispatch failed (the error was raised by an earlier call)")
        return self._plan


@dataclass
class DispatchOutput:
    """Result of :meth:`EPBuffer.dispatch` on the expert side (``El`` local experts).

    Attributes:
        x: masked layout ``[El, max_m, H/2]`` uint8 (nvfp4, two E2M1 codes a byte, even
            element low nibble), ``[El, max_m, H]`` float8_e4m3fn (fp8) or bfloat16 (bf16).
            Rows ``>= masked_m[e]`` are uninitialized.
        scales: nvfp4: ``[El, max_m, round_up(H/16, 4)]`` float8_e4m3fn in 128x4 swizzled order
            (``scale_layout="swizzled"``) or ``[El, max_m, H/16]`` (linear), padding zero;
            fp8: ``[El, max_m, H/128]`` float32 (decode direction, padding 0); bf16: None.
        global_scale: nvfp4: ``[El, max_m]`` float32 encode-direction ``gs`` of each row
            (padding rows 1); else None.
        masked_m: ``[El]`` int32 on the device, rows used per expert.
        topk_weights: ``[El, max_m]`` float32, the gate weight of each row's (token, expert)
            pair (padding 0).
        handle: :class:`EPHandle` for :meth:`EPBuffer.combine`.
        payload, scale_layout, hidden, ue8m0: formats of the above.
        num_recv_tokens: (property) message rows this rank received.
    """

    x: torch.Tensor
    scales: torch.Tensor | None
    global_scale: torch.Tensor | None
    masked_m: torch.Tensor
    topk_weights: torch.Tensor
    handle: EPHandle
    payload: str
    scale_layout: str
    hidden: int
    ue8m0: bool = False

    @property
    def max_m(self) -> int:
        return self.x.shape[1]

    @property
    def num_recv_tokens(self) -> int:
        """Message rows this rank received (one per (source token, this rank)); with
        ``host_sync=False`` reading it waits for the count exchange."""
        return self.handle.plan.num_recv

    @property
    def activations(self):
        """The masked layout as :class:`~fp4comm.formats.NVFP4Tensor` (shape
        ``[El, max_m, H]``, per-row global scale), :class:`~fp4comm.formats.FP8BlockTensor`,
        or the BF16 tensor: what ``grouped_gemm_masked(a, b, masked_m)`` takes."""
        El, M = self.x.shape[:2]
        if self.payload == "nvfp4":
            return NVFP4Tensor(
                data=self.x,
                scales=self.scales,
                global_scale=self.global_scale,
                scale_layout=self.scale_layout,
                shape=torch.Size((El, M, self.hidden)),
            )
        if self.payload == "fp8":
            return FP8BlockTensor(data=self.x, scales=self.scales, block=FP8_BLOCK, ue8m0=self.ue8m0)
        return self.x


# ----------------------------------------------------------------------------- errors
class _InputError:
    """An input error found on this rank, held until every rank has exchanged codes."""

    ARGS = ("x", "topk_ids", "topk_weights", "global_scale", "expert_out", "handle")

    def __init__(self, arg: str, exc: Exception) -> None:
        self.arg, self.exc = arg, exc

    @property
    def code(self) -> int:
        return 1 + self.ARGS.index(self.arg)


_DID_NOTHING = "dispatch did nothing"


def _raise_collective(codes: list[int], local: _InputError | None, rank: int, what: str, outcome: str = "") -> None:
    """Raise on every rank if any rank reported an error code (this rank's own error first).
    ``outcome``: what became of the call (default: ``{what} did nothing on any rank``)."""
    if local is not None:
        raise local.exc
    for r, c in enumerate(codes):
        if c:
            arg = _InputError.ARGS[c - 1]
            outcome = outcome or f"{what} did nothing on any rank"
            raise ValueError(f"{arg}: invalid on rank {r} (see that rank's error); {outcome}")


# ----------------------------------------------------------------------------- launch heuristics
def _row_warps(elems: int) -> int:
    """num_warps for kernels holding one row of ``elems`` FP32 values in registers: ~32 values
    a thread, so H=7168 (8192 padded) runs at 8 warps without spilling, tiny rows at 1."""
    return max(1, min(8, next_pow2(elems) // 1024))


# ----------------------------------------------------------------------------- local steps
# Host wrappers of the kernels in ``kernels/dispatch.py`` (Triton) with the plain-torch twin
# from ``fp4comm.reference.ep`` (``impl``). Every backend reuses them; they do no
# validation (EPBuffer validates) and never communicate.


def _targets(dests, device, kernel: str) -> RowTargets:
    """A list of destination tensors (free-function use) -> :class:`RowTargets` (a pointer
    table per call: the buffer passes cached tables instead) for ``kernel``."""
    if isinstance(dests, RowTargets):
        return dests
    if _v2(kernel) and any(d.data_ptr() % 16 for d in dests):  # V2 kernels address rows in 16-byte units
        raise ValueError("dests: every destination tensor must start 16-byte aligned")
    return RowTargets(list(dests), pointer_table(dests, device), torch.zeros(len(dests), dtype=torch.int64, device=device))


def pack_rows(
    msg: MessageLayout,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    rank_offset: torch.Tensor,
    dests: RowTargets | list[torch.Tensor],
    *,
    global_scale="per_token",
    ue8m0: bool = False,
    impl: str = "auto",
) -> None:
    """Quantize ``x`` once per token and store its message row into every destination.

    Args:
        msg: the row layout (payload, H, K).
        x: ``[T, H]`` bfloat16 contiguous; ``topk_ids`` ``[T, K]`` int32/int64;
            ``topk_weights`` ``[T, K]`` float32.
        rank_offset: ``[T, R]`` int32, row of token ``t`` in destination ``r``, -1 = not sent
            (:class:`~fp4comm.ep.DispatchLayout`).
        dests: :class:`~fp4comm.ep.backend.RowTargets` (token ``t`` goes to row
            ``row_base[r] + rank_offset[t, r]`` at ``table[r]``), or ``R`` uint8 tensors
            of ``msg.row_bytes`` rows (row ``rank_offset[t, r]`` of ``dests[r]``). Any memory
            the kernel can store to: a local send buffer or a peer's symmetric buffer.
        global_scale: nvfp4 ``gs``: ``"per_token"``, a float / 0-dim float32 tensor, or ``[T]``.
    """
    T, H = x.shape
    R = rank_offset.shape[1]
    dev = x.device
    if T == 0:
        return
    if not use_triton(dev, impl):
        views = dests.views if isinstance(dests, RowTargets) else dests
        rows = ref.pack_rows_ref(msg, x, topk_ids, topk_weights, rank_offset, global_scale, ue8m0)
        counts = (rank_offset >= 0).sum(0).tolist()
        for d, part in zip(views, rows.split(counts)):
            d.view(-1, msg.row_bytes)[: part.shape[0]].copy_(part)
        return

    t = _targets(dests, dev, "pack")
    gs_mode, gs, gs_value = 2, topk_weights, 1.0  # gs pointer unused unless GS_MODE 0 / 1
    if msg.payload == "nvfp4":
        if x.data_ptr() % 4:  # the kernel reads BF16 element pairs as 32-bit words
            x = x.clone()
        nb = next_pow2(H // NVFP4_BLOCK)
        elems = nb * NVFP4_BLOCK
        if isinstance(global_scale, torch.Tensor):
            gs_mode, gs = (1 if global_scale.dim() == 1 else 0), global_scale.float().contiguous()
        elif not isinstance(global_scale, str):
            gs_mode, gs_value = 3, float(global_scale)  # a kernel argument: no host->device copy
    elif msg.payload == "fp8":
        nb = next_pow2(H // FP8_BLOCK)
        elems = nb * FP8_BLOCK
    else:
        nb = elems = next_pow2(H)
    v2 = _v2("pack")
    if v2 and msg.payload == "nvfp4":
        nb = max(nb, 8)  # scale bytes go out as whole 8-byte words
    dp = t.device_plan
    if dp is not None and not v2:
        raise ValueError("dests: a device plan needs the v2 pack kernel (fp4comm.ep.buffer.KERNELS)")
    plan_args = (t.table, 0, 0, 0) if dp is None else (dp.meta, dp.width, dp.rank, dp.max_recv)
    launch(_kernels().ep_pack_kernel, (T,),
        x, topk_ids, topk_weights, gs, gs_value, rank_offset, t.table, t.row_base, R, H,
        msg.row_bytes, msg.scale_offset, msg.gs_offset, msg.ids_offset, msg.weights_offset, msg.src_offset,
        *plan_args, DEVICE_PLAN=dp is not None,
        K=msg.num_topk, KP=next_pow2(msg.num_topk), PAYLOAD=PAYLOADS.index(msg.payload),
        GS_MODE=gs_mode, UE8M0=ue8m0, NB=nb, num_warps=_row_warps(elems),
        **(dict(V2=True, RP=next_pow2(R), MW=next_pow2((msg.src_offset + 4 - msg.gs_offset) // 4),
                HC=H) if v2 else {}),
    )  # fmt: skip


@dataclass
class PermuteResult:
    """Output of :func:`permute_rows` (shapes: :class:`DispatchOutput`; ``slot_map`` ``[N, K]``
    int32 = ``e_local * max_m + slot`` or -1; ``masked_m`` ``[El]`` int32)."""

    x: torch.Tensor
    scales: torch.Tensor | None
    global_scale: torch.Tensor | None
    topk_weights: torch.Tensor
    masked_m: torch.Tensor
    slot_map: torch.Tensor


#: the permute-index phases hold a one-hot tile of ``SUB * KP * ELP`` int32 (sub-block rows x
#: padded top-k x padded local experts): 4096 values keeps it in registers at 4 warps
_ONEHOT_TILE = 4096
#: at most this many chunks: phase 2 sums the histograms of the chunks before its own, so
#: its cost grows with C; 128 ~ one program per SM on H100/H200
_MAX_CHUNKS = 128


#: v1: up to this many received rows the slot assignment is one program (one chunk: no
#: histogram launch); more rows spread over up to :data:`_MAX_CHUNKS` programs
_ONE_CHUNK_ROWS = 1024
#: v2: the same threshold, but a v2 chunk is one ``SUB``-row step, so by default only a
#: dispatch of at most ``SUB`` rows is one chunk; more rows are ``cdiv(N, SUB)`` chunks
#: (histogram, column scan, index: three short launches, every program one round trip).
#: H200, EP4 4096 tok/rank (14.8k rows, 32.6k pairs): v1-style 116 chunks of 8 steps took
#: 70 us in the index phase
_ONE_CHUNK_ROWS_V2 = 0
#: slots a program of the permute copy (multiple of nothing but a divisor of 128)
_PERMUTE_ROWS = 32


def _permute_index_params(N: int, K: int, El: int, v2: bool = False) -> tuple[int, int, int, int, int]:
    """``(KP, ELP, SUB, BLOCK_N, C)`` of the two-phase slot assignment (see
    :data:`_ONEHOT_TILE`, :data:`_MAX_CHUNKS`, :data:`_ONE_CHUNK_ROWS`,
    :data:`_ONE_CHUNK_ROWS_V2`): ``C`` chunks of ``BLOCK_N`` rows, scanned ``SUB`` rows at a time."""
    KP, ELP = next_pow2(K), max(2, next_pow2(El))
    SUB = max(1, min(64, _ONEHOT_TILE // (KP * ELP)))
    SUB = 1 << (SUB.bit_length() - 1)
    if N <= (max(_ONE_CHUNK_ROWS_V2, SUB) if v2 else _ONE_CHUNK_ROWS):
        return KP, ELP, SUB, round_up(max(N, 1), SUB), min(N, 1)
    block_n = SUB if v2 else max(SUB, next_pow2(cdiv(max(N, 1), _MAX_CHUNKS)))
    return KP, ELP, SUB, block_n, cdiv(N, block_n)


def permute_rows(
    msg: MessageLayout,
    rows: torch.Tensor,
    *,
    expert_base: int,
    num_local_experts: int,
    max_m: int,
    scale_layout: str = "swizzled",
    slot_map: torch.Tensor | None = None,
    impl: str = "auto",
    num_rows: torch.Tensor | None = None,
) -> PermuteResult:
    """Received message rows -> masked per-expert layout (see :class:`DispatchOutput`).

    Args:
        rows: ``[N, row_bytes]`` uint8, grouped by source rank (ascending), token order within.
        expert_base: global id of this rank's first expert; ``num_local_experts``: ``El``.
        max_m: rows per expert (multiple of 128).
        slot_map: optional ``[N, K]`` int32 output (a view of a fixed buffer); every entry
            is written.
        num_rows: optional 1-element int64 device tensor, the rows actually received
            (at most ``N``): then ``rows`` is the whole receive buffer (``N`` its capacity),
            the count is read on the device (no host sync) and only the first
            ``num_rows`` rows of ``slot_map`` are written.

    Each ``(row n, k)`` routed to a local expert takes the next slot of that expert in the
    order (n, k) ascending (two phases: per-chunk expert histograms, then each chunk's
    slots from the sum of the earlier chunks' histograms). Payload rows ``>= masked_m`` are
    left uninitialized by the Triton path (zero in the reference); scales are zero there,
    ``global_scale`` 1, weights 0.
    """
    El, K, dev = num_local_experts, msg.num_topk, rows.device
    N = rows.shape[0]
    if not use_triton(dev, impl):
        if num_rows is not None:  # the reference needs the count on the host
            n = int(num_rows.reshape(-1)[0])
            rows = rows[: min(n, N)]
            if slot_map is not None:
                slot_map = slot_map[: rows.shape[0]]
        ids = rows[:, msg.ids_offset : msg.ids_offset + 4 * K].contiguous().view(torch.int32)
        sm, masked_m = ref.permute_index_ref(ids, expert_base, El, max_m)
        lay = ref.permute_ref(msg, rows, sm, El, max_m, scale_layout)
        if slot_map is not None:
            slot_map.copy_(sm)
            sm = slot_map
        return PermuteResult(lay.x, lay.scales, lay.global_scale, lay.topk_weights, masked_m, sm)

    kd = _kernels()
    tuning = (_ONE_CHUNK_ROWS, _ONE_CHUNK_ROWS_V2, _MAX_CHUNKS, _PERMUTE_ROWS, _ONEHOT_TILE)  # module knobs (tests)
    pl = _permute_plan(msg, N, El, max_m, scale_layout, _v2("permute"), num_rows is not None, tuning)
    # every output but the payload is written in full by the kernels (padding included)
    x = torch.empty(El, max_m, pl.pcols, dtype=pl.pdtype, device=dev)
    scales = gs = None
    if msg.payload == "nvfp4":
        scales = torch.empty(El, max_m, pl.sf_cols, dtype=torch.uint8, device=dev)
        gs = torch.empty(El, max_m, dtype=torch.float32, device=dev)
    elif msg.payload == "fp8":
        scales = torch.empty(El, max_m, pl.ksf, dtype=torch.float32, device=dev)
    w = torch.empty(El, max_m, dtype=torch.float32, device=dev)
    if slot_map is None:
        slot_map = torch.empty(N, K, dtype=torch.int32, device=dev)
    masked_m = torch.empty(El, dtype=torch.int32, device=dev)
    # one int32 scratch: [C, ELP] chunk histograms, then [El * max_m] slot -> (n * K + k)
    scratch = torch.empty(pl.n_hist + El * max_m, dtype=torch.int32, device=dev)
    hist, slot_src = scratch[: pl.n_hist], scratch[pl.n_hist :]
    n_ptr = masked_m if num_rows is None else num_rows  # read only with N_DEV
    C, block_n, RB, IO = pl.C, pl.block_n, msg.row_bytes, msg.ids_offset
    if pl.hist_kw is not None:  # a single chunk starts every expert at 0: no histograms to sum
        launch(kd.ep_permute_hist_kernel, (C,), rows, hist, N, RB, IO, expert_base, El, block_n, n_ptr, **pl.hist_kw)
        if pl.scan_kw is not None:  # the chunk carries and masked_m: one program per expert column
            launch(kd.ep_permute_scan_kernel, (pl.ELP,), hist, masked_m, C, El, **pl.scan_kw)
    launch(kd.ep_permute_index_kernel, (C,),
        rows, hist, slot_map, slot_src, masked_m, N, RB, IO, expert_base, El, max_m, block_n, C, n_ptr, **pl.index_kw,
    )  # fmt: skip
    launch(kd.ep_permute_kernel, (pl.perm_grid,),
        rows, slot_src, masked_m, x.view(torch.uint8).view(torch.int32),
        w if scales is None else scales, w if gs is None else gs, w, RB, *pl.perm_args, **pl.perm_kw,
    )  # fmt: skip
    if msg.payload == "nvfp4":
        scales = scales.view(torch.float8_e4m3fn)
    return PermuteResult(x, scales, gs, w, masked_m, slot_map)


@dataclass(frozen=True)
class _PermutePlan:
    """Launch parameters of :func:`permute_rows` for one shape (see :func:`_permute_plan`)."""

    pdtype: torch.dtype
    pcols: int
    ksf: int
    sf_cols: int
    C: int
    ELP: int
    block_n: int
    n_hist: int
    hist_kw: dict | None
    scan_kw: dict | None
    index_kw: dict
    perm_grid: int
    perm_args: tuple
    perm_kw: dict


@functools.lru_cache(maxsize=256)
def _permute_plan(
    msg: MessageLayout, N: int, El: int, max_m: int, scale_layout: str, v2: bool, n_dev: bool, tuning: tuple
) -> _PermutePlan:
    """Everything :func:`permute_rows` derives from the shapes alone, computed once per shape
    (host time: a dispatch otherwise recomputes ~20 tile sizes per call). ``tuning``: the
    module's tile constants, part of the key (tests change them). The dicts are shared
    between calls and must not be modified."""
    K = msg.num_topk
    pdtype, pcols = {
        "nvfp4": (torch.uint8, msg.hidden // 2),
        "fp8": (torch.float8_e4m3fn, msg.hidden),
        "bf16": (torch.bfloat16, msg.hidden),
    }[msg.payload]
    ksf = msg.num_scales
    sf_cols = ksf
    if msg.payload == "nvfp4":
        sf_cols = round_up(ksf, 4) if scale_layout == "swizzled" else ksf
    KP, ELP, SUB, block_n, C = _permute_index_params(N, K, El, v2)
    C = max(C, 1)  # N = 0: one program still writes masked_m (zeros)
    common = dict(K=K, KP=KP, SUB=SUB, ELP=ELP)
    if n_dev:
        common["N_DEV"] = True
    hist_kw = scan_kw = None
    if C > 1:
        hb = min(_ONEHOT_TILE, next_pow2(block_n * KP))
        hist_kw = dict(**common, num_warps=4, **(dict(V2=True, HB=hb) if v2 else {}))
        if v2:  # one step up to 4096 chunks (H200, 1850 chunks: 16 experts a program in 8 steps took 14 us)
            scan_kw = dict(ELP=ELP, CB=_ONEHOT_TILE, num_warps=4)
    index_kw = dict(**common, num_warps=4, **(dict(V2=True, SCANNED=C > 1) if v2 else {}))
    words = msg.payload_bytes // 4
    sf_words = v2 and msg.payload == "nvfp4" and ksf % 4 == 0 and msg.scale_offset % 4 == 0 and msg.row_bytes % 4 == 0
    rows_per = _PERMUTE_ROWS
    if v2:  # whole rows a load: ROWS * pow2(words) <= the tile (a power of two, divides 128)
        rows_per = max(1, min(_PERMUTE_ROWS, _ONEHOT_TILE // next_pow2(words)))
    perm_args = (
        words, msg.scale_offset, msg.gs_offset, msg.weights_offset, max(ksf, 1), max(sf_cols, 1), max_m,
        max_m // 128, cdiv(max(ksf, 1), 4),
    )  # fmt: skip
    perm_kw = dict(
        K=K, PAYLOAD=PAYLOADS.index(msg.payload), SWIZZLE=scale_layout == "swizzled", ROWS=rows_per,
        BLOCK_W=min(_ONEHOT_TILE // rows_per, next_pow2(words)), SF_BLOCK=next_pow2(max(sf_cols, 1)),
        SF_WORDS=sf_words, QUAD=sf_words and scale_layout == "swizzled" and rows_per == 4, num_warps=4,
    )  # fmt: skip
    return _PermutePlan(pdtype, pcols, ksf, sf_cols, C, ELP, block_n, C * ELP, hist_kw, scan_kw, index_kw,
                        El * max_m // rows_per, perm_args, perm_kw)  # fmt: skip


@functools.cache
def _kernels():
    """``kernels.dispatch`` (imported on first use: ``import fp4comm`` does not import Triton)."""
    from ..kernels import dispatch

    return dispatch


#: bf16 combine wire: (columns a program, warps) of both combine kernels. EP4, 4x H200,
#: 4096 tok/rank: the expert-side kernel took 470 / 478 / 478 / 485 / 485 / 486 us GPU at
#: (1024, 4) / (512, 4) / (1024, 8) / (2048, 8) / (2048, 4) / (4096, 8)
COMBINE_BF16_TILE = (1024, 4)
#: fp8 / nvfp4 combine wires, source side: columns a program (whole scale blocks, 4 warps).
#: EP4 4x H200, 4096 tok/rank, GPU time of that kernel: one 8-warp program a whole row took
#: 515 us (nvfp4) / 140 us (fp8), 1024 columns 430 / 140 us, and with the faster nvfp4 decode
#: (``kernels.common.nvfp4_dequantize_codes``) 174 us for nvfp4 (bf16 wire: 67 us)
COMBINE_SOURCE_COLS = 1024


def _combine_launch(wire: str, H: int, source: bool = False) -> dict:
    """Tile of the combine kernels: the bf16 wire splits a row over programs of
    :data:`COMBINE_BF16_TILE` columns; fp8 / nvfp4 wires hold the whole row in one program
    on the expert side (the per-row scale needs its amax) and split it into programs of
    :data:`COMBINE_SOURCE_COLS` columns (whole scale blocks, 4 warps) on the ``source``
    side (the dequantization needs no whole-row value)."""
    lay = CombineLayout(wire, H)
    if wire == "bf16":
        cols, warps = COMBINE_BF16_TILE
        bh = min(cols, next_pow2(H))
        return dict(CPAYLOAD=2, BLOCK_H=bh, NB=1, CROW_BYTES=lay.row_bytes, CSCALE_OFF=lay.scale_offset,
                    num_warps=warps, _split=cdiv(H, bh))  # fmt: skip
    nb = next_pow2(max(H // NVFP4_BLOCK, 8)) if wire == "nvfp4" else next_pow2(H // FP8_BLOCK)
    warps, split = _row_warps(H), 1
    if source:
        bs = NVFP4_BLOCK if wire == "nvfp4" else FP8_BLOCK
        nb, warps = min(nb, max(8, COMBINE_SOURCE_COLS // bs)), 4
        split = cdiv(H // bs, nb)
    return dict(CPAYLOAD=0 if wire == "nvfp4" else 1, BLOCK_H=16, NB=nb, CROW_BYTES=lay.row_bytes,
                CSCALE_OFF=lay.scale_offset, num_warps=warps, _split=split)  # fmt: skip


def combine_expert(
    expert_out: torch.Tensor,
    slot_map: torch.Tensor,
    slot_weights: torch.Tensor,
    dests: RowTargets,
    recv_end: torch.Tensor,
    *,
    wire: str = "bf16",
    impl: str = "auto",
    spread: tuple[int, list[int]] | None = None,
) -> None:
    """Expert side of combine: one combine row per received row.

    Args:
        expert_out: ``[El, max_m, H]`` bfloat16 contiguous.
        slot_map: ``[N, K]`` int32 (:class:`PermuteResult`); ``slot_weights``: ``[El * max_m]`` float32.
        dests: per source rank ``s``: received row ``n`` goes to row ``n + dests.row_base[s]``
            at ``dests.table[s]`` (``views[s]``: the block of ``s``, rows from 0); rows of
            :class:`~fp4comm.ep.message.CombineLayout` ``(wire, H)``.
        recv_end: ``[R]`` int64, end (exclusive) of the received rows of each source.
        wire: ``"bf16"`` | ``"fp8"`` | ``"nvfp4"``.
        spread: ``(this rank, rows received from each source)``: programs take the sources
            in turn (:data:`COMBINE_SPREAD`), so peer stores use every rank's links at once.

    Row value: FP32 ``acc = acc + w_k * float(out[slot])`` over local ``k`` ascending, one BF16
    rounding (RNE), then (fp8 / nvfp4 wires) quantized per row; no FMA (bit-exact with
    :func:`~fp4comm.reference.ep.combine_expert_ref` + ``encode_combine_rows_ref``).
    """
    N = slot_map.shape[0]
    H = expert_out.shape[-1]
    if N == 0:
        return
    if not use_triton(expert_out.device, impl):
        part = ref.encode_combine_rows_ref(ref.combine_expert_ref(expert_out, slot_map, slot_weights), wire)
        for d, blk in zip(dests.views, part.split([v.shape[0] for v in dests.views])):
            d.view(torch.uint8).view(-1, part.shape[1])[: blk.shape[0]].copy_(blk)
        return

    kw = _combine_launch(wire, H)
    split = kw.pop("_split")
    R, K = dests.table.shape[0], slot_map.shape[1]
    if _v2("combine_expert"):
        kw.update(V2=True, RP=next_pow2(R), KP=next_pow2(K))
    grid = N
    if spread is not None and COMBINE_SPREAD and R > 1:  # interleave the sources (see the kernel)
        rank, counts = spread
        grid = R * max(counts)
        kw.update(SPREAD=True, ROT=rank)
    launch(_kernels().ep_combine_expert_kernel, (grid, split),
        expert_out, slot_map, slot_weights, dests.table, dests.row_base, recv_end, R,
        H=H, K=K, enable_fp_fusion=False, **kw,
    )  # fmt: skip


def combine_source(
    parts: RowTargets | list[torch.Tensor],
    rank_offset: torch.Tensor,
    hidden: int,
    *,
    wire: str = "bf16",
    impl: str = "auto",
) -> torch.Tensor:
    """Source side of combine: rows back from rank ``r`` (row ``i`` = the token sent to
    ``r`` as its ``i``-th row; :class:`RowTargets` or ``R`` tensors of rows), ``rank_offset``
    ``[T, R]`` int32 -> ``[T, H]`` bfloat16, FP32 sum over ranks ascending (fp8 / nvfp4 rows
    dequantized to FP32 first), one BF16 rounding; tokens sent nowhere get zeros."""
    T = rank_offset.shape[0]
    dev = rank_offset.device
    if not use_triton(dev, impl):
        views = parts.views if isinstance(parts, RowTargets) else parts
        rb = CombineLayout(wire, hidden).row_bytes
        views = [v if v.dtype == torch.bfloat16 else v.view(torch.uint8).view(-1, rb) for v in views]
        return ref.combine_source_ref(views, rank_offset, hidden, wire)

    t = _targets(parts, dev, "combine_source")
    y = torch.empty(T, hidden, dtype=torch.bfloat16, device=dev)
    if T:
        kw = _combine_launch(wire, hidden, source=True)
        split = kw.pop("_split")
        if _v2("combine_source"):
            kw.update(V2=True, RP=next_pow2(rank_offset.shape[1]))
        launch(_kernels().ep_combine_source_kernel, (T, split),
            t.table, t.row_base, rank_offset, y, rank_offset.shape[1], H=hidden, enable_fp_fusion=False, **kw,
        )  # fmt: skip
    return y


# ----------------------------------------------------------------------------- buffer
class EPBuffer:
    """Expert-parallel dispatch / combine over a process group.

    Args:
        group: ``torch.distributed`` process group (``None``: the default group).
        hidden, num_experts, num_topk, max_tokens_per_rank, payload, backend, scale_layout,
        max_m, max_recv_tokens, fp8_ue8m0, impl, combine_payload, timeout_s, host_sync: see
            :class:`EPConfig`.
        device: where tensors live; default ``cuda:<current>`` for NCCL groups, else CPU.

    Construction is collective: one small all-gather checks that every rank passed the
    same configuration and the same error is raised on every rank otherwise.
    Use as a context manager or call :meth:`destroy`.
    """

    def __init__(
        self,
        group=None,
        hidden: int = 0,
        num_experts: int = 0,
        num_topk: int = 0,
        max_tokens_per_rank: int = 0,
        payload: str = "nvfp4",
        backend: str = "torch",
        scale_layout: str = "swizzled",
        *,
        max_m: int | None = None,
        max_recv_tokens: int | None = None,
        fp8_ue8m0: bool = False,
        impl: str = "auto",
        device: torch.device | str | None = None,
        combine_payload: str = "bf16",
        timeout_s: float = 60.0,
        host_sync: bool = True,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("group: torch.distributed is not initialized (call init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)
        self.config = EPConfig(
            hidden, num_experts, num_topk, max_tokens_per_rank, payload, scale_layout, backend,
            max_m, max_recv_tokens, fp8_ue8m0, impl, combine_payload, timeout_s, host_sync,
        )  # fmt: skip
        self._check_config_across_ranks()
        self._validate_config()
        cfg = self.config
        self.num_local_experts = cfg.num_experts // self.num_ranks
        self.msg = MessageLayout(cfg.payload, cfg.hidden, cfg.num_topk)
        self.max_recv_tokens = cfg.max_recv_tokens or self.num_ranks * cfg.max_tokens_per_rank
        self.clayout = CombineLayout(cfg.combine_payload, cfg.hidden)
        self.backend: EPBackend | None = get_backend_class(cfg.backend)(group, self.device, cfg)
        self._id = next(_BUFFER_IDS)
        self._generation = 0
        self._handle: EPHandle | None = None  # latest dispatch (combine's transport plan)
        # host_sync=False: the latest dispatch's checks not run yet (_resolve_deferred)
        self._deferred: tuple[_DeferredPlan, bool] | None = None
        # fixed: the map back of the latest dispatch (handles hold views of it)
        self._slot_map = torch.empty(self.max_recv_tokens, cfg.num_topk, dtype=torch.int32, device=self.device)
        self.calls = {"dispatch": 0, "combine": 0}  # counters (tests, benchmarks)
        # per-call host work kept off the hot path: the layout kernel's output (the vector
        # the count all-gather sends) and the staging of the plan's device offsets
        self._triton = use_triton(self.device, cfg.impl)
        self._meta = torch.empty(2 + self.num_ranks + cfg.num_experts, dtype=torch.int64, device=self.device)
        self._plan_stager = HostStager((len(PLAN_ROWS), self.num_ranks), self.device)
        # the parallel layout kernel's accumulators (zero between launches: it clears them)
        self._layout_scratch = layout_scratch(cfg.max_tokens_per_rank, cfg.num_experts, self.num_ranks, self.device)

    # ---- construction checks
    def _check_config_across_ranks(self) -> None:
        mine = torch.tensor(self.config.encode(self.num_ranks), dtype=torch.int64, device=self.device)
        allv = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        dist.all_gather(allv, mine, group=self.group)
        allv = torch.stack(allv).cpu()
        for j, name in enumerate(EPConfig.ENCODED_NAMES):
            col = allv[:, j].tolist()
            if len(set(col)) > 1:
                raise ValueError(f"{name}: differs across ranks (rank -> value code: {col}); every rank must pass the same")

    def _validate_config(self) -> None:
        cfg = self.config
        check_positive_int("hidden", cfg.hidden, multiple_of=NVFP4_BLOCK)
        check_positive_int("num_experts", cfg.num_experts)
        check_positive_int("num_topk", cfg.num_topk)
        check_positive_int("max_tokens_per_rank", cfg.max_tokens_per_rank)
        check_choice("payload", cfg.payload, PAYLOADS)
        check_choice("scale_layout", cfg.scale_layout, SCALE_LAYOUTS)
        check_choice("backend", cfg.backend, list(BACKENDS))
        check_choice("impl", cfg.impl, IMPLS)
        check_choice("combine_payload", cfg.combine_payload, COMBINE_PAYLOADS)
        if isinstance(cfg.timeout_s, bool) or not isinstance(cfg.timeout_s, (int, float)) or not 0 < cfg.timeout_s <= 2000:
            raise ValueError(f"timeout_s: must be in (0, 2000] seconds, got {cfg.timeout_s!r}")
        if cfg.num_experts % self.num_ranks:
            raise ValueError(f"num_experts: must be a multiple of the world size {self.num_ranks}, got {cfg.num_experts}")
        if cfg.payload == "fp8" and cfg.hidden % FP8_BLOCK:
            raise ValueError(f"hidden: must be a multiple of {FP8_BLOCK} for payload='fp8', got {cfg.hidden}")
        if cfg.max_m is not None:
            check_positive_int("max_m", cfg.max_m, multiple_of=MAX_M_ALIGN)
        if cfg.max_recv_tokens is not None:
            check_positive_int("max_recv_tokens", cfg.max_recv_tokens)
        triton = use_triton(self.device, cfg.impl)  # raises for impl="triton" where it cannot run
        if not isinstance(cfg.host_sync, bool):
            raise TypeError(f"host_sync: expected a bool, got {type(cfg.host_sync).__name__}")
        if not cfg.host_sync:
            why = (
                "backend='nvlink'" if cfg.backend != "nvlink" else
                "an int max_m (the output shape cannot wait for the counts)" if cfg.max_m is None else
                "the Triton kernels (impl='auto' or 'triton')" if not triton else None
            )  # fmt: skip
            if why:
                raise ValueError(f"host_sync: False needs {why}")

    # ---- lifecycle
    def destroy(self) -> None:
        """Free the backend's resources; the buffer (and its handles) cannot be used after."""
        if self.backend is not None:
            self.backend.destroy()
            self.backend = None
        self._generation += 1
        self._handle = None
        self._deferred = None

    def __enter__(self) -> EPBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def _alive(self) -> EPBackend:
        if self.backend is None:
            raise RuntimeError("EPBuffer: used after destroy()")
        return self.backend

    # ---- dispatch
    def _validate_dispatch(self, x, topk_ids, topk_weights, global_scale) -> _InputError | None:
        checks = (
            ("x", lambda: self._check_x(x)),
            ("topk_ids", lambda: self._check_tk("topk_ids", topk_ids, x, (torch.int32, torch.int64))),
            ("topk_weights", lambda: self._check_tk("topk_weights", topk_weights, x, (torch.float32, torch.bfloat16, torch.float16))),
            ("global_scale", lambda: self._check_gs(global_scale, x)),
        )  # fmt: skip
        for arg, fn in checks:
            try:
                fn()
            except (TypeError, ValueError) as exc:
                return _InputError(arg, exc)
        return None

    def _check_x(self, x) -> None:
        cfg = self.config
        check_tensor("x", x, dtype=torch.bfloat16, shape=(None, cfg.hidden), device=self.device, contiguous=True)
        if x.shape[0] > cfg.max_tokens_per_rank:
            raise ValueError(f"x: {x.shape[0]} tokens exceed max_tokens_per_rank={cfg.max_tokens_per_rank}")

    def _check_tk(self, name, t, x, dtypes) -> None:
        check_tensor(name, t, dtype=dtypes, shape=(x.shape[0], self.config.num_topk), device=self.device)

    def _check_gs(self, gs, x) -> None:
        if isinstance(gs, str):
            check_choice("global_scale", gs, ["per_token"])
            return
        if self.config.payload != "nvfp4":
            raise ValueError(f"global_scale: only payload='nvfp4' takes a global scale, got {type(gs).__name__}")
        if isinstance(gs, torch.Tensor):
            check_tensor("global_scale", gs, dtype=torch.float32, device=self.device)
            if gs.dim() != 0 and tuple(gs.shape) != (x.shape[0],):
                raise ValueError(f"global_scale: expected a 0-dim tensor or shape [{x.shape[0]}], got {list(gs.shape)}")
            return
        if isinstance(gs, bool) or not isinstance(gs, (int, float)) or not (float(gs) > 0 and float(gs) < float("inf")):
            raise ValueError(f"global_scale: must be 'per_token', a positive finite float or a tensor, got {gs!r}")

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, global_scale="per_token") -> DispatchOutput:
        """Send each token to the ranks of its experts and lay it out per local expert.

        Args:
            x: ``[T, H]`` bfloat16, ``T <= max_tokens_per_rank``, contiguous.
            topk_ids: ``[T, K]`` int32/int64 global expert ids in ``[-1, E)``; -1 = not routed.
            topk_weights: ``[T, K]`` float32 (bf16/fp16 are converted), gate weights.
            global_scale: nvfp4 encode scale ``gs``: ``"per_token"`` (``2688 / amax`` of each
                token, default), a float or 0-dim float32 tensor (static, calibrated), or a
                ``[T]`` float32 tensor (per token, caller-given). Other payloads: ``"per_token"``.

        Returns:
            :class:`DispatchOutput`. Collective: every rank must call it (with ``T = 0`` if it
            has no tokens). Any bad input, on any rank, raises on every rank before data moves
            (the nvlink backend's device-side check stops its early send, see
            :class:`~fp4comm.ep.backend.DevicePlan`); a ``max_m`` overflow raises on every rank
            before anything is laid out (the nvlink rows may already sit in the peers' internal
            receive buffers then, which the next dispatch overwrites).
        """
        backend = self._alive()
        self._resolve_deferred()
        cfg, R, E = self.config, self.num_ranks, self.config.num_experts
        err = self._validate_dispatch(x, topk_ids, topk_weights, global_scale)
        ids = topk_ids.contiguous() if err is None else None
        if err is not None:
            meta = torch.zeros(2 + R + E, dtype=torch.int64, device=self.device)
            meta[0] = err.code
        elif self._triton:  # one kernel writes the exchanged vector and the offsets
            meta, rank_offset = layout_meta(ids, E, R, meta=self._meta, parallel=_v2("layout"), scratch=self._layout_scratch)
        else:
            lay = _layout(topk_ids, E, R)
            rank_offset = lay.rank_offset
            range_bad = ((topk_ids < -1) | (topk_ids >= E)).any().long().reshape(1)
            meta = torch.cat([
                torch.zeros(1, dtype=torch.int64, device=self.device), range_bad,
                lay.num_tokens_per_rank.long(), lay.num_tokens_per_expert.long(),
            ])  # fmt: skip
        weights = topk_weights.float().contiguous() if err is None else None
        impl = cfg.impl

        def pack(dests: RowTargets) -> None:
            pack_rows(
                self.msg, x, ids, weights, rank_offset, dests,
                global_scale=global_scale, ue8m0=cfg.fp8_ue8m0, impl=impl,
            )  # fmt: skip

        early = self._triton and _v2("pack") and backend.sends_with_meta
        if not cfg.host_sync:  # (_validate_config: nvlink, Triton, an int max_m)
            if not early:
                raise RuntimeError("host_sync: False needs the early send (backend_nvlink.SEND_WITH_META, v2 pack)")
            # nothing waits: rows go out behind the exchange, the permute reads the row count
            # on the device, the exchanged counts are checked by the next call
            backend.exchange_meta_and_send(meta, pack if err is None else None, wait=False)
            deferred = _DeferredPlan(self._resolve_deferred)
            self._deferred = (deferred, err is not None)
            self._generation += 1
            self._handle = None
            if err is not None:  # this rank's own input: raise now (its peers raise at their next call)
                raise err.exc
            recv, n_recv = backend.receive_capacity()
            return self._lay_out(backend, recv, cfg.max_m, deferred, x.shape[0], rank_offset, n_recv)
        if early:
            # rows go out right after the exchange (offsets computed on the device); the host
            # checks below overlap the send; the received rows come from received_rows
            allm = backend.exchange_meta_and_send(meta, pack if err is None else None).numpy()
        else:
            allm = backend.exchange_meta(meta).numpy()  # [R, 2 + R + E] on the host
        counts, max_m = self._check_exchanged(allm, err)
        if early:  # the plan's device rows were computed on the device (backend.plan_rows)
            vec = backend.plan_rows
        else:
            vec = self._plan_stager.put(plan_array(counts, self.rank))  # one async copy, fixed buffers
        plan = self._transfer_plan(counts, vec)

        self._generation += 1
        self._handle = None
        recv = backend.received_rows(plan) if early else backend.dispatch_rows(plan, pack)
        return self._lay_out(backend, recv, max_m, plan, x.shape[0], rank_offset)

    def _lay_out(self, backend, recv, max_m, plan, T, rank_offset, n_recv=None) -> DispatchOutput:
        """The permute of the received rows, the handle, the output (both dispatch paths)."""
        cfg, El = self.config, self.num_local_experts
        p = permute_rows(
            self.msg, recv, expert_base=self.rank * El, num_local_experts=El, max_m=max_m,
            scale_layout=cfg.scale_layout, slot_map=self._slot_map[: recv.shape[0]], impl=cfg.impl,
            num_rows=n_recv,
        )  # fmt: skip
        backend.check("dispatch")  # nvlink: the flag status, read once every kernel is queued (or deferred)
        handle = EPHandle(
            self._id, self._generation, plan, T, rank_offset, p.slot_map, p.topk_weights.reshape(-1), max_m,
        )  # fmt: skip
        self._handle = handle
        self.calls["dispatch"] += 1
        return DispatchOutput(
            x=p.x, scales=p.scales, global_scale=p.global_scale, masked_m=p.masked_m, topk_weights=p.topk_weights,
            handle=handle, payload=cfg.payload, scale_layout=cfg.scale_layout, hidden=cfg.hidden,
            ue8m0=cfg.fp8_ue8m0,
        )  # fmt: skip

    def _check_exchanged(self, allm: np.ndarray, err: _InputError | None, deferred: bool = False) -> tuple[np.ndarray, int]:
        """Host checks of the exchanged ``[R, 2 + R + E]`` vectors (identical on every rank, so
        every rank raises the same error): ``(counts [R, R], max_m)``. ``deferred``: the checks
        of a ``host_sync=False`` dispatch, run by a later call (the messages say what became
        of that dispatch: the early send stores no rows on a bad input or a receive overflow)."""
        cfg, R, E, El = self.config, self.num_ranks, self.config.num_experts, self.num_local_experts
        sent_none = "that dispatch sent no rows, its output is invalid" if deferred else _DID_NOTHING
        if allm[:, :2].any():
            if allm[:, 0].any():
                _raise_collective(allm[:, 0].tolist(), err, self.rank, "dispatch", sent_none if deferred else "")
            bad = np.flatnonzero(allm[:, 1]).tolist()
            raise ValueError(f"topk_ids: values outside [-1, {E}) on rank(s) {bad}; {sent_none}")
        counts = allm[:, 2 : 2 + R]
        recv_rows = counts.sum(0)
        if recv_rows.max() > self.max_recv_tokens:
            r = int(np.argmax(recv_rows))
            raise ValueError(
                f"max_recv_tokens: receive overflow, rank {r} would receive {int(recv_rows[r])} rows "
                f"> capacity {self.max_recv_tokens}; {sent_none}"
            )
        experts = allm[:, 2 + R :].sum(0)
        if cfg.max_m is not None:
            if experts.max() > cfg.max_m:
                e = int(np.argmax(experts))
                outcome = "that dispatch's output is invalid" if deferred else _DID_NOTHING
                raise ValueError(
                    f"max_m: receive overflow, expert {e} (rank {e // El}) would get {int(experts[e])} rows "
                    f"> max_m={cfg.max_m}; {outcome}"
                )
            return counts, cfg.max_m
        return counts, ref.round_max_m(experts[self.rank * El : (self.rank + 1) * El])

    def _resolve_deferred(self) -> None:
        """``host_sync=False``: wait for the latest dispatch's count exchange (long done when
        the caller ran anything in between) and run its checks, raising on every rank; on
        success its handle's plan is built. No-op when nothing is pending."""
        if self._deferred is None:
            return
        deferred, raised = self._deferred
        self._deferred = None
        deferred.resolved = True
        try:
            allm = self.backend.finish_exchange().numpy()
            if raised:  # this rank raised its own input error in that dispatch already
                return
            counts, _ = self._check_exchanged(allm, None, deferred=True)
        except Exception:
            self._handle = None
            raise
        deferred._plan = self._transfer_plan(counts, self.backend.plan_rows)

    def _transfer_plan(self, counts: np.ndarray, vec: torch.Tensor) -> TransferPlan:
        """The plan of exchanged ``counts`` ``[R, R]`` whose device rows are ``vec``."""
        return TransferPlan(self.rank, tuple(map(tuple, counts.tolist())), self.msg.row_bytes, self.config.hidden, vec)

    # ---- combine
    def _validate_combine(self, expert_out, handle) -> _InputError | None:
        if not isinstance(handle, EPHandle):
            return _InputError("handle", TypeError(f"handle: expected an EPHandle, got {type(handle).__name__}"))
        if handle.buffer_id != self._id:
            return _InputError("handle", ValueError("handle: comes from a different EPBuffer"))
        if handle.generation != self._generation:
            return _InputError(
                "handle",
                ValueError(
                    f"handle: stale (from dispatch #{handle.generation}, the buffer is at #{self._generation}); "
                    "a handle is valid until the next dispatch"
                ),
            )
        try:
            shape = (self.num_local_experts, handle.max_m, self.config.hidden)
            check_tensor("expert_out", expert_out, dtype=torch.bfloat16, shape=shape, device=self.device, contiguous=True)
        except (TypeError, ValueError) as exc:
            return _InputError("expert_out", exc)
        return None

    def combine(self, expert_out: torch.Tensor, handle: EPHandle) -> torch.Tensor:
        """Weighted sum of the expert outputs of each token, back on its source rank.

        Args:
            expert_out: ``[El, max_m, H]`` bfloat16, row ``m`` of expert ``e`` is the output for
                the dispatch output's row ``(e, m)``; rows ``>= masked_m[e]`` are ignored.
            handle: ``DispatchOutput.handle`` of this buffer's latest dispatch.

        Returns:
            ``[T, H]`` bfloat16: ``y_t = sum_k w_k * expert_out[slot(t, k)]`` with ``w_k`` the
            dispatched ``topk_weights``; tokens whose ids are all -1 get zeros.

        Rounding order (bit-exact with ``fp4comm.reference.ep``): on the expert's rank, per
        received row, FP32 ``acc = acc + w_k * float(out)`` over its local ``k`` ascending
        (product and sum rounded separately, no FMA), rounded once to BF16 (and, for
        ``combine_payload`` fp8 / nvfp4, quantized per row) and sent (one row per (token,
        rank)); on the source, FP32 ``acc = acc + float(partial_r)`` over ranks ascending
        (quantized rows dequantized to FP32 first), rounded once to BF16. So with the bf16
        wire the result differs from an all-FP32 sum by at most the BF16 roundings of the
        per-rank partials and of the total.

        Collective; one data exchange, no other collective. A bad argument on any rank raises
        on every rank: the bad rank sends its error code in place of its rows (transport
        sized by this buffer's latest dispatch, which every rank agrees on), so no rank
        hangs and no output is returned. One host sync, after every kernel is queued (the
        codes; the nvlink backend's timeout status with them).
        """
        backend = self._alive()
        self._resolve_deferred()  # host_sync=False: the dispatch's checks (raise on every rank)
        err = self._validate_combine(expert_out, handle)
        cur = self._handle
        if cur is None:  # no dispatch on this buffer: no rank can hold a valid handle
            raise (err.exc if err is not None else RuntimeError("combine: no dispatch on this buffer"))
        code = 0 if err is None else err.code
        plan, impl, wire = cur.plan, self.config.impl, self.config.combine_payload

        def reduce(dests: RowTargets) -> None:
            combine_expert(
                expert_out, cur.slot_map, cur.slot_weights, dests, plan.row("recv_end"), wire=wire, impl=impl,
                spread=(self.rank, plan.recv_counts),
            )  # fmt: skip

        parts = backend.combine_rows(plan, reduce, self.clayout.row_bytes, code)
        y = combine_source(parts, cur.rank_offset, self.config.hidden, wire=wire, impl=impl)
        codes = backend.check("combine")
        _raise_collective(codes, err, self.rank, "combine")
        self.calls["combine"] += 1
        return y
