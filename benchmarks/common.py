"""Helpers shared by the benchmarks: timing across ranks, stats, tables, JSON/CSV/PNG output,
a progress bar. Optional packages (tabulate, tqdm, matplotlib) are used when present and
replaced by plain fallbacks (or a printed note, for plots) when not."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_kernel_us(fn: Callable[[], object], reps: int = 100, flush_mb: int = 256, flush: str = "read") -> list[float]:
    """GPU time (us) of one call of ``fn``, ``reps`` samples: ``fn`` is captured once in a CUDA
    graph and each replay is timed by events after a ``flush_mb`` pass that evicts L2.

    ``flush``: ``"read"`` (default) reads a ``flush_mb`` buffer, so L2 is cold *and clean*
    when ``fn`` starts: it pays for its own bytes only. ``"write"`` zero-fills the buffer
    (``triton.testing.do_bench``'s flush); that leaves L2 full of dirty lines (up to 50 MB
    on H100/H200) which ``fn``'s own misses must write back to HBM first. Measured on H200:
    a 268 MB cache write 73.0 us ("write") vs 69.2 ("read"), a 1 GB copy 794 vs 791 us.

    Replaying the graph leaves out the host's Python and launch overhead. Timing eager calls
    after the flush (``triton.testing.do_bench``) measures that overhead instead of the
    kernels whenever it exceeds the flush's ~70 us (e.g. a 30 us quantize or a 60 us cache
    write whose Python wrapper validates its inputs). ``fn`` must not sync the host."""
    if flush not in ("read", "write"):
        raise ValueError(f"flush: 'read' or 'write', got {flush!r}")
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    buf = torch.zeros(flush_mb << 18, dtype=torch.float32, device="cuda")
    evict = buf.zero_ if flush == "write" else buf.amax
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for _ in range(5):
        graph.replay()
    for start, end in events:
        evict()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e3 for start, end in events]


def time_op(fn: Callable[[], object], device: torch.device, *, iters: int, warmup: int, group=None, barrier=True) -> list[float]:
    """Wall-clock microseconds of ``fn()`` per iteration on this rank, device synchronized
    before and after each call, ranks aligned with a barrier before each iteration (so one
    iteration measures one collective op end to end, host syncs included).
    Returns ``iters`` samples."""
    import torch.distributed as dist

    out = []
    for i in range(warmup + iters):
        sync(device)
        if barrier and dist.is_initialized():
            dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = (time.perf_counter() - t0) * 1e6
        if i >= warmup:
            out.append(dt)
    return out


def time_back_to_back(fn: Callable[[], object], device: torch.device, *, iters: int, warmup: int, group=None) -> float:
    """Microseconds per call of ``iters`` back-to-back calls of ``fn()`` on this rank (device
    synchronized and ranks aligned once before, synchronized once after): the cost of a call
    when the host may run ahead of the device, as in a model's forward pass."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    sync(device)
    if dist.is_initialized():
        dist.barrier(group=group)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e6 / max(iters, 1)


def max_over_ranks(samples: list[float], device: torch.device, group=None) -> list[float]:
    """Per-iteration maximum over ranks (the slowest rank defines a collective's time)."""
    import torch.distributed as dist

    t = torch.tensor(samples, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.cpu().tolist()


def stats_us(samples: list[float]) -> dict:
    """mean, std, median, min of microsecond samples."""
    return {
        "mean_us": statistics.fmean(samples),
        "std_us": statistics.pstdev(samples) if len(samples) > 1 else 0.0,
        "median_us": statistics.median(samples),
        "min_us": min(samples),
    }


def gbps(nbytes: float, us: float) -> float:
    """GB/s (1e9 bytes) for ``nbytes`` moved in ``us`` microseconds."""
    return nbytes / (us * 1e3) if us > 0 else float("nan")


# ----------------------------------------------------------------------------- output
def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, header). Floats get 4 significant digits; tabulate if installed."""

    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
        return str(v)

    body = [[fmt(r.get(k, "")) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    try:
        from tabulate import tabulate

        return tabulate(body, headers=heads, tablefmt="github", disable_numparse=True)
    except ImportError:
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
        line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        return "\n".join([line(heads), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def environment() -> dict:
    """Machine description stored with every result file."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["num_gpus"] = torch.cuda.device_count()
    return info


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def plot_lines(path: Path, panels: list[dict], title: str = "") -> Path | None:
    """One PNG with a subplot per panel: ``{"title", "xlabel", "ylabel", "series": {label:
    (xs, ys)}, "logx": bool, "hline": float | None}``. Returns None (and prints a note) when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib not installed, skipped the plot {path} (pip install matplotlib)", flush=True)
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for label, (xs, ys) in p["series"].items():
            ax.plot(xs, ys, marker="o", label=label)
        if p.get("logx"):
            ax.set_xscale("log", base=2)
        if p.get("hline") is not None:
            ax.axhline(p["hline"], color="grey", linestyle="--", linewidth=1)
        ax.set_title(p.get("title", ""))
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_ylabel(p.get("ylabel", ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- progress
def progress(items: Iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    """tqdm when installed (and ``enabled``), else a one-line-per-step counter on stderr."""
    items = list(items)
    total = len(items) if total is None else total
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        return
    except ImportError:
        pass
    t0 = time.perf_counter()
    for i, it in enumerate(items):
        print(f"\r{desc} {i}/{total} ({time.perf_counter() - t0:.0f}s)", end="", file=sys.stderr, flush=True)
        yield it
    print(f"\r{desc} {total}/{total} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
