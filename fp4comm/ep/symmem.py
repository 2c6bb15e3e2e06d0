"""Symmetric memory for the ``nvlink`` backend: one allocation per rank at the same logical
place, and a device table of every rank's address so Triton kernels can store into peers.

Two implementations behind one small interface (:class:`SymmetricMemory`):

* :class:`NvshmemMemory` (GPUs, one NVLink domain): NVSHMEM through ``nvshmem4py``,
  initialised once per process with a unique id broadcast over a ``torch.distributed``
  group (or over MPI under ``mpirun``). Buffers come from ``nvshmem.core.tensor``, peer
  addresses from ``nvshmem.core.get_peer_tensor``. :func:`finalize` tears NVSHMEM down;
  it is explicit (never at interpreter exit) because it is collective. Barriers are host
  barriers over the bootstrap group (never NVSHMEM's on-stream barrier, see
  :meth:`NvshmemMemory.barrier`).
  NVLink multicast (``get_multicast_tensor``) is never used.
* :class:`EmulatedWorld` (CPU, tests): ``R`` ranks in one process. A "symmetric" buffer
  is ``R`` host tensors, peer addresses are their ``data_ptr()``. Triton kernels run
  under ``TRITON_INTERPRET=1`` and store through those addresses. The interpreter cannot
  spin on another rank, so callers run every rank's send half first, then every rank's
  receive half (see ``tests/test_nvlink_emulated.py``).

Allocation is collective and ordered: every rank must allocate the same shapes in the
same order (as with NVSHMEM). Buffers are zero-filled before any peer can touch them
(flags rely on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._checks import check_positive_int

__all__ = [
    "SymmetricTensor",
    "SymmetricMemory",
    "NvshmemMemory",
    "EmulatedWorld",
    "EmulatedMemory",
    "ShmMemory",
    "init_nvshmem",
    "finalize",
    "nvshmem_available",
]


@dataclass
class SymmetricTensor:
    """One symmetric allocation as seen from one rank.

    Attributes:
        local: this rank's copy (any shape/dtype given at allocation), on the rank's device.
        peer_ptrs: ``[R]`` int64 on the rank's device: address of rank ``p``'s copy
            (``peer_ptrs[rank] == local.data_ptr()``), for ``tl.load(t + p).to(tl.pointer_type(..))``.
        peers: rank ``p``'s copy as a tensor this process can address (peer view), or
            ``None`` where no such view exists.
    """

    local: torch.Tensor
    peer_ptrs: torch.Tensor
    peers: list[torch.Tensor | None] = field(default_factory=list)

    def peer(self, p: int) -> torch.Tensor:
        t = self.peers[p] if p < len(self.peers) else None
        if t is None:
            raise ValueError(f"p: no addressable view of rank {p}'s buffer")
        return t


class SymmetricMemory:
    """Interface: ``rank``, ``world_size``, ``device``, ``emulated``; :meth:`alloc`,
    :meth:`free`, :meth:`barrier`, :meth:`close`, :meth:`num_sms`."""

    rank: int
    world_size: int
    device: torch.device
    emulated: bool = False

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> SymmetricTensor:  # pragma: no cover
        raise NotImplementedError

    def free(self, t: SymmetricTensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def barrier(self) -> None:  # pragma: no cover
        """Every rank's prior work on the current stream is done and visible to peers."""
        raise NotImplementedError

    def close(self) -> None:
        """Free every allocation made through this object (collective). Idempotent."""

    def num_sms(self) -> int:
        """Streaming multiprocessors of the device: the largest grid that is co-resident
        with one program per SM (kernels that spin on each other never exceed it)."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).multi_processor_count
        return 4  # interpreter: few programs keep CPU tests fast

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- emulation
class EmulatedWorld:
    """``world_size`` ranks emulated in one process (CPU tensors, interpreter kernels).

    ``world.rank(r)`` is rank ``r``'s :class:`EmulatedMemory`. The ``k``-th allocation of
    every rank refers to the same ``R`` tensors, as a symmetric heap does.
    """

    def __init__(self, world_size: int, device: torch.device | str = "cpu") -> None:
        self.world_size = check_positive_int("world_size", world_size)
        self.device = torch.device(device)
        self._allocs: list[list[torch.Tensor] | None] = []
        self._specs: list[tuple[tuple[int, ...], torch.dtype]] = []
        self._ranks = [EmulatedMemory(self, r) for r in range(world_size)]

    def rank(self, r: int) -> EmulatedMemory:
        if not 0 <= r < self.world_size:
            raise ValueError(f"r: must be in [0, {self.world_size}), got {r}")
        return self._ranks[r]

    def _get(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        if index == len(self._allocs):
            self._allocs.append([torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.world_size)])
            self._specs.append((shape, dtype))
        elif self._specs[index] != (shape, dtype):
            raise ValueError(
                f"shape: symmetric allocation #{index} is {self._specs[index]} on another rank, got {(shape, dtype)}"
            )
        tensors = self._allocs[index]
        if tensors is None:
            raise ValueError(f"symmetric allocation #{index} was already freed")
        return tensors


class EmulatedMemory(SymmetricMemory):
    """Rank ``rank`` of an :class:`EmulatedWorld`."""

    emulated = True

    def __init__(self, world: EmulatedWorld, rank: int) -> None:
        self.world = world
        self.rank = rank
        self.world_size = world.world_size
        self.device = world.device
        self._count = 0
        self._live: list[int] = []

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> SymmetricTensor:
        shape = tuple(int(s) for s in shape)
        index = self._count
        tensors = self.world._get(index, shape, dtype)
        self._count += 1
        self._live.append(index)
        ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=self.device)
        st = SymmetricTensor(local=tensors[self.rank], peer_ptrs=ptrs, peers=list(tensors))
        st._index = index  # type: ignore[attr-defined]
        return st

    def free(self, t: SymmetricTensor) -> None:
        index = getattr(t, "_index", None)
        if index in self._live:
            self._release(index)

    def _release(self, index: int) -> None:
        self._live.remove(index)
        # the last rank to free drops the tensors
        if all(index not in m._live for m in self.world._ranks):
            self.world._allocs[index] = None

    def barrier(self) -> None:
        """No-op: the caller orders the emulated ranks' halves."""

    def close(self) -> None:
        for index in list(self._live):
            self._release(index)


# ----------------------------------------------------------------------------- CPU processes
class ShmMemory(SymmetricMemory):
    """CPU ranks in separate processes of one host (a gloo group): each buffer is a file in
    ``/dev/shm`` mapped (``MAP_SHARED``) by every rank, so a peer address is valid in this
    process and interpreter kernels can store into peers. For tests of collective APIs
    (``EPBuffer(backend="nvlink")`` on CPU); the interpreter cannot spin on a peer, so
    callers put a ``barrier()`` between their signal and wait kernels."""

    emulated = True

    def __init__(self, group=None, device: torch.device | str = "cpu") -> None:
        import os
        import uuid

        import torch.distributed as dist

        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.device = torch.device(device)
        obj = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(obj, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        self._token = obj[0]
        self._dir = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
        self._count = 0
        self._live: list[SymmetricTensor] = []

    def _path(self, index: int, rank: int) -> str:
        return f"{self._dir}/fp4comm-{self._token}-{index}-{rank}"

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> SymmetricTensor:
        import math
        import os

        shape = tuple(int(s) for s in shape)
        nbytes = max(16, math.prod(shape) * torch.empty(0, dtype=dtype).element_size())
        index = self._count
        self._count += 1

        def view(rank: int) -> torch.Tensor:
            raw = torch.from_file(self._path(index, rank), shared=True, size=nbytes, dtype=torch.uint8)
            return raw[: math.prod(shape) * torch.empty(0, dtype=dtype).element_size()].view(dtype).view(shape)

        with open(self._path(index, self.rank), "wb") as f:
            f.truncate(nbytes)
        local = view(self.rank)
        local.zero_()
        self.barrier()
        peers = [local if p == self.rank else view(p) for p in range(self.world_size)]
        self.barrier()
        os.unlink(self._path(index, self.rank))  # mappings stay valid
        ptrs = torch.tensor([v.data_ptr() for v in peers], dtype=torch.int64, device=self.device)
        st = SymmetricTensor(local=local, peer_ptrs=ptrs, peers=peers)
        self._live.append(st)
        return st

    def free(self, t: SymmetricTensor) -> None:
        if t in self._live:
            self._live.remove(t)
            t.peers = []

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def close(self) -> None:
        self._live.clear()


# ----------------------------------------------------------------------------- NVSHMEM
def nvshmem_available() -> bool:
    """``nvshmem4py`` can be imported (GPU machines with the ``[gpu]`` extra)."""
    try:
        import nvshmem.core  # noqa: F401
    except Exception:
        return False
    return True


class _NvshmemRuntime:
    """The one owner of NVSHMEM state in this process (initialised at most once)."""

    def __init__(self) -> None:
        self.initialized = False
        self.rank = -1
        self.world_size = 0
        self.device: torch.device | None = None
        self.users = 0
        self.group = None  # torch.distributed group of the bootstrap (host barriers)
        self.bootstrap = "torch"

    def host_barrier(self) -> None:
        """Every PE's host reaches this point (over the bootstrap's group, not NVSHMEM)."""
        if self.bootstrap == "mpi":
            from mpi4py import MPI

            MPI.COMM_WORLD.Barrier()
            return
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl" and self.device is not None:
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)

    def init(self, group, device: torch.device, bootstrap: str) -> None:
        import nvshmem.core as nvshmem
        from cuda.core import Device  # cuda-python, a dependency of nvshmem4py

        if self.initialized:
            return
        cd = Device(device.index)
        cd.set_current()
        if bootstrap == "mpi":
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
            rank, size = comm.Get_rank(), comm.Get_size()
            uid = nvshmem.get_unique_id(empty=rank != 0)
            comm.Bcast(uid._data.view("int8"), root=0)
        else:
            import numpy as np
            import torch.distributed as dist

            rank, size = dist.get_rank(group), dist.get_world_size(group)
            uid = nvshmem.get_unique_id(empty=rank != 0)
            obj = [uid._data.tobytes() if rank == 0 else None]
            dist.broadcast_object_list(obj, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
            uid._data[:] = np.frombuffer(obj[0], dtype=uid._data.dtype)
        nvshmem.init(device=cd, uid=uid, rank=rank, nranks=size, initializer_method="uid")
        self.initialized = True
        self.rank, self.world_size, self.device = rank, size, device
        self.group, self.bootstrap = group, bootstrap

    def finalize(self) -> None:
        if not self.initialized:
            return
        import nvshmem.core as nvshmem

        nvshmem.finalize()
        self.initialized = False
        self.users = 0


_RUNTIME = _NvshmemRuntime()


class NvshmemMemory(SymmetricMemory):
    """Symmetric memory from NVSHMEM (see module docstring). Create with :func:`init_nvshmem`."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self._live: list[torch.Tensor] = []

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> SymmetricTensor:
        import nvshmem.core as nvshmem

        shape = tuple(int(s) for s in shape)
        local = nvshmem.tensor(shape, dtype=dtype)
        local.zero_()
        peers = []
        for p in range(self.world_size):
            v = nvshmem.get_peer_tensor(local, p)
            if v is None or v.data_ptr() == 0:
                raise RuntimeError(f"rank {p}: its symmetric memory is not reachable over NVLink/P2P from rank {self.rank}")
            peers.append(v)
        ptrs = torch.tensor([v.data_ptr() for v in peers], dtype=torch.int64, device=self.device)
        self._live.append(local)
        self.barrier()  # every rank's zero-fill is done before any peer stores
        return SymmetricTensor(local=local, peer_ptrs=ptrs, peers=peers)

    def free(self, t: SymmetricTensor) -> None:
        import nvshmem.core as nvshmem

        for i, x in enumerate(self._live):
            if x is t.local:
                del self._live[i]
                torch.cuda.current_stream(self.device).synchronize()
                t.peers = []
                nvshmem.free_tensor(x)
                return

    def barrier(self) -> None:
        """Host barrier after this rank's stream drained: every rank's earlier work is done.

        Deliberately not ``nvshmem.barrier_all(stream=...)``: on the 2x H200 machine one PE
        waited forever in such an on-stream barrier (right after a few allocations, each
        of which also ended with one) while its peer went on; that is how the first GPU
        runs hung. Likely cause: an on-stream barrier still pending on the GPU when the host
        enters the next NVSHMEM collective (``tensor`` / ``free_tensor`` barrier
        internally, on another stream) shares NVSHMEM's barrier state with it."""
        torch.cuda.current_stream(self.device).synchronize()
        _RUNTIME.host_barrier()

    def close(self) -> None:
        import nvshmem.core as nvshmem

        if not self._live:
            return
        torch.cuda.current_stream(self.device).synchronize()
        while self._live:
            nvshmem.free_tensor(self._live.pop())
        _RUNTIME.users = max(0, _RUNTIME.users - 1)


def init_nvshmem(group=None, device: torch.device | None = None, bootstrap: str = "torch") -> NvshmemMemory:
    """NVSHMEM symmetric memory for this process (initialises NVSHMEM on first use).

    Args:
        group: ``torch.distributed`` group whose ranks become the NVSHMEM PEs (``None`` =
            world). Its size must equal the NVSHMEM world size; only one NVSHMEM world per
            process.
        device: this rank's CUDA device (default: the current one).
        bootstrap: ``"torch"`` (unique id broadcast over ``group``) or ``"mpi"`` (over
            ``MPI.COMM_WORLD``, for ``mpirun``).

    Raises ``RuntimeError`` when ``nvshmem4py`` is missing, ``ValueError`` for a group
    that does not match an already initialised NVSHMEM world.
    """
    if bootstrap not in ("torch", "mpi"):
        raise ValueError(f"bootstrap: must be 'torch' or 'mpi', got {bootstrap!r}")
    if not nvshmem_available():
        raise RuntimeError(
            "nvshmem4py is not importable: install the [gpu] extra (nvshmem4py-cu13) or the wheel "
            "from shared/wheels into a folder on PYTHONPATH"
        )
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        raise ValueError(f"device: NVSHMEM needs a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _RUNTIME.init(group, device, bootstrap)
    if bootstrap == "torch":
        import torch.distributed as dist

        size = dist.get_world_size(group)
        if size != _RUNTIME.world_size or dist.get_rank(group) != _RUNTIME.rank:
            raise ValueError(
                f"group: NVSHMEM was initialised for {_RUNTIME.world_size} PEs (this PE {_RUNTIME.rank}); "
                f"the group has {size} ranks (this rank {dist.get_rank(group)})"
            )
    _RUNTIME.users += 1
    return NvshmemMemory(_RUNTIME.rank, _RUNTIME.world_size, _RUNTIME.device)


def finalize() -> None:
    """Tear down NVSHMEM in this process (collective: every PE calls it, after freeing its
    buffers with ``close()``). A no-op when NVSHMEM was never initialised."""
    _RUNTIME.finalize()
