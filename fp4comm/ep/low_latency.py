"""Low-latency (decode) dispatch and combine: no host sync, fixed buffers, CUDA-graph capturable.

.. code-block:: python

    ll = LowLatencyBuffer(cfg, mem=symmem)          # backend="nvlink" (default)
    out = ll.dispatch(x, topk_ids, topk_weights)     # x BF16 [T, H], T <= max_tokens_per_rank
    y = ll.combine(expert_out, out.handle)           # expert_out BF16 [E_local, max_m, H] -> [T, H]

    # overlap: send now, receive later (``hook()`` launches the receive half)
    out, hook = ll.dispatch(x, topk_ids, topk_weights, async_finish=True)
    ...; hook()                                      # out's tensors are valid after this

How it works (``kernels/nvlink.py``): the send kernel quantizes each token once and stores
one message row per ``(token, destination rank)`` straight into the row region
``[buffer parity, source rank, position]`` of each rank owning one of its experts, and
per ``(token, k)`` a 4-byte index entry (that row, ``k``) into the entry region
``[buffer parity, local expert, source rank, position]`` of the expert's owner; the last
program publishes one flag ``(seq << 32) | (T << 16) | count`` per (expert, source). The
receive kernel waits for its experts' flags (acquire, bounded spin) and copies the rows the
entries name into the masked layout ``[E_local, max_m, ...]`` ordered by (source rank,
source token), so the result is deterministic. ``masked_m`` stays on the device. Rows per
(token, rank) rather than per (token, expert): at EP4, top-8 of 256 experts, about 2.7
rows a token cross NVLink instead of 6.
Combine reduces on the expert side first: one partial row per (source token, expert rank),
the weighted sum of the token's local experts (FP32, ``k`` ascending), into row ``rank *
T_max + t`` of the source's buffer; the source adds the partials of its ranks (FP32, ranks
ascending). That is the high-throughput combine's rounding order, and a row per (token,
rank) on the wire, not per (token, expert), as for the dispatch.

Sequence numbers live in a device tensor (the send kernel reads "last finished + 1", the
receive kernel advances it), so a captured graph replays correctly, flags never need
resetting, and the two slot buffers alternate by the parity of the sequence number.

Backends:
* ``"nvlink"``: symmetric memory (:mod:`fp4comm.ep.symmem`: NVSHMEM on GPUs, an emulated
  world on CPU).
* ``"torch"``: the same kernels write into local staging buffers that two fixed-size
  ``all_to_all_single`` calls move (rows, then flags); no host sync, works on any
  process group whose device Triton can run on (CUDA, or CPU under ``TRITON_INTERPRET=1``).
  Moves ``R * E_local * max_tokens_per_rank`` rows a call whatever the routing: a
  fallback, not a fast path.

Errors: kernels never hang. A peer whose flag does not arrive in time (``timeout_s``
seconds of ``%globaltimer`` on GPUs; ``timeout_spins`` reads under the interpreter)
leaves a status code; :meth:`LowLatencyBuffer.check` (a host sync) raises
``TimeoutError`` naming the peer, or ``ValueError`` for a top-k id outside ``[-1, E)``
(skipped by the kernels) or an overflowing slot region (duplicate ids in one token beyond
``max_tokens_per_rank``). With ``sync_check=True`` (the default on CPU) every receive half
calls it; on GPUs call it yourself after a step (or a graph replay) to keep the hot path
free of host syncs.

Compilation: every kernel variant a buffer can launch is compiled when the buffer is
built (collective), then the ranks meet in one barrier; integer arguments that vary per
call (token counts, grid sizes) are not specialized. So no rank spins on a flag while a
peer is still compiling its send kernel (the first GPU run timed out exactly so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._checks import check_choice, check_positive_int, check_tensor
from .._launch import launch
from .._runtime import cdiv, next_pow2, round_up
from .message import MessageLayout
from .symmem import SymmetricMemory

__all__ = [
    "LowLatencyConfig",
    "LowLatencyHandle",
    "LowLatencyDispatchOutput",
    "LowLatencyBuffer",
]

PAYLOAD_CODE = {"nvfp4": 0, "fp8": 1, "bf16": 2}
BACKENDS = ("nvlink", "torch")
DEFAULT_TIMEOUT_S = 60.0  # GPU: a peer silent this long is reported (TimeoutError)
DEFAULT_TIMEOUT_SPINS = 1 << 24  # interpreter on a live multi-process group
EMULATED_TIMEOUT_SPINS = 2  # emulation runs every send before any receive
_INT32_MAX = (1 << 31) - 1
#: dispatch receive variants of :class:`LowLatencyConfig` (``variant``); equal results,
#: different speed; the send and the combine are the same kernels, and both receives run the
#: same grid (:func:`_recv_launch`). ``v1`` (default): every flag first, then one pass over the
#: rows of all sources; ``v2``: each source's rows copied as soon as its flag is in. EP4 4x
#: H200, H = 7168, top-8, 256 experts, NVFP4, CUDA-graph replays, dispatch v1 / v2 (us, two
#: runs): 1 tok 17.5-18.4 / 18.5-18.6, 32 tok 19.8 / 23.7, 128 tok 25.9-26.0 / 29.9-30.1,
#: 256 tok 35.6-35.7 / 39.3-39.7, 512 tok 50.7-50.8 / 53.2-53.4 (v2 was the default while v1
#: copied one row at a time, per source).
VARIANTS = ("v1", "v2")
#: most ranks of a low-latency buffer: the dispatch send tracks the ranks a token reaches as
#: one 64-bit mask
MAX_RANKS = 64
#: largest ``max_tokens_per_rank``: dispatch flags carry token and row counts in 16 bits each
MAX_TOKENS_LIMIT = (1 << 16) - 1


@dataclass(frozen=True)
class _RecvLaunch:
    """Launch shape of the dispatch receive kernel, both variants (:func:`_recv_launch`)."""

    progs_per_sm: int  # grid cap of the copy kernels: programs of `warps` warps an SM
    warps: int
    split_max: int  # programs per local expert of the receive, at most
    recv_words: int  # payload words (int64, padded) a receive program copies at once


def _recv_launch() -> _RecvLaunch:
    """Heuristics of the receive grid (both variants since session 13; first built for
    ``v2``), with the reasons.

    * Launching the receive with programmatic dependent launch (``griddepcontrol``: the
      send lets it launch once every send program started, the receive waits for the send
      grid) was slower: EP4 4x H200, CUDA graph, 128 / 512 tok, v1 26.0 -> 27.2-27.5 /
      51.5-51.7 -> 52.9-53.1 us, v2 30 -> 45 / 53 -> 67 us (its programs sit on SM slots).
    * The receive copy is latency bound: one row (4 KB NVFP4, 14 KB BF16) in flight per
      program of the old v1, 192 programs. This keeps several rows' loads in flight per program
      (``recv_words``: 4 NVFP4 rows, 2 FP8 rows, 1 BF16 row a step) and runs 4 programs of
      4 warps an SM: 16 warps, co-resident while a thread holds <= 128 registers (sm_90
      ptxas at H = 7168: 56 / 64 registers, no spills), so the grid never exceeds what the
      GPU runs at once (the receive programs spin on flags).
    """
    return _RecvLaunch(progs_per_sm=4, warps=4, split_max=16, recv_words=2048)


#: dispatch send: ids a step (``CHUNK // KP`` tokens) of the scan that gives each ``(t, k)``
#: its entry position and each (token, rank) its row. Swept with the per-(token, expert)
#: rows of session 11 (EP2 2x H200, v2, CUDA graph, dispatch at 1 / 128 / 512 tok, us): 256:
#: 24.0-25.0 / 26.5-26.6 / 56.7-56.9; 512: 16.2 / 26.5 / 56.4; 1024: 16.3 / 27.5 / 56.5; not
#: swept again for the per-(token, rank) rows
SEND_SCAN_CHUNK = 512
#: dispatch send: register cap (ptxas ``.maxnreg``) so that 2 programs of 8 warps fit an SM;
#: uncapped, ptxas takes 161 / 170 registers for the nvfp4 / fp8 payloads at H = 7168 (sm_90,
#: no spills either way; capped: 127 / 128, no spills)
SEND_MAXNREG = 128
#: combine: bf16-wire work items of this many hidden elements (4 an item row at H = 7168,
#: 32 bytes a thread a row at 4 warps, 126 registers); fp8 / nvfp4 wires take whole rows.
#: EP2 2x H200, CUDA graph, combine at 128 / 512 tok: 1024: 24.7 / 61.5 us; 2048: 23.9 / 58.4
COMBINE_CHUNK = 2048
#: combine grids: warps an SM (4 programs of 4 warps on the bf16 wire, 2 of 8 on the
#: quantized wires), so the receive half's grid, which spins on flags, is co-resident while
#: a thread holds <= 128 registers (sm_90 ptxas, H = 7168: 32 / 80 / 126 on the bf16 / fp8 /
#: nvfp4 wires; 4 programs of 8 warps an SM, as before this, left a third / half waiting)
COMBINE_WARPS_PER_SM = 16


@dataclass(frozen=True)
class LowLatencyConfig:
    """Sizes of a :class:`LowLatencyBuffer` (fixed for its lifetime).

    Attributes:
        hidden: ``H`` (multiple of 16; of 128 for ``fp8``).
        num_experts: ``E`` (multiple of the number of ranks).
        num_topk: ``K``.
        max_tokens_per_rank: ``T_max``, at most 512 is the intended range.
        payload: dispatch wire format ``"nvfp4" | "fp8" | "bf16"``.
        scale_layout: ``"linear"`` or ``"swizzled"`` (128x4, nvfp4 only) for the output scales.
        combine_payload: combine wire format ``"bf16"`` (exact) or ``"fp8"`` / ``"nvfp4"``
            (quantized per row on the expert side, dequantized and reduced on the source side).
        timeout_s: GPU: seconds a receive half waits for a peer before it gives up and
            :meth:`LowLatencyBuffer.check` raises ``TimeoutError`` (``None``: 60).
        timeout_spins: interpreter (CPU): flag reads before a wait gives up (``None``: a
            default by device).
        variant: dispatch receive variant, the same bits either way (see :data:`VARIANTS`):
            ``"v1"`` (default: all flags first, then one pass over every source's rows) or
            ``"v2"`` (each source's rows copied as soon as its flag is in); both keep several
            rows in flight per 4-warp program (:func:`_recv_launch`).
    """

    hidden: int
    num_experts: int
    num_topk: int
    max_tokens_per_rank: int
    payload: str = "nvfp4"
    scale_layout: str = "linear"
    combine_payload: str = "bf16"
    timeout_spins: int | None = None
    timeout_s: float | None = None
    variant: str = "v1"

    def __post_init__(self) -> None:
        check_positive_int("hidden", self.hidden, multiple_of=16)
        check_positive_int("num_experts", self.num_experts)
        check_positive_int("num_topk", self.num_topk)
        if self.num_topk > 256:  # index entries carry k in 8 bits
            raise ValueError(f"num_topk: at most 256 (low-latency mode), got {self.num_topk}")
        check_positive_int("max_tokens_per_rank", self.max_tokens_per_rank)
        check_choice("payload", self.payload, tuple(PAYLOAD_CODE))
        check_choice("combine_payload", self.combine_payload, tuple(PAYLOAD_CODE))
        check_choice("scale_layout", self.scale_layout, ("linear", "swizzled"))
        check_choice("variant", self.variant, VARIANTS)
        if self.scale_layout == "swizzled" and self.payload != "nvfp4":
            raise ValueError(f"scale_layout: 'swizzled' needs payload='nvfp4', got payload={self.payload!r}")
        if self.max_tokens_per_rank > MAX_TOKENS_LIMIT:  # counts travel in 16-bit flag fields
            raise ValueError(
                f"max_tokens_per_rank: at most {MAX_TOKENS_LIMIT} (low-latency mode), got {self.max_tokens_per_rank}"
            )
        if self.timeout_s is not None and not (0 < float(self.timeout_s) <= 2000):
            raise ValueError(f"timeout_s: must be in (0, 2000] seconds, got {self.timeout_s!r}")
        if "fp8" in (self.payload, self.combine_payload) and self.hidden % 128:
            raise ValueError(f"hidden: must be a multiple of 128 for an fp8 wire format, got {self.hidden}")


@dataclass
class LowLatencyHandle:
    """What :meth:`LowLatencyBuffer.combine` needs from the dispatch that produced it.

    Attributes:
        src_rank: ``[E_local, max_m]`` int32, source rank of each received row.
        src_slot: ``[E_local, max_m]`` int32, ``t * K + k`` of the row on its source.
        masked_m: ``[E_local]`` int32 (device), valid rows per local expert.
        row_weights: ``[E_local, max_m]`` float32, the routing weight of each row (the
            dispatch output's ``topk_weights``; combine applies them on this side).
        token_rows: ``[R * T_max * K]`` int64 token map: entry ``s * T_max * K + t * K + k`` is
            ``(sequence << 32) | (e * max_m + m)`` when the pair ``(t, k)`` of source ``s``
            was laid out at row ``m`` of local expert ``e`` by the dispatch of that sequence
            number (entries of older dispatches are ignored).
        source_tokens: ``[R]`` int32, tokens each source dispatched.
        topk_ids: ``[T, K]`` int32, this rank's routing of the dispatch (source side: combine
            adds the partials of the ranks these ids point to).
        call: index of the dispatch on this buffer (a stale handle is refused).
    """

    src_rank: torch.Tensor
    src_slot: torch.Tensor
    masked_m: torch.Tensor
    row_weights: torch.Tensor
    token_rows: torch.Tensor
    source_tokens: torch.Tensor
    topk_ids: torch.Tensor
    call: int


@dataclass
class LowLatencyDispatchOutput:
    """Masked per-expert layout on the receiving rank (``max_m = R * T_max``, rounded up to
    128 for swizzled scales).

    Fixed double buffers: the tensors belong to the buffer (two sets, alternating call by
    call), so a captured CUDA graph replays into the same memory and no call allocates.
    An output is valid until the dispatch after next. Rows ``>= masked_m[e]`` (payload,
    scales, including the swizzled 128-row padding, global scales, weights) are zero until
    a call of the same parity wrote rows there, then hold that call's stale rows: consumers
    must honour ``masked_m`` (the masked grouped GEMM does; a GEMM reading whole 128-row
    tiles only produces garbage in rows it must ignore anyway).

    Attributes:
        x: ``[E_local, max_m, H/2]`` uint8 (nvfp4), ``[E_local, max_m, H]`` float8_e4m3fn (fp8)
            or bfloat16 (bf16).
        scales: nvfp4: float8_e4m3fn ``[E_local, max_m, H/16]`` (linear) or
            ``[E_local, max_m, round_up(H/16, 4)]`` in 128x4 order (swizzled); fp8: float32
            ``[E_local, max_m, H/128]``; bf16: ``None``.
        global_scale: ``[E_local, max_m]`` float32 encode scales (nvfp4) or ``None``.
        masked_m: ``[E_local]`` int32 on the device.
        topk_weights: ``[E_local, max_m]`` float32, the routing weight of each row.
        handle: :class:`LowLatencyHandle` for combine.
    """

    x: torch.Tensor
    scales: torch.Tensor | None
    global_scale: torch.Tensor | None
    masked_m: torch.Tensor
    topk_weights: torch.Tensor
    handle: LowLatencyHandle


@dataclass
class _Geometry:
    """Strides (in index entries / flag words / message rows) the kernels index with, for one
    direction."""

    slot_b: int
    slot_e: int
    slot_s: int
    flag_b: int
    flag_e: int
    flag_s: int
    src_slot: int
    row_b: int = 0  # message rows (one per (token, rank)): buffer, source strides
    row_s: int = 0


class LowLatencyBuffer:
    """Fixed buffers + kernels for low-latency dispatch/combine on one rank.

    Args:
        config: :class:`LowLatencyConfig`.
        mem: symmetric memory of this rank (``backend="nvlink"``); an
            :class:`~fp4comm.ep.symmem.EmulatedMemory` on CPU.
        group: ``torch.distributed`` group (``backend="torch"``; with ``"nvlink"`` and no
            ``mem``, NVSHMEM is initialised over it).
        backend: ``"nvlink"`` or ``"torch"``.
        device: device of the torch backend's tensors (default: the current CUDA device, or
            CPU when CUDA is absent).
        sync_check: call :meth:`check` after every receive half (a host sync).
    """

    def __init__(
        self,
        config: LowLatencyConfig,
        *,
        mem: SymmetricMemory | None = None,
        group=None,
        backend: str = "nvlink",
        device: torch.device | None = None,
        sync_check: bool | None = None,
    ) -> None:
        check_choice("backend", backend, BACKENDS)
        self.config = cfg = config
        self.backend = backend
        if backend == "nvlink":
            if mem is None:
                from .symmem import init_nvshmem

                mem = init_nvshmem(group)
            self.mem = mem
            self.rank, self.world_size, self.device = mem.rank, mem.world_size, mem.device
            self._num_sms = mem.num_sms()
        else:
            import torch.distributed as dist

            self.mem = None
            self.group = group
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
            if device is None:
                device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
                device = device or torch.device("cpu")
            self.device = device
            self._num_sms = (
                torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
            )
        if self.device.type == "cpu":
            from .._runtime import triton_interpreting

            if not triton_interpreting():
                raise ValueError("device: the low-latency kernels need CUDA, or TRITON_INTERPRET=1 on CPU")
        R = self.world_size
        if R > MAX_RANKS:
            raise ValueError(f"world size: at most {MAX_RANKS} ranks in the low-latency mode, got {R}")
        if cfg.num_experts % R:
            raise ValueError(f"num_experts: must be a multiple of the number of ranks {R}, got {cfg.num_experts}")
        self.num_local_experts = EL = cfg.num_experts // R
        self.sync_check = (self.device.type == "cpu") if sync_check is None else sync_check
        spins = cfg.timeout_spins
        if spins is None:
            spins = EMULATED_TIMEOUT_SPINS if self.device.type == "cpu" else DEFAULT_TIMEOUT_SPINS
        self.timeout_spins = min(int(spins), _INT32_MAX)
        self.timeout_s = DEFAULT_TIMEOUT_S if cfg.timeout_s is None else float(cfg.timeout_s)
        self._timeout_us = min(int(self.timeout_s * 1e6), _INT32_MAX)
        self._gpu = self.device.type == "cuda"

        H, K, TMAX = cfg.hidden, cfg.num_topk, cfg.max_tokens_per_rank
        self.layout = MessageLayout(cfg.payload, H, K)
        self.clayout = MessageLayout(cfg.combine_payload, H, 1)
        self.crow_bytes = self.clayout.meta_offset + (16 if cfg.combine_payload == "nvfp4" else 0)
        self.max_m = R * TMAX
        if cfg.scale_layout == "swizzled":
            self.max_m = round_up(self.max_m, 128)
        RB, CRB = self.layout.row_bytes, self.crow_bytes
        dev = self.device
        i64 = torch.int64
        if backend == "nvlink":
            nbuf = 2
            self._slots = mem.alloc((nbuf * R * TMAX * RB // 8,), i64)
            self._sidx = mem.alloc((nbuf * EL * R * TMAX,), torch.int32)
            self._dflags = mem.alloc((nbuf * EL * R,), i64)
            self._crows = mem.alloc((nbuf * R * TMAX * CRB // 8,), i64)
            self._cflags = mem.alloc((nbuf * R,), i64)
            geo = _Geometry(EL * R * TMAX, R * TMAX, TMAX, EL * R, R, 1, self.rank, R * TMAX, TMAX)
            self._dsend = self._drecv = geo
            self._dsend_tables = (self._slots.peer_ptrs, self._sidx.peer_ptrs, self._dflags.peer_ptrs)
            self._drecv_bufs = (self._slots.local, self._sidx.local, self._dflags.local)
            self._csend_tables = (self._crows.peer_ptrs, self._cflags.peer_ptrs)
            self._crecv_bufs = (self._crows.local, self._cflags.local)
            self._cgeo = dict(cb=R * TMAX, cs=TMAX, cflag_b=R, cflag_s=1)
        else:
            nbuf = 1
            self._stage = {
                "dsend": torch.zeros(R, TMAX * RB // 8, dtype=i64, device=dev),
                "drecv": torch.zeros(R, TMAX * RB // 8, dtype=i64, device=dev),
                "disend": torch.zeros(R, EL * TMAX, dtype=torch.int32, device=dev),
                "direcv": torch.zeros(R, EL * TMAX, dtype=torch.int32, device=dev),
                "dfsend": torch.zeros(R, EL, dtype=i64, device=dev),
                "dfrecv": torch.zeros(R, EL, dtype=i64, device=dev),
                "csend": torch.zeros(R, TMAX * CRB // 8, dtype=i64, device=dev),
                "crecv": torch.zeros(R, TMAX * CRB // 8, dtype=i64, device=dev),
                "cfsend": torch.zeros(R, 1, dtype=i64, device=dev),
                "cfrecv": torch.zeros(R, 1, dtype=i64, device=dev),
            }
            st = self._stage

            def table(t: torch.Tensor) -> torch.Tensor:
                return torch.tensor([t[r].data_ptr() for r in range(R)], dtype=i64, device=dev)

            self._dsend = _Geometry(0, TMAX, 0, 0, 1, 0, 0, 0, 0)
            self._drecv = _Geometry(0, TMAX, EL * TMAX, 0, 1, EL, 0, 0, TMAX)
            self._dsend_tables = (table(st["dsend"]), table(st["disend"]), table(st["dfsend"]))
            self._drecv_bufs = (st["drecv"], st["direcv"], st["dfrecv"])
            self._csend_tables = (table(st["csend"]), table(st["cfsend"]))
            self._crecv_bufs = (st["crecv"], st["cfrecv"])
            self._cgeo = dict(cb=0, cs=TMAX, cflag_b=0, cflag_s=1, send_cs=0, send_flag_s=0)
        self.nbuf = nbuf
        # device-side state: sequence numbers, arrival counters, status codes
        self._epoch = torch.zeros(4, dtype=i64, device=dev)
        self._sink = torch.zeros(2, dtype=i64, device=dev)  # masked-off flag stores (GPU)
        self._counter = torch.zeros(2, dtype=torch.int32, device=dev)
        # dispatch send: pairs routed to each global expert this call (counted by every
        # program, read and reset by the last)
        self._hist = torch.zeros(next_pow2(cfg.num_experts + 1), dtype=torch.int32, device=dev)
        self._rlaunch = _recv_launch()  # the receive grid of both variants
        self._status = torch.zeros(4, dtype=torch.int32, device=dev)
        self._dummy = torch.zeros(16, dtype=torch.float32, device=dev)
        self._calls = 0
        self._phase = "idle"  # idle -> dispatch_sent -> dispatched -> combine_sent -> idle
        self._destroyed = False
        if self._gpu:
            self._compile_all()

    # ------------------------------------------------------------------ helpers
    def _nb(self, payload: str) -> int:
        H = self.config.hidden
        if payload == "nvfp4":
            return next_pow2(max(H // 16, 8))
        if payload == "fp8":
            return next_pow2(H // 128)
        return next_pow2(H // 16)

    def _warps(self) -> int:
        return 8 if self.config.hidden >= 2048 else 4

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("LowLatencyBuffer: used after destroy()")

    def _capturing(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def check(self) -> None:
        """Read the status the kernels left (a host sync), clear it, and raise on errors:
        ``TimeoutError`` naming the peer whose flag never came, ``ValueError`` for bad
        ``topk_ids`` or a slot overflow."""
        st = self._status.tolist()
        if not any(st):
            return
        self._status.zero_()
        waited = f"{self.timeout_s:g} s" if self._gpu else f"{self.timeout_spins} reads"
        if st[0] or st[1]:
            what, peer = ("dispatch", st[0] - 1) if st[0] else ("combine", st[1] - 1)
            ep = self._epoch.tolist()
            seen = ""
            if self.backend == "nvlink":  # what that peer's flags hold here (diagnosis)
                if st[0]:
                    f = self._dflags.local.view(self.nbuf, self.num_local_experts, self.world_size)[:, :, peer] >> 32
                else:
                    f = self._cflags.local.view(self.nbuf, self.world_size)[:, peer]
                seen = f", its flags here hold sequence numbers {sorted(set(f.reshape(-1).tolist()))}"
            raise TimeoutError(
                f"rank {self.rank}: low-latency {what} timed out waiting for rank {peer} ({waited}; "
                f"this rank's sequence numbers: dispatch {ep[1]}, combine {ep[3]}{seen}); "
                f"is that rank alive and calling {what}?"
            )
        if st[3]:
            raise ValueError(
                f"topk_ids: values must lie in [-1, {self.config.num_experts}), found {st[3] - 1} (those entries were skipped)"
            )
        if st[2]:
            raise ValueError(
                f"topk_ids: more than max_tokens_per_rank={self.config.max_tokens_per_rank} rows for local expert "
                f"{st[2] - 1} of one destination (duplicate ids in a token?); extra rows were dropped"
            )

    # ------------------------------------------------------------------ dispatch
    def dispatch(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, async_finish: bool = False
    ) -> LowLatencyDispatchOutput | tuple[LowLatencyDispatchOutput, Callable[[], LowLatencyDispatchOutput]]:
        """Send + receive. ``x`` BF16 ``[T, H]``, ``topk_ids`` int32/int64 ``[T, K]`` in
        ``[-1, E)``, ``topk_weights`` float32 ``[T, K]``. With ``async_finish=True`` returns
        ``(out, hook)``: only the send half ran; ``hook()`` launches the receive half, after
        which ``out``'s tensors hold the result."""
        pending = self.dispatch_send(x, topk_ids, topk_weights)
        if async_finish:
            return pending, lambda: self.dispatch_recv(pending)
        return self.dispatch_recv(pending)

    def dispatch_send(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> LowLatencyDispatchOutput:
        """Send half: quantize and store every ``(token, k)`` row into its expert's slot on the
        owning rank. Returns the output object (its tensors are filled by :meth:`dispatch_recv`)."""
        self._check_alive()
        if self._phase not in ("idle", "dispatched"):
            raise RuntimeError(f"dispatch_send: the previous call is unfinished (state {self._phase!r})")
        cfg = self.config
        H, K, TMAX = cfg.hidden, cfg.num_topk, cfg.max_tokens_per_rank
        check_tensor("x", x, dtype=torch.bfloat16, ndim=2, device=self.device, contiguous=True)
        T = x.shape[0]
        if x.shape[1] != H:
            raise ValueError(f"x: expected hidden size {H}, got shape {list(x.shape)}")
        if T > TMAX:
            raise ValueError(f"x: {T} tokens exceed max_tokens_per_rank={TMAX}")
        check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64), shape=(T, K), device=self.device)
        check_tensor("topk_weights", topk_weights, dtype=(torch.float32, torch.bfloat16), shape=(T, K), device=self.device)
        ids = topk_ids.to(torch.int32).contiguous()
        wts = topk_weights.to(torch.float32).contiguous()
        out = self._alloc_dispatch_out()
        self._launch(*self._dsend_args(x, ids, wts))
        if self.backend == "torch":
            self._a2a(self._stage["drecv"], self._stage["dsend"])
            self._a2a(self._stage["direcv"], self._stage["disend"])
            self._a2a(self._stage["dfrecv"], self._stage["dfsend"])
        out.handle.topk_ids = ids
        self._calls += 1
        out.handle.call = self._calls
        self._phase = "dispatch_sent"
        return out

    # ------------------------------------------------------------------ launches
    # Each builder returns (kernel, grid, args, kwargs); the same builders feed the real
    # launches and the compile-only warm-up of _compile_all, so both see the same variant.
    def _launch(self, kernel, grid, args, kw, warmup: bool = False):
        if warmup:
            return kernel.warmup(*args, grid=grid, **kw)
        return launch(kernel, grid, *args, **kw)

    def _dsend_args(self, x, ids, wts):
        from ..kernels.nvlink import ll_dispatch_send_kernel

        cfg, L, geo = self.config, self.layout, self._dsend
        H, K, E, TMAX, EL = cfg.hidden, cfg.num_topk, cfg.num_experts, cfg.max_tokens_per_rank, self.num_local_experts
        T = x.shape[0]
        rows_t, idx_t, flags_t = self._dsend_tables
        grid = (max(1, min(T, 2 * self._num_sms)),)
        xin = x.view(torch.int64) if cfg.payload == "bf16" else x
        args = (
            xin, ids, wts, T, rows_t, idx_t, flags_t, self._epoch, self._sink, self._counter[0:1], self._hist,
            self._status, geo.src_slot, geo.slot_b, geo.slot_e, geo.slot_s, geo.flag_b, geo.flag_e, geo.flag_s,
            geo.row_b, geo.row_s, TMAX,
        )  # fmt: skip
        kw = dict(
            H=H, K=K, KP=next_pow2(K), E=E, EP=self._hist.numel(), E_LOCAL=EL, RP=next_pow2(self.world_size),
            NBUF=self.nbuf,
            PAYLOAD=PAYLOAD_CODE[cfg.payload], NB=self._nb(cfg.payload), ROW_BYTES=L.row_bytes,
            SCALE_OFF=L.scale_offset, IDS_OFF=L.ids_offset, W_OFF=L.weights_offset, SRC_OFF=L.src_offset,
            CHUNK=SEND_SCAN_CHUNK, GPU=self._gpu, NPROG=grid[0], num_warps=self._warps(),
            maxnreg=SEND_MAXNREG,
        )  # fmt: skip
        return ll_dispatch_send_kernel, grid, args, kw

    def _split(self) -> int:
        """Programs per local expert of the receive grid ``(E_local, split)`` (4-warp
        programs, several an SM)."""
        rl = self._rlaunch
        return max(1, min(self._num_sms * rl.progs_per_sm // self.num_local_experts, rl.split_max))

    def _drecv_args(self, out):
        from ..kernels.nvlink import ll_dispatch_recv_kernel

        cfg = self.config
        H, K, TMAX = cfg.hidden, cfg.num_topk, cfg.max_tokens_per_rank
        EL, R, MM = self.num_local_experts, self.world_size, self.max_m
        L, geo = self.layout, self._drecv
        slots, idx, flags = self._drecv_bufs
        rl = self._rlaunch
        nsplit = self._split()
        # rows a step: the padded payload words of a row fill rl.recv_words
        row_words = self._nb(cfg.payload) * {"nvfp4": 1, "fp8": 16, "bf16": 4}[cfg.payload]
        rpi = next_pow2(min(max(1, rl.recv_words // row_words), 8) + 1) // 2  # largest power of 2 <=
        ksf = H // 16
        if cfg.payload == "nvfp4":
            sf = out.scales.view(torch.uint8)
        else:
            sf = out.scales if out.scales is not None else self._dummy
        args = (
            slots.data_ptr(), idx, flags, self._epoch, self._status,
            out.x.view(torch.int64), sf, out.global_scale if out.global_scale is not None else self._dummy,
            out.masked_m, out.handle.src_rank, out.handle.src_slot, out.topk_weights, out.handle.token_rows,
            out.handle.source_tokens, geo.slot_b, geo.slot_e, geo.slot_s, geo.flag_b, geo.flag_e, geo.flag_s,
            geo.row_b, geo.row_s, TMAX, MM,
            cdiv(MM, 128), cdiv(ksf, 4), TMAX * K, self.timeout_spins, self._timeout_us,
        )  # fmt: skip
        kw = dict(
            R=R, RP=next_pow2(R), H=H, K=K, NBUF=self.nbuf, PAYLOAD=PAYLOAD_CODE[cfg.payload],
            NB=self._nb(cfg.payload), ROW_BYTES=L.row_bytes, SCALE_OFF=L.scale_offset, W_OFF=L.weights_offset,
            SRC_OFF=L.src_offset, SWIZZLE=cfg.scale_layout == "swizzled", GPU=self._gpu, NSPLIT=nsplit,
            num_warps=rl.warps, RPI=rpi, PIPELINE=cfg.variant == "v2",
        )  # fmt: skip
        return ll_dispatch_recv_kernel, (EL, nsplit), args, kw

    def _combine_grid(self, items: int) -> tuple[dict, int]:
        """``(kw, grid)`` shared by the combine halves: the bf16 wire in ``COMBINE_CHUNK``
        items of 4-warp programs, quantized wires in whole rows of :meth:`_warps` programs;
        at most ``COMBINE_WARPS_PER_SM`` warps an SM, at most ``items`` (at least 1)."""
        cfg = self.config
        bf16 = cfg.combine_payload == "bf16"
        warps = 4 if bf16 else self._warps()
        hc = min(COMBINE_CHUNK, next_pow2(cfg.hidden))
        kw = dict(
            H=cfg.hidden, K=cfg.num_topk, KP=next_pow2(cfg.num_topk), R=self.world_size,
            RP=next_pow2(self.world_size), NBUF=self.nbuf, CPAYLOAD=PAYLOAD_CODE[cfg.combine_payload],
            NB=self._nb(cfg.combine_payload), CROW_BYTES=self.crow_bytes, CSCALE_OFF=self.clayout.scale_offset,
            GPU=self._gpu, HC=hc, num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
        per_item = cdiv(cfg.hidden, hc) if bf16 else 1
        return kw, max(1, min(items * per_item, self._num_sms * max(1, COMBINE_WARPS_PER_SM // warps)))

    def _csend_args(self, expert_out, handle):
        from ..kernels.nvlink import ll_combine_send_kernel

        TMAX, K = self.config.max_tokens_per_rank, self.config.num_topk
        g = self._cgeo
        rows_t, flags_t = self._csend_tables
        kw, nprog = self._combine_grid(self.world_size * TMAX)
        args = (
            expert_out, handle.row_weights, handle.token_rows, handle.source_tokens, rows_t, flags_t, self._epoch,
            self._sink, self._counter[1:2], self.rank if self.backend == "nvlink" else 0, g["cb"],
            g.get("send_cs", g["cs"]), g["cflag_b"], g.get("send_flag_s", g["cflag_s"]), TMAX * K,
        )  # fmt: skip
        return ll_combine_send_kernel, (nprog,), args, dict(kw, NPROG=nprog)

    def _crecv_args(self, y, ids):
        from ..kernels.nvlink import ll_combine_recv_kernel

        cfg = self.config
        rows, flags = self._crecv_bufs
        g = self._cgeo
        kw, nprog = self._combine_grid(ids.shape[0])
        args = (
            rows.data_ptr(), flags, self._epoch, self._status, ids, y, ids.shape[0],
            g["cb"], g["cs"], g["cflag_b"], g["cflag_s"], self.timeout_spins, self._timeout_us,
        )  # fmt: skip
        kw = dict(kw, E=cfg.num_experts, E_LOCAL=self.num_local_experts, NPROG=nprog)
        return ll_combine_recv_kernel, (nprog,), args, kw

    def _compile_all(self) -> None:
        """Compile (no launch) every kernel variant this buffer launches, then one barrier of
        all ranks, so that no rank spins on a flag while a peer is still compiling. Called
        by the constructor (collective) on GPUs. Pointer arguments get the alignment of
        real ones (fresh allocations); varying integers are not specialized."""
        cfg, dev = self.config, self.device
        H, K = cfg.hidden, cfg.num_topk
        x = torch.empty(2, H, dtype=torch.bfloat16, device=dev)
        ids = torch.empty(2, K, dtype=torch.int32, device=dev)
        wts = torch.empty(2, K, dtype=torch.float32, device=dev)
        # the real output set of the next call (not a small stand-in: the sets are created
        # once, on first use, and every later call reuses them)
        out = self._alloc_dispatch_out()
        eo = torch.empty(1, 1, H, dtype=torch.bfloat16, device=dev)
        y = torch.empty(2, H, dtype=torch.bfloat16, device=dev)
        self._launch(*self._dsend_args(x, ids, wts), warmup=True)
        self._launch(*self._drecv_args(out), warmup=True)
        self._launch(*self._csend_args(eo, out.handle), warmup=True)
        self._launch(*self._crecv_args(y, ids), warmup=True)
        if self.backend == "nvlink":
            self.mem.barrier()
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()
        # torch backend: flags arrive through the stream-ordered all-to-all before the
        # receive kernel runs; it never waits on a peer, so no barrier is needed.

    def _alloc_dispatch_out(self) -> LowLatencyDispatchOutput:
        """The output of the next call: tensors of the fixed output set ``(calls + 1) % 2``
        (allocated, zero-filled, on first use), wrapped in fresh dataclasses.

        Always full size ``[E_local, max_m, ...]``: the sets are cached on first use, so
        a caller must not choose their shape (the GPU-only compile warm-up once created
        them at ``[1, 1, ...]`` and every receive kernel then wrote past their end)."""
        sets = getattr(self, "_out_sets", None)
        if sets is None:
            sets = self._out_sets = [self._new_out_set() for _ in range(2)]
        t = sets[(self._calls + 1) % 2]
        handle = LowLatencyHandle(
            src_rank=t["src_rank"], src_slot=t["src_slot"], masked_m=t["masked_m"], row_weights=t["row_weights"],
            token_rows=t["token_rows"], source_tokens=t["source_tokens"], topk_ids=None, call=0,  # type: ignore[arg-type]
        )  # fmt: skip
        return LowLatencyDispatchOutput(
            x=t["x"], scales=t["scales"], global_scale=t["gs"], masked_m=t["masked_m"], topk_weights=t["row_weights"], handle=handle
        )

    def _out_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
        """Shape and dtype of every tensor of an output set (``None``: absent): the receive
        kernels write ``E_local * max_m`` rows into each, so these are the only sizes a set
        may have (computed once)."""
        specs = getattr(self, "_specs", None)
        if specs is not None:
            return specs
        cfg = self.config
        H, EL, MM = cfg.hidden, self.num_local_experts, self.max_m
        f8, f32, i32 = torch.float8_e4m3fn, torch.float32, torch.int32
        if cfg.payload == "nvfp4":
            ksf = H // 16
            kcols = round_up(ksf, 4) if cfg.scale_layout == "swizzled" else ksf
            x, scales, gs = ((EL, MM, H // 2), torch.uint8), ((EL, MM, kcols), f8), ((EL, MM), f32)
        elif cfg.payload == "fp8":
            x, scales, gs = ((EL, MM, H), f8), ((EL, MM, H // 128), f32), None
        else:
            x, scales, gs = ((EL, MM, H), torch.bfloat16), None, None
        R, TMAX = self.world_size, cfg.max_tokens_per_rank
        self._specs = dict(
            x=x, scales=scales, gs=gs, masked_m=((EL,), i32), src_rank=((EL, MM), i32), src_slot=((EL, MM), i32),
            row_weights=((EL, MM), f32), token_rows=((R * TMAX * cfg.num_topk,), torch.int64),
            source_tokens=((R,), i32),
            y=((TMAX, H), torch.bfloat16),
        )  # fmt: skip
        return self._specs

    def _new_out_set(self) -> dict:
        # zero once, so padding rows read as zeros until a call writes them
        return {
            k: None if spec is None else torch.zeros(spec[0], dtype=spec[1], device=self.device)
            for k, spec in self._out_specs().items()
        }

    def _check_out_set(self, what: str, tensors: dict) -> None:
        """Host-side guard (metadata only, no sync): the tensors a kernel is about to fill or
        read row by row have the full output shapes (anything smaller is written past its
        end: illegal addresses or silently corrupted neighbours on GPUs)."""
        specs = self._out_specs()
        for k, t in tensors.items():
            spec = specs[k]
            if spec is None:
                continue
            if t is None or tuple(t.shape) != spec[0] or t.dtype != spec[1] or not t.is_contiguous():
                got = None if t is None else (tuple(t.shape), t.dtype, t.is_contiguous())
                raise ValueError(f"{what}: {k} must be a contiguous {spec[1]} tensor of shape {spec[0]}, got {got}")

    def dispatch_recv(self, out: LowLatencyDispatchOutput) -> LowLatencyDispatchOutput:
        """Receive half: wait for the flags of this rank's experts and compact the slots into
        ``out`` (masked layout)."""
        self._check_alive()
        if self._phase != "dispatch_sent" or out.handle.call != self._calls:
            raise RuntimeError("dispatch_recv: call it once, after the dispatch_send that returned `out`")
        h = out.handle
        self._check_out_set("dispatch_recv", dict(
            x=out.x, scales=out.scales, gs=out.global_scale, masked_m=out.masked_m, src_rank=h.src_rank,
            src_slot=h.src_slot, row_weights=out.topk_weights, token_rows=h.token_rows,
            source_tokens=h.source_tokens,
        ))  # fmt: skip
        self._launch(*self._drecv_args(out))
        self._phase = "dispatched"
        if self.sync_check and not self._capturing():
            self.check()
        return out

    # ------------------------------------------------------------------ combine
    def combine(
        self, expert_out: torch.Tensor, handle: LowLatencyHandle, *, async_finish: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """``expert_out`` BF16 ``[E_local, max_m, H]`` (rows ``< masked_m[e]`` are read) ->
        BF16 ``[T, H]``: ``y[t] = sum_k w[t, k] * expert_out[row of (t, k)]``. Rounding order
        (that of :meth:`fp4comm.ep.EPBuffer.combine`): on each expert rank, FP32 ``acc = acc +
        w_k * float(out)`` over the token's pairs there, ``k`` ascending (no FMA), rounded
        once to BF16 (and quantized per row for an fp8 / nvfp4 ``combine_payload``); on the
        source, FP32 ``acc = acc + float(partial_r)`` over ranks ascending, rounded once to
        BF16. Tokens with every id ``-1`` get zeros. ``async_finish=True``: ``(y, hook)``, see
        :meth:`dispatch`."""
        y = self.combine_send(expert_out, handle)
        if async_finish:
            return y, lambda: self.combine_recv(y, handle)
        return self.combine_recv(y, handle)

    def combine_send(self, expert_out: torch.Tensor, handle: LowLatencyHandle) -> torch.Tensor:
        """Send half of combine; returns the (not yet filled) output ``[T, H]`` BF16."""
        self._check_alive()
        if self._phase != "dispatched":
            raise RuntimeError(f"combine_send: needs a finished dispatch first (state {self._phase!r})")
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected a LowLatencyHandle, got {type(handle).__name__}")
        if handle.call != self._calls:
            raise ValueError("handle: stale (from an earlier dispatch on this buffer)")
        cfg = self.config
        H, EL, MM = cfg.hidden, self.num_local_experts, self.max_m
        check_tensor("expert_out", expert_out, dtype=torch.bfloat16, shape=(EL, MM, H), device=self.device, contiguous=True)
        h = handle
        self._check_out_set("handle", dict(
            row_weights=h.row_weights, token_rows=h.token_rows, source_tokens=h.source_tokens,
        ))  # fmt: skip
        self._launch(*self._csend_args(expert_out, handle))
        if self.backend == "torch":
            self._a2a(self._stage["crecv"], self._stage["csend"])
            self._a2a(self._stage["cfrecv"], self._stage["cfsend"])
        self._phase = "combine_sent"
        T = handle.topk_ids.shape[0]
        return self._out_sets[handle.call % 2]["y"][:T]  # fixed: graph replays reuse it

    def combine_recv(self, y: torch.Tensor, handle: LowLatencyHandle) -> torch.Tensor:
        """Receive half of combine: wait for every expert rank, reduce into ``y``."""
        self._check_alive()
        if self._phase != "combine_sent":
            raise RuntimeError(f"combine_recv: call it once, after combine_send (state {self._phase!r})")
        self._launch(*self._crecv_args(y, handle.topk_ids))
        self._phase = "idle"
        if self.sync_check and not self._capturing():
            self.check()
        return y

    # ------------------------------------------------------------------ misc
    def _a2a(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_to_all_single(out, inp, group=self.group)

    def wire_bytes(self, topk_ids: torch.Tensor, peers_only: bool = True) -> dict[str, int]:
        """Bytes this rank puts on the wire for the routing ``topk_ids`` ``[T, K]``: the
        dispatch's message rows (one per (token, rank)) and index entries (4 bytes per
        (token, expert)), the combine's partial rows (one per (token, rank)); to peers only
        (``peers_only``) or to every rank, self included. Flags are not counted."""
        check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64), ndim=2)
        E, EL = self.config.num_experts, self.num_local_experts
        ids = topk_ids.long()
        routed = (ids >= 0) & (ids < E)
        owner = torch.where(routed, ids // EL, -1)
        if peers_only:
            routed &= owner != self.rank
        pairs = int(routed.sum())
        hit = torch.zeros(ids.shape[0], self.world_size + 1, dtype=torch.bool, device=ids.device)
        hit.scatter_(1, torch.where(routed, owner, self.world_size), routed)  # column R: a sink
        rows = int(hit[:, : self.world_size].sum())
        return {"dispatch": rows * self.layout.row_bytes + 4 * pairs, "combine": rows * self.crow_bytes}

    def destroy(self) -> None:
        """Free the symmetric buffers (collective on NVSHMEM: every rank must call it, also
        after a ``TimeoutError``; a rank that raised something else and exits instead should
        not call it while its peers wait in another collective). Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        if self.mem is not None:
            for t in (self._slots, self._sidx, self._dflags, self._crows, self._cflags):
                self.mem.free(t)
        self._stage = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()
