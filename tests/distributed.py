"""The one helper for multi-rank tests: spawn N ranks from inside pytest.

``DistributedPool(world_size, backend)`` starts ``world_size`` worker processes
(``torch.multiprocessing`` spawn, a free localhost port, ``init_process_group`` with a
timeout) that stay alive and run test functions on request::

    def _check(pg: ProcessGroup, n):          # module level, so children can import it
        assert pg.world_size == 2
        return pg.rank * n

    def test_x(dist_pool):
        assert dist_pool(2).run(_check, 3) == [0, 3]

``run`` returns each rank's return value (must be picklable), and raises ``AssertionError``
with every failing rank's traceback if any rank raised. If a rank does not answer within
the timeout (a hang in a collective) or dies, the pool is killed and the error says which
ranks were missing; the next ``dist_pool(n)`` call starts a fresh pool.
Backend ``"nccl"`` puts rank ``i`` on ``cuda:i`` (tests skip below ``world_size`` GPUs).
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

#: seconds a single ``run`` may take on every rank before the pool is declared hung
DEFAULT_TIMEOUT = float(os.environ.get("FP4COMM_TEST_TIMEOUT", "120"))
#: seconds the other ranks get to finish once one rank has failed
ERROR_GRACE = 20.0


@dataclass
class ProcessGroup:
    """What a test function gets on each rank."""

    rank: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    device: torch.device
    group: object = None  # the default group (None works for every torch.distributed call)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, backend: str, port: int, timeout_s: float, tasks, results) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        pg = ProcessGroup(rank, world_size, backend, device)
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            out = fn(pg, *args, **kwargs)
            results.put((rank, "ok", out))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


class DistributedPool:
    """``world_size`` long-lived ranks that run test functions (see module docstring)."""

    def __init__(self, world_size: int, backend: str = "gloo", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.world_size, self.backend, self.timeout = world_size, backend, timeout
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, backend, port, timeout, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.alive = True
        self._collect("start-up", self.timeout)

    def _collect(self, what: str, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        got: dict[int, tuple[str, object]] = {}
        while len(got) < self.world_size:
            try:
                rank, status, value = self._results.get(timeout=0.5)
                got[rank] = (status, value)
                if status == "error":  # the others may be stuck in a collective: do not wait long
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE)
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got]
            if dead or time.monotonic() > deadline:
                self.close(kill=True)
                missing = sorted(set(range(self.world_size)) - set(got))
                why = f"rank(s) {dead} died" if dead else "no answer in time (hang in a collective?)"
                errs = "".join(f"\n--- rank {r} ---\n{v}" for r, (s, v) in sorted(got.items()) if s == "error")
                raise AssertionError(f"{what}: {why}; missing ranks {missing}{errs}")
        errors = {r: v for r, (s, v) in got.items() if s == "error"}
        if errors:
            msg = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{what} failed on rank(s) {sorted(errors)}:{msg}")
        return [got[r][1] for r in range(self.world_size)]

    def run(self, fn, *args, timeout: float | None = None, **kwargs) -> list:
        """Run ``fn(pg, *args, **kwargs)`` on every rank; return the per-rank results."""
        if not self.alive:
            raise RuntimeError("DistributedPool: closed")
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", "task"), timeout or self.timeout)

    def close(self, kill: bool = False) -> None:
        if not self.alive:
            return
        self.alive = False
        if not kill:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = DEFAULT_TIMEOUT, **kwargs):
    """One-shot: spawn ``world_size`` ranks, run ``fn(pg, *args, **kwargs)``, tear down."""
    pool = DistributedPool(world_size, backend, timeout)
    try:
        return pool.run(fn, *args, **kwargs)
    finally:
        pool.close()


def backend_params(world_sizes=(2, 4)):
    """``pytest.param`` list of ``(world_size, backend)``: gloo always, nccl marked
    ``multigpu`` and skipped below ``world_size`` GPUs."""
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = []
    for n in world_sizes:
        out.append(pytest.param(n, "gloo", id=f"gloo{n}"))
        out.append(
            pytest.param(
                n,
                "nccl",
                id=f"nccl{n}",
                marks=[
                    pytest.mark.multigpu,
                    pytest.mark.skipif(n_gpus < n, reason=f"needs {n} CUDA GPUs"),
                ],
            )
        )
    return out


@pytest.fixture(scope="module")
def dist_pool():
    """``dist_pool(world_size, backend="gloo")`` -> a live :class:`DistributedPool`, shared by
    the tests of one module and restarted if a previous test killed it."""
    pools: dict[tuple[int, str], DistributedPool] = {}

    def get(world_size: int, backend: str = "gloo") -> DistributedPool:
        key = (world_size, backend)
        if key not in pools or not pools[key].alive:
            for k, p in list(pools.items()):  # at most one pool alive: 2 shared cores in CI
                if k != key:
                    p.close()
                    del pools[k]
            pools[key] = DistributedPool(world_size, backend)
        return pools[key]

    yield get
    for p in pools.values():
        p.close()
