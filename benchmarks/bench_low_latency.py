"""Low-latency (decode) dispatch / combine sweep: NVLink peer stores vs the torch fallback.

Launch one process per GPU (NVSHMEM needs ``NVSHMEM_SYMMETRIC_SIZE`` big enough for
``2 * E_local * R * T_max`` dispatch rows, set below when unset)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node=4 benchmarks/bench_low_latency.py --backends nvlink,torch

Each iteration: dispatch (send + receive halves, BF16 in -> masked ``payload`` layout),
then combine (BF16 wire by default) of the received rows, timed with CUDA events around
each; median over iterations, slowest rank, rank 0 prints. Two modes per backend:
``eager`` (Python calls: the events then also see the host's launch time whenever it is
longer than the GPU work) and, for ``nvlink``, ``graph``: dispatch and combine captured once
into two CUDA graphs and replayed back to back (how a decode step runs them), so the events
measure the GPU side: kernels, NVLink stores and the flag waits. Bytes: rows sent to *other* ranks
(dispatch: ``(token, expert)`` pairs whose expert lives elsewhere x row bytes; combine: one
partial row per (token, other rank it went to); the rank's own rows move through local
HBM); GB/s per GPU = those bytes / time. Targets (issue 4, 4x H200,
H=7168, top-8, 256 experts): dispatch 128 tok <= 25 us, combine 128 tok <= 45 us,
dispatch 512 tok <= 55 us.

Kernel variants (``LowLatencyConfig.variant``, same bits): ``--variants v1,v2`` times each
on the same inputs, rows side by side (``variant`` column); ``--graph-only`` skips the
eager rows. The old-vs-new comparison on 4 GPUs::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node=4 benchmarks/bench_low_latency.py --backends nvlink \\
        --tokens 1,128,512 --variants v1,v2 --graph-only
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def _routing(T, E, K, gen, device):
    scores = torch.rand(T, E, generator=gen)
    ids = scores.topk(K, dim=1).indices.int()
    w = torch.rand(T, K, generator=gen)
    return ids.to(device), (w / w.sum(1, keepdim=True)).to(device)


def _inputs(buf, T, seed):
    """Tokens and routing of one sweep point (the same for both modes)."""
    gen = torch.Generator().manual_seed(seed + buf.rank)
    x = torch.randn(T, buf.config.hidden, generator=gen).bfloat16().to(buf.device)
    ids, w = _routing(T, buf.config.num_experts, buf.config.num_topk, gen, buf.device)
    return x, ids, w


def _expert_out(buf, out, seed):
    # made on the GPU: [E_local, max_m, H] is ~1e9 values at EP4 (minutes on one CPU core)
    g = torch.Generator(device=buf.device).manual_seed(seed + buf.rank)
    return torch.randn(*out.x.shape[:2], buf.config.hidden, generator=g, device=buf.device, dtype=torch.bfloat16)


def _result(buf, T, ids, ev):
    """Median dispatch / combine microseconds of the events ``(start, dispatched, combined)``
    and the bytes this rank sent to peers."""
    torch.cuda.synchronize()
    buf.check()
    td = torch.tensor([a.elapsed_time(b) * 1e3 for a, b, _ in ev]).median().item()
    tc = torch.tensor([b.elapsed_time(c) * 1e3 for _, b, c in ev]).median().item()
    wire = buf.wire_bytes(ids)  # to peers: one row per (token, rank) each way + dispatch index entries
    return dict(tokens=T, dispatch_us=td, combine_us=tc, dispatch_bytes=wire["dispatch"], combine_bytes=wire["combine"])


def _events(iters):
    return [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(iters)]


def run_one(buf, T, iters, warmup, seed):
    """Eager Python calls, one dispatch + combine an iteration."""
    x, ids, w = _inputs(buf, T, seed)
    eo = None
    ev = _events(iters)
    for i in range(warmup + iters):
        if i == warmup:
            torch.cuda.synchronize()
            dist.barrier()
        e = ev[i - warmup] if i >= warmup else None
        if e:
            e[0].record()
        out = buf.dispatch(x, ids, w)
        if e:
            e[1].record()
        if eo is None:
            eo = _expert_out(buf, out, seed)
        buf.combine(eo, out.handle)
        if e:
            e[2].record()
    return _result(buf, T, ids, ev)


def run_graph(buf, T, iters, warmup, seed):
    """Like :func:`run_one`, with dispatch and combine replayed from two CUDA graphs."""
    dev = buf.device
    x, ids, w = _inputs(buf, T, seed)
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):  # eager warm-up off the default stream, as capture wants
        out = buf.dispatch(x, ids, w)
        eo = _expert_out(buf, out, seed)
        buf.combine(eo, out.handle)
    torch.cuda.current_stream(dev).wait_stream(s)
    torch.cuda.synchronize()
    gd, gc = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(gd):
        out = buf.dispatch(x, ids, w)
    with torch.cuda.graph(gc):
        buf.combine(eo, out.handle)
    torch.cuda.synchronize()
    dist.barrier()
    for _ in range(warmup):
        gd.replay()
        gc.replay()
    torch.cuda.synchronize()
    dist.barrier()
    ev = _events(iters)
    for e in ev:  # queued back to back: the GPU, not the host, sets the pace
        e[0].record()
        gd.replay()
        e[1].record()
        gc.replay()
        e[2].record()
    return _result(buf, T, ids, ev)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,32,128,256,512")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--payload", default="nvfp4", choices=["nvfp4", "fp8", "bf16"])
    ap.add_argument("--combine-payload", default="bf16", choices=["nvfp4", "fp8", "bf16"])
    ap.add_argument("--backends", default="nvlink,torch")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default="results")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows of the nvlink backend")
    ap.add_argument("--graph-only", action="store_true", help="nvlink backend: only the CUDA-graph rows")
    ap.add_argument("--variants", default="v1", help="dispatch receive variants to time side by side, e.g. v1,v2")
    args = ap.parse_args(argv)
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "16G")  # launch edge
    dist.init_process_group("nccl")
    rank, R = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda", torch.cuda.current_device())
    from fp4comm.ep.low_latency import LowLatencyBuffer, LowLatencyConfig
    from fp4comm.ep.symmem import finalize, init_nvshmem

    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    mem = None
    if args.graph_only and args.no_graph:
        ap.error("--graph-only and --no-graph exclude each other")
    for backend, variant in [(b, v) for b in args.backends.split(",") for v in args.variants.split(",")]:
        cfg = LowLatencyConfig(
            hidden=args.hidden, num_experts=args.experts, num_topk=args.topk, max_tokens_per_rank=max(tokens),
            payload=args.payload, combine_payload=args.combine_payload, variant=variant,
        )  # fmt: skip
        if backend == "nvlink":
            mem = mem or init_nvshmem(None, dev)
            buf = LowLatencyBuffer(cfg, mem=mem, sync_check=False)
        else:
            buf = LowLatencyBuffer(cfg, backend="torch", device=dev, sync_check=False)
        modes = ["eager", "graph"] if (backend == "nvlink" and not args.no_graph) else ["eager"]
        if backend == "nvlink" and args.graph_only:
            modes = ["graph"]
        for mode, T in [(m, t) for m in modes for t in tokens]:
            fn = run_graph if mode == "graph" else run_one
            try:
                r = fn(buf, T, args.iters, args.warmup, seed=T)
            except RuntimeError as exc:  # e.g. capture unsupported here: report, keep the eager rows
                if mode != "graph":
                    raise
                print(f"[bench_low_latency] rank {rank}: graph mode failed at T={T}: {exc}", flush=True)
                r = dict(tokens=T, dispatch_us=float("nan"), combine_us=float("nan"), dispatch_bytes=0, combine_bytes=0)
            allr = [None] * R
            dist.all_gather_object(allr, r)
            d_us = max(a["dispatch_us"] for a in allr)
            c_us = max(a["combine_us"] for a in allr)
            d_b = sum(a["dispatch_bytes"] for a in allr) / R
            c_b = sum(a["combine_bytes"] for a in allr) / R
            rows.append(
                dict(
                    backend=backend, variant=variant, mode=mode, ranks=R, tokens=T, hidden=args.hidden,
                    experts=args.experts,
                    topk=args.topk,
                    payload=args.payload, combine_payload=args.combine_payload,
                    dispatch_us=round(d_us, 2), combine_us=round(c_us, 2),
                    dispatch_MB=round(d_b / 1e6, 3), combine_MB=round(c_b / 1e6, 3),
                    dispatch_GBps=round(d_b / d_us / 1e3, 1), combine_GBps=round(c_b / c_us / 1e3, 1),
                )
            )  # fmt: skip
        buf.destroy()
    if rank == 0:
        cols = list(rows[0])
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(str(r[c]) for c in cols))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_low_latency.json").write_text(json.dumps(rows, indent=2))
        with open(out / "bench_low_latency.csv", "w") as f:
            f.write(",".join(cols) + "\n")
            for r in rows:
                f.write(",".join(str(r[c]) for c in cols) + "\n")
        print(f"wrote {out / 'bench_low_latency.json'} and .csv")
    if mem is not None:
        torch.cuda.synchronize()
        mem.close()
        finalize()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
