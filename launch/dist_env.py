"""Environment -> process group: the one place fp4comm's entry points read launcher variables.

Recognized launchers (first match wins):
  * ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (+ ``MASTER_ADDR``/``MASTER_PORT``);
  * Open MPI ``mpirun``: ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK``;
  * MPICH / Intel MPI: ``PMI_RANK`` / ``PMI_SIZE`` (local rank = ``MPI_LOCALRANKID`` or rank mod GPUs);
  * Slurm ``srun``: ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``.
Under an MPI launcher without ``MASTER_ADDR``/``MASTER_PORT``, rank 0's host and a free port
are broadcast with mpi4py (when installed); else ``127.0.0.1:29500``.

Device / backend: NCCL on ``cuda:<local rank>`` when CUDA is available and there are at
least as many GPUs on the node as local ranks, else gloo on CPU (override with
``FP4COMM_DIST_BACKEND=gloo|nccl``). Nothing else in fp4comm reads the environment.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


@dataclass
class DistEnv:
    """What an entry point needs after :func:`init_distributed`."""

    launcher: str  # torchrun / openmpi / mpich / slurm / none
    rank: int
    world_size: int
    local_rank: int
    backend: str  # nccl / gloo
    device: torch.device
    master: str  # host:port
    group: object = None  # the default group

    def describe(self) -> str:
        return (
            f"launcher={self.launcher} rank={self.rank}/{self.world_size} local_rank={self.local_rank} "
            f"backend={self.backend} device={self.device} master={self.master}"
        )


def detect(env: dict | None = None) -> DistEnv:
    """Resolve rank / world / device / backend from ``env`` (default ``os.environ``) without
    initializing anything (this is what ``--dry-run`` prints)."""
    env = dict(os.environ if env is None else env)
    launcher, rank, world, local = "none", 0, 1, 0
    for name, r, w, lr in _LAUNCHERS:
        if r in env and w in env:
            launcher, rank, world = name, int(env[r]), int(env[w])
            n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
            local = int(env[lr]) if lr in env else (rank % n_gpu if n_gpu else rank)
            break
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = env.get("FP4COMM_DIST_BACKEND") or ("nccl" if n_gpu > local else "gloo")
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    master = f"{env.get('MASTER_ADDR', '127.0.0.1')}:{env.get('MASTER_PORT', '29500')}"
    return DistEnv(launcher, rank, world, local, backend, device, master)


def _mpi_master(info: DistEnv) -> None:
    """Under MPI without MASTER_ADDR/PORT: rank 0 picks host and port, broadcast by mpi4py."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return
    try:
        from mpi4py import MPI
    except ImportError:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        return
    addr = port = None
    if info.rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        addr = socket.gethostbyname(socket.gethostname()) if info.world_size > 1 else "127.0.0.1"
    addr, port = MPI.COMM_WORLD.bcast((addr, port), root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = str(addr), str(port)


def ep_timeout_s(default: float = 60.0) -> float:
    """Seconds an nvlink flag wait spins before a silent peer raises (``EPBuffer(timeout_s=)``,
    ``LowLatencyConfig(timeout_s=)``): ``FP4COMM_NVLINK_TIMEOUT_S`` if set, else ``default``.
    The environment is read here, at the launch edge; the library only takes arguments."""
    v = os.environ.get("FP4COMM_NVLINK_TIMEOUT_S")
    return float(v) if v else default


def init_distributed(timeout_s: float = 300.0) -> DistEnv:
    """Initialize the default process group from the launcher's environment and set the
    CUDA device. A single process without a launcher gets a 1-rank gloo/nccl group."""
    info = detect()
    if info.launcher in ("openmpi", "mpich", "slurm"):
        _mpi_master(info)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    if not dist.is_initialized():
        dist.init_process_group(
            info.backend,
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
            **({"device_id": info.device} if info.backend == "nccl" else {}),
        )
    info.master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return info


def spawn_local(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 600.0) -> None:
    """Run ``fn(*args)`` on ``world_size`` local processes that look like a torchrun launch
    (used by the demo / benchmark when started without a launcher)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _spawn_entry, args=(world_size, port, backend, fn, args), nprocs=world_size, join=True, start_method="spawn"
    )


def _spawn_entry(rank, world_size, port, backend, fn, args):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FP4COMM_DIST_BACKEND=backend,
    )  # fmt: skip
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    fn(*args)
