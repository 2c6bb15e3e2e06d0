"""Host time per phase and GPU time per kernel of ``EPBuffer.dispatch`` / ``combine``, old vs
new host paths side by side (the successor of the ad-hoc ``.dev/prof2.py``).

GPUs (one process per GPU, ~1-2 minutes on 4 H200 including NVSHMEM start and compiles)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node=4 benchmarks/profile_ep.py

Variants (the same buffer, knobs flipped between runs; identical kernels except ``symmem*``):

* ``jit``: every launch through ``kernel[grid]`` (``fp4comm._launch.ENABLED = False``),
  NCCL count all-gather, dispatch checks the flag status at its end: the old path;
* ``cached``: cached direct launches (``fp4comm._launch``), otherwise as ``jit``;
* ``symmem`` (nvlink only): + count exchange through symmetric memory
  (``backend_nvlink.META_EXCHANGE = "symmem"``);
* ``symmem_defer`` (nvlink only): + the dispatch's flag status read at the next host sync
  (``backend_nvlink.DEFER_DISPATCH_CHECK = True``);
* ``best`` / ``send_meta``: the default kernel mix (``KERNELS = "best"``) with the
  ``symmem_defer`` host path, and with the rows sent right after the count exchange
  (``backend_nvlink.SEND_WITH_META``; the default);
* ``send_v2``: ``send_meta`` with every v2 kernel (``KERNELS = "v2"``);
* ``send_rowwise``: ``send_meta`` with the expert-side combine in received-row order
  (``fp4comm.ep.buffer.COMBINE_SPREAD = False``; every other variant takes the sources in turn);
* ``kernels_v2``: the current host defaults (``cached``, and ``symmem_defer`` on nvlink) with
  the v2 kernels (``fp4comm.ep.buffer.KERNELS = "v2"``: parallel layout, 16-byte row stores
  in pack / combine, hoisted loads, permute phase changes); compare its kernel table with
  ``cached`` / ``symmem_defer`` (v1 kernels, same host path). Time just these with
  ``--variants cached,symmem_defer,kernels_v2``.

Per (backend, variant, T): ``host`` = time until the call returns (device idle before),
``wall`` = until the device is idle again (the slowest rank's, like ``bench_dispatch.py``),
host time per phase (rank 0; nested phases are included in their parents: ``be.dispatch_rows``
contains ``pack_rows``), and per-kernel GPU time from ``torch.profiler`` (rank 0, us per call).
Output: tables on stdout and ``--out`` (default ``results/profile_ep.json``).

CPU smoke run (no launcher: 2 gloo ranks, interpreter kernels, tiny shapes, no GPU table)::

    TRITON_INTERPRET=1 python benchmarks/profile_ep.py --hidden 64 --experts 8 --topk 2 \
        --tokens 8 --iters 1 --warmup 1 --profile-iters 1
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent / "launch"))
import dist_env  # noqa: E402

VARIANTS = {
    "torch": ["jit", "cached", "kernels_v2"],
    "nvlink": ["jit", "cached", "symmem", "symmem_defer", "kernels_v2", "best", "send_meta", "send_rowwise", "send_v2"],
}
#: variant -> (fp4comm._launch.ENABLED, backend_nvlink host variant, fp4comm.ep.buffer.KERNELS,
#: fp4comm.ep.buffer.COMBINE_SPREAD)
KNOBS = {"jit": (False, "baseline", "v1", True), "cached": (True, "baseline", "v1", True),
         "symmem": (True, "symmem", "v1", True), "symmem_defer": (True, "symmem_defer", "v1", True),
         "kernels_v2": (True, "symmem_defer", "v2", True), "best": (True, "symmem_defer", "best", True),
         "send_meta": (True, "send_with_meta", "best", True), "send_rowwise": (True, "send_with_meta", "best", False),
         "send_v2": (True, "send_with_meta", "v2", True)}  # fmt: skip


class PhaseTimer:
    """Wraps module functions / methods with host timers (seconds summed per name)."""

    def __init__(self) -> None:
        self.acc = collections.defaultdict(float)
        self.cnt = collections.Counter()
        self._undo = []

    def wrap(self, owner, attr: str, name: str | None = None) -> None:
        fn = getattr(owner, attr)
        name = name or attr

        @functools.wraps(fn)
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc[name] += time.perf_counter() - t0
                self.cnt[name] += 1

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, fn))

    def wrap_launch(self, module) -> None:
        """Time ``module.launch`` per kernel name."""
        fn = module.launch

        def timed(kernel, grid, *a, **k):
            t0 = time.perf_counter()
            try:
                return fn(kernel, grid, *a, **k)
            finally:
                name = "launch:" + kernel.fn.__name__
                self.acc[name] += time.perf_counter() - t0
                self.cnt[name] += 1

        module.launch = timed
        self._undo.append((module, "launch", fn))

    def reset(self) -> None:
        self.acc.clear()
        self.cnt.clear()

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="torch,nvlink")
    p.add_argument("--tokens", default="128,4096", help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-iters", type=int, default=5)
    p.add_argument("--variants", default="", help="comma list (default: all of each backend)")
    p.add_argument("--timeout-s", type=float, default=20.0)
    p.add_argument("--max-m", type=int, default=None, help="EPConfig.max_m (default: derived per call)")
    p.add_argument("--no-host-sync", action="store_true",
                   help="nvlink: EPBuffer(host_sync=False) (needs --max-m; the send_meta variant only)")
    p.add_argument("--out", default="results/profile_ep.json")
    return p.parse_args(argv)


def _inputs(T, H, E, K, rank, dev):
    g = torch.Generator().manual_seed(rank * 7 + T)
    x = torch.randn(T, H, generator=g).bfloat16().to(dev)
    ids = torch.rand(T, E, generator=g).topk(K, dim=-1).indices.int().to(dev)
    w = torch.rand(T, K, generator=g).to(dev)
    return x, ids, w


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _gpu_kernels(prof, calls: int) -> dict[str, float]:
    """GPU microseconds per call of each kernel name (summed over its launches)."""
    acc = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name] += e.time_range.elapsed_us()
    return {k: v / calls for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}


def _case(buf, T, args, dev, timer, dist):
    """Host/wall times, phases and kernels of one (buffer, variant, T)."""
    x, ids, w = _inputs(T, args.hidden, args.experts, args.topk, dist.get_rank(), dev)
    for _ in range(args.warmup):
        d = buf.dispatch(x, ids, w)
        eo = torch.randn(d.x.shape[0], d.max_m, args.hidden, device=dev).bfloat16()
        buf.combine(eo, d.handle)
    _sync(dev)
    timer.reset()
    t = dict.fromkeys(("dispatch_host", "dispatch_wall", "combine_host", "combine_wall"), 0.0)
    for _ in range(args.iters):
        _sync(dev)
        dist.barrier()
        _sync(dev)
        t0 = time.perf_counter()
        d = buf.dispatch(x, ids, w)
        t1 = time.perf_counter()
        _sync(dev)
        t2 = time.perf_counter()
        dist.barrier()
        _sync(dev)
        t3 = time.perf_counter()
        buf.combine(eo, d.handle)
        t4 = time.perf_counter()
        _sync(dev)
        t5 = time.perf_counter()
        for k, v in (
            ("dispatch_host", t1 - t0),
            ("dispatch_wall", t2 - t0),
            ("combine_host", t4 - t3),
            ("combine_wall", t5 - t3),
        ):
            t[k] += v
    n = args.iters
    phases = {k: (v / n * 1e6, timer.cnt[k] / n) for k, v in sorted(timer.acc.items(), key=lambda kv: -kv[1])}
    vec = torch.tensor([t[k] / n * 1e6 for k in t], dtype=torch.float64, device=dev)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    out = dict(zip(t, vec.tolist(), strict=True))
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(args.profile_iters):
            d = buf.dispatch(x, ids, w)
            buf.combine(eo, d.handle)
        _sync(dev)
    dist.barrier()
    return out, phases, _gpu_kernels(prof, args.profile_iters)


def run(args) -> None:
    import torch.distributed as dist

    import fp4comm._launch as L
    import fp4comm.ep.backend as BE
    import fp4comm.ep.backend_nvlink as NB
    import fp4comm.ep.buffer as B
    import fp4comm.ep.layout as LY
    from fp4comm.ep import EPBuffer

    env = dist_env.init_distributed()
    dev, lead = env.device, env.rank == 0
    tokens = [int(v) for v in args.tokens.split(",")]
    timer = PhaseTimer()
    for name in ("layout_meta", "pack_rows", "permute_rows", "combine_expert", "combine_source", "plan_array"):
        timer.wrap(B, name)
    timer.wrap(BE.HostStager, "put", "plan_stage")
    for mod in (B, LY, NB):
        timer.wrap_launch(mod)
    results = []
    for backend in args.backends.split(","):
        extra = dict(max_m=args.max_m, host_sync=not (args.no_host_sync and backend == "nvlink"))
        buf = EPBuffer(None, args.hidden, args.experts, args.topk, max(tokens), payload="nvfp4", backend=backend,
                       timeout_s=args.timeout_s, **extra)  # fmt: skip
        for m in ("exchange_meta", "exchange_meta_and_send", "dispatch_rows", "combine_rows", "check"):  # this instance only
            timer.wrap(buf.backend, m, "be." + m)
        timer.wrap(buf, "_validate_dispatch", "validate_dispatch")
        variants = [v for v in VARIANTS[backend] if not args.variants or v in args.variants.split(",")]
        saved = L.ENABLED, NB.META_EXCHANGE, NB.DEFER_DISPATCH_CHECK, NB.SEND_WITH_META, B.KERNELS, B.COMBINE_SPREAD
        for T in tokens:
            for variant in variants:
                L.ENABLED, host, B.KERNELS, B.COMBINE_SPREAD = KNOBS[variant]
                NB.set_host_variant(host)  # the torch backend ignores it
                times, phases, kernels = _case(buf, T, args, dev, timer, dist)
                results.append(
                    dict(backend=backend, variant=variant, tokens=T, **times, phases=phases, kernels=kernels)
                )
                if lead:
                    _print_case(results[-1])
        L.ENABLED, NB.META_EXCHANGE, NB.DEFER_DISPATCH_CHECK, NB.SEND_WITH_META, B.KERNELS, B.COMBINE_SPREAD = saved
        buf.destroy()
    timer.restore()
    if lead:
        _summary(results)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(env=env.describe(), args=vars(args), results=results), indent=1))
        print(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()


def _print_case(r) -> None:
    print(f"\n#### backend={r['backend']} variant={r['variant']} T={r['tokens']}: dispatch host {r['dispatch_host']:.0f} "
          f"wall {r['dispatch_wall']:.0f} us | combine host {r['combine_host']:.0f} wall {r['combine_wall']:.0f} us", flush=True)  # fmt: skip
    print("  host phases (rank 0, us/iter, calls/iter):")
    for k, (us, c) in r["phases"].items():
        print(f"    {k:36s} {us:8.1f}  ({c:.1f})")
    print("  GPU kernels (rank 0, us per dispatch+combine):")
    for k, us in list(r["kernels"].items())[:14]:
        print(f"    {k[:60]:60s} {us:8.1f}")


def _summary(results) -> None:
    print("\n#### summary (us; host = until the call returns, wall = until the device is idle; max over ranks)")
    print(
        f"{'backend':8s} {'variant':13s} {'T':>5s} {'disp host':>10s} {'disp wall':>10s} {'comb host':>10s} {'comb wall':>10s}"
    )
    for r in results:
        print(f"{r['backend']:8s} {r['variant']:13s} {r['tokens']:5d} {r['dispatch_host']:10.0f} {r['dispatch_wall']:10.0f} "
              f"{r['combine_host']:10.0f} {r['combine_wall']:10.0f}")  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    if dist_env.detect().launcher != "none":
        run(args)
        return
    print("[profile_ep] no launcher: spawning 2 gloo ranks (CPU smoke run)", flush=True)
    dist_env.spawn_local(run, 2, args, backend="gloo")


if __name__ == "__main__":
    main()
