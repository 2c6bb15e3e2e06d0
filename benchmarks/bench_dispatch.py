"""EP dispatch / combine benchmark: NVFP4 vs FP8 vs BF16 payloads, per backend, against the raw
BF16 ``all_to_all_single`` of the same tokens, over tokens per rank.

GPUs (all GPUs of the node, DeepSeek-V3 shapes H=7168, top-8, 256 experts by default)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node=4 benchmarks/bench_dispatch.py --backend all

CPU (no launcher: spawns 2 gloo ranks with small shapes, ~1-2 minutes)::

    python benchmarks/bench_dispatch.py

``--quick``: tokens 128,1024,4096 and 10 iterations (short GPU runs). ``--backend all`` runs
every registered backend, ``torch`` first; each (backend, payload) case is isolated (an
error is recorded in ``skipped`` and the next case runs) and ``dispatch.json`` /
``dispatch.csv`` are rewritten after every case, so a backend that hangs (killed by the
caller's ``timeout``) leaves the results of the cases before it on disk.
``--host-sync off`` (or ``both``): the nvlink buffer with ``host_sync=False`` (dispatch does not
wait for the count exchange; ``max_m`` fixed to the largest per-expert count of the benchmark's
routings, rounded up to 128), in rows labelled ``nvlink-nosync``.
``--combine-payloads bf16,fp8,nvfp4`` times combine once per combine wire format and reports
each quantized wire's error against the bf16 wire on the same expert outputs (``wire SQNR
dB``, ``wire max rel err``: largest error / largest output, over every rank).

What is measured, per (backend, payload, tokens T per rank):
* dispatch: ``EPBuffer.dispatch`` end to end: BF16 ``[T, H]`` in -> masked per-expert layout
  out (count exchange, fused quantize+pack, transport, permute); combine: ``EPBuffer.combine``
  of a ``[E_local, max_m, H]`` BF16 expert output back to ``[T, H]``;
* baseline: one ``all_to_all_single`` of the same message rows as plain BF16 tokens
  (``2H`` bytes a row, no metadata, no quantization, no permute; split sizes known).
Each iteration: device sync + barrier, time the op, device sync; the per-iteration time is
the slowest rank's; reported as mean +- std over iterations (us). ``back-to-back us``
(dispatch): ``iters`` dispatches in a row with one sync at the end, per call, slowest rank:
what a call costs when the host may run ahead (``host_sync=False`` lets it).
Bytes on the wire: message rows this rank sends to *other* ranks x row bytes (own-rank rows
stay in local memory), averaged over ranks; GB/s per rank = those bytes / mean time.
Speed-up columns: BF16-payload time / this payload's time (same backend, same op), and raw
BF16 all-to-all time / this dispatch time.

Output: a table on stdout, and ``--out`` (default ``results/dispatch``) ``dispatch.json``,
``dispatch.csv``, ``dispatch.png`` (bandwidth and speed-up vs tokens; needs matplotlib).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent / "launch"))
import common  # noqa: E402
import dist_env  # noqa: E402

GPU_DEFAULTS = dict(hidden=7168, experts=256, topk=8, tokens="128,256,512,1024,2048,4096,8192", iters=20, warmup=5)
CPU_DEFAULTS = dict(hidden=512, experts=32, topk=4, tokens="32,64,128,256,512", iters=8, warmup=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, help="H (default 7168 on GPUs, 512 on CPU)")
    p.add_argument("--experts", type=int, help="E (default 256 on GPUs, 32 on CPU)")
    p.add_argument("--topk", type=int, help="K (default 8 on GPUs, 4 on CPU)")
    p.add_argument("--tokens", type=str, help="comma-separated tokens per rank (GPU default 128..8192)")
    p.add_argument("--payloads", type=str, default="nvfp4,fp8,bf16")
    p.add_argument("--backend", default="torch", help="torch | nvlink | all (registered backends)")
    p.add_argument("--scale-layout", default="swizzled", choices=["swizzled", "linear"])
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/dispatch"))
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when started without a launcher")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--combine-payloads", type=str, default="bf16", help="combine wire formats: bf16,fp8,nvfp4")
    p.add_argument("--host-sync", default="on", choices=["on", "off", "both"],
                   help="nvlink: dispatch waits for the count exchange (on, the default), or not (off: EPBuffer("
                        "host_sync=False) with max_m fixed from the benchmark's routing; rows labelled nvlink-nosync)")
    p.add_argument("--quick", action="store_true", help="tokens 128,1024,4096, 10 iterations, 3 warm-up")
    p.add_argument("--timeout-s", type=float, default=None,
                   help="nvlink flag-wait timeout (default: FP4COMM_NVLINK_TIMEOUT_S via launch/dist_env.py, else 60)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens = args.tokens or "128,1024,4096"
        args.iters = args.iters or 10
        args.warmup = args.warmup or 3
    if args.timeout_s is None:
        args.timeout_s = dist_env.ep_timeout_s()
    gpu = torch.cuda.is_available()
    for k, v in (GPU_DEFAULTS if gpu else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.token_list = [int(t) for t in str(args.tokens).split(",") if t]
    args.payload_list = [p for p in args.payloads.split(",") if p]
    # bf16 first: the quantized wires' error is measured against its output
    args.cpayload_list = sorted((p for p in args.combine_payloads.split(",") if p), key=lambda p: p != "bf16")
    return args


def _routing(T, E, K, seed, rank, device):
    """Uniform random top-k routing (a softmax gate over random scores), weights sum to 1."""
    g = torch.Generator().manual_seed(seed * 7919 + rank * 131 + T)
    scores = torch.rand(T, E, generator=g)
    w, ids = torch.softmax(scores, -1).topk(K, dim=-1)
    return ids.int().to(device), (w / w.sum(-1, keepdim=True)).float().to(device)


def _backends(choice: str) -> list[str]:
    from fp4comm.ep import BACKENDS

    if choice == "all":
        return list(BACKENDS)
    return [b for b in choice.split(",") if b]


def run(args) -> None:
    import torch.distributed as dist

    from fp4comm.ep import EPBuffer, get_backend_class
    from fp4comm.ep.layout import get_dispatch_layout

    env = dist_env.init_distributed()
    rank, R, dev = env.rank, env.world_size, env.device
    lead = rank == 0
    H, E, K = args.hidden, args.experts, args.topk
    Tmax = max(args.token_list)
    if lead:
        print(f"[bench_dispatch] {env.describe()}", flush=True)
        print(f"[bench_dispatch] H={H} E={E} top-{K} ranks={R} tokens/rank={args.token_list} "
              f"payloads={args.payload_list} iters={args.iters} warmup={args.warmup}", flush=True)  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed + rank)

    def mean_over_ranks(v: float) -> float:
        t = torch.tensor([float(v)], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return float(t) / R

    def timed(fn, back_to_back=False):
        """Per-call stats (slowest rank); ``back_to_back``: also ``back_to_back_us``."""
        st = common.stats_us(common.max_over_ranks(common.time_op(fn, dev, iters=args.iters, warmup=args.warmup), dev))
        if back_to_back:
            b2b = common.time_back_to_back(fn, dev, iters=args.iters, warmup=1)
            st["back_to_back_us"] = common.max_over_ranks([b2b], dev)[0]
        return st

    results: list[dict] = []
    skipped: list[str] = []
    # ---- baseline: raw BF16 all_to_all_single of the same message rows
    tokens = {}
    for T in args.token_list:
        x = torch.randn(T, H, generator=gen).bfloat16().to(dev)
        ids, w = _routing(T, E, K, args.seed, rank, dev)
        lay = get_dispatch_layout(ids, E, R)
        send_counts = lay.num_tokens_per_rank.long()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        sc, rc = send_counts.tolist(), recv_counts.tolist()
        order = torch.cat([torch.nonzero(lay.is_token_in_rank[:, r]).flatten() for r in range(R)])
        tokens[T] = (x, ids, w, sc, rc)
        send = x[order].contiguous().view(torch.uint8)
        recv = torch.empty(sum(rc), 2 * H, dtype=torch.uint8, device=dev)
        st = timed(lambda send=send, recv=recv, sc=sc, rc=rc: dist.all_to_all_single(recv, send, rc, sc), True)
        peer_rows = mean_over_ranks(sum(sc) - sc[rank])
        nbytes = peer_rows * 2 * H
        results.append(dict(backend="raw_a2a", payload="bf16", op="dispatch", tokens=T, bytes_per_rank=nbytes,
                            gbps_per_rank=common.gbps(nbytes, st["mean_us"]), rows_to_peers=peer_rows, **st))  # fmt: skip

    # ---- EPBuffer per backend, payload and combine wire (dispatch timed with the first wire)
    # host_sync=False needs a fixed max_m: the largest per-expert count of these routings, rounded up
    # to 128 (what a user calibrates); the synced buffers derive theirs per call
    counts = torch.zeros(E, dtype=torch.int64, device=dev)
    for T in args.token_list:
        c = torch.bincount(tokens[T][1].flatten().long(), minlength=E)
        dist.all_reduce(c)
        counts = torch.maximum(counts, c)
    fixed_max_m = -(-max(int(counts.max()), 1) // 128) * 128
    cases = []
    for b in _backends(args.backend):
        for p in args.payload_list:
            if b != "nvlink" or args.host_sync in ("on", "both"):
                cases.append((b, p, True))
            if b == "nvlink" and args.host_sync in ("off", "both"):
                cases.append((b, p, False))
    if lead and any(not c[2] for c in cases):
        print(f"[bench_dispatch] nvlink-nosync: host_sync=False, max_m={fixed_max_m}", flush=True)
    show = lead and not args.no_progress
    for backend, payload, host_sync in common.progress(cases, desc="bench_dispatch", enabled=show):
        bf16_y: dict = {}  # T -> this rank's combine output over the bf16 wire (quantized wires compare)
        label = backend if host_sync else backend + "-nosync"
        for ci, cpayload in enumerate(args.cpayload_list):
            try:
                get_backend_class(backend)
                extra = {} if host_sync else dict(host_sync=False, max_m=fixed_max_m)
                buf = EPBuffer(None, H, E, K, Tmax, payload=payload, backend=backend, scale_layout=args.scale_layout,
                               combine_payload=cpayload, timeout_s=args.timeout_s, **extra)  # fmt: skip
            except (ImportError, RuntimeError, ValueError) as exc:
                msg = f"skipped backend={label} payload={payload} combine={cpayload}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                skipped.append(msg)
                if lead:
                    print(f"\n[bench_dispatch] {msg}", flush=True)
                continue
            try:
                with buf:
                    _bench_case(args, buf, label, payload, cpayload, ci == 0, tokens, timed, mean_over_ranks, results,
                                dev, rank, bf16_y)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - one case failing must not lose the others
                msg = f"failed backend={label} payload={payload} combine={cpayload}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                skipped.append(msg)
                print(f"\n[bench_dispatch] rank {rank}: {msg}", flush=True)
            if lead:
                _write_tables(args, results, skipped, env, R)

    if lead:
        _report(args, results, skipped, env, R)
    dist.barrier()
    dist.destroy_process_group()


def _wire_error(y, ref, dev) -> dict:
    """Error of a quantized combine wire: its output ``y`` against the bf16 wire's ``ref``
    (same inputs), over every rank: SQNR in dB and the largest error relative to the largest
    output (``fp4comm.moe.accuracy``'s metrics)."""
    import torch.distributed as dist

    d = y.double() - ref.double()
    sums = torch.stack([ref.double().pow(2).sum(), d.pow(2).sum()]).to(dev)
    peaks = torch.stack([d.abs().max(), ref.double().abs().max()]).to(dev) if y.numel() else torch.zeros(2, device=dev)
    dist.all_reduce(sums)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    signal, noise = sums.tolist()
    err, top = peaks.tolist()
    return dict(wire_sqnr_db=10 * math.log10(signal / noise) if noise else float("inf"),
                wire_max_rel_err=err / top if top else 0.0)  # fmt: skip


def _bench_case(args, buf, backend, payload, cpayload, with_dispatch, tokens, timed, mean_over_ranks, results, dev, rank,
                bf16_y):  # fmt: skip
    """Time one buffer over the token counts; append result rows. Expert outputs are drawn
    from a generator seeded by (seed, rank, T), so every combine wire of a dispatch payload
    combines the same values: the bf16 wire's outputs go to ``bf16_y``, a quantized wire's
    row carries its error against them."""
    from fp4comm.ep.message import CombineLayout, MessageLayout

    H = args.hidden
    msg_layout = MessageLayout(payload, H, args.topk)
    crow = CombineLayout(cpayload, H).row_bytes
    for T in args.token_list:
        x, ids, w, sc, rc = tokens[T]
        holder = {}

        def do_dispatch(x=x, ids=ids, w=w):
            holder["d"] = buf.dispatch(x, ids, w)

        if with_dispatch:
            sd = timed(do_dispatch, back_to_back=True)
        else:
            do_dispatch()
        d = holder["d"]
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 65_537 + T)
        eo = torch.randn(d.x.shape[0], d.max_m, H, generator=g).bfloat16().to(dev)
        sc_ = timed(lambda d=d, eo=eo: buf.combine(eo, d.handle))
        y = buf.combine(eo, d.handle)
        if cpayload == "bf16":
            err = {}
            if len(args.cpayload_list) > 1:
                bf16_y[T] = y
        else:
            err = _wire_error(y, bf16_y[T], dev) if T in bf16_y else {}
        plan = d.handle.plan
        peer_rows = mean_over_ranks(plan.num_send - plan.send_counts[rank])
        back_rows = mean_over_ranks(plan.num_recv - plan.recv_counts[rank])
        common_kw = dict(backend=backend, payload=payload, tokens=T)
        if with_dispatch:
            nb = peer_rows * msg_layout.row_bytes
            results.append(dict(**common_kw, op="dispatch", bytes_per_rank=nb, gbps_per_rank=common.gbps(nb, sd["mean_us"]),
                                rows_to_peers=peer_rows, row_bytes=msg_layout.row_bytes,
                                wire_bytes_per_token=msg_layout.wire_bytes, **sd))  # fmt: skip
        nb = back_rows * crow
        results.append(dict(**common_kw, op="combine", combine_payload=cpayload, bytes_per_rank=nb,
                            gbps_per_rank=common.gbps(nb, sc_["mean_us"]), rows_to_peers=back_rows, row_bytes=crow,
                            **err, **sc_))  # fmt: skip
        del d, eo, y, holder


def _write_tables(args, results, skipped, env, R):
    """JSON + CSV of the results so far (rewritten after every case)."""
    meta = dict(hidden=args.hidden, experts=args.experts, topk=args.topk, ranks=R, tokens=args.token_list,
                payloads=args.payload_list, combine_payloads=args.cpayload_list, backend=args.backend,
                iters=args.iters, warmup=args.warmup, scale_layout=args.scale_layout, launcher=env.launcher,
                dist_backend=env.backend, partial=True)  # fmt: skip
    clean = [{k: v for k, v in r.items() if k != "time_us"} for r in results]
    common.write_json(args.out / "dispatch.json", dict(config=meta, results=clean, skipped=skipped))
    common.write_csv(args.out / "dispatch.csv", clean)


def _speedups(results):
    def find(backend, payload, op, T, cp="bf16"):
        for r in results:
            if (r["backend"], r["payload"], r["op"], r["tokens"]) == (backend, payload, op, T) and (
                op != "combine" or r.get("combine_payload", "bf16") == cp
            ):
                return r
        return None

    for r in results:
        if r["backend"] == "raw_a2a":
            continue
        # dispatch: vs the bf16 payload; combine: vs the bf16 combine wire of the same dispatch payload
        if r["op"] == "combine":
            base = find(r["backend"], r["payload"], "combine", r["tokens"], "bf16")
        else:
            base = find(r["backend"], "bf16", r["op"], r["tokens"])
        r["speedup_vs_bf16"] = base["mean_us"] / r["mean_us"] if base else float("nan")
        raw = find("raw_a2a", "bf16", "dispatch", r["tokens"])
        r["speedup_vs_raw_a2a"] = raw["mean_us"] / r["mean_us"] if (raw and r["op"] == "dispatch") else float("nan")
        r["time_us"] = f"{r['mean_us']:.1f} +- {r['std_us']:.1f}"
    for r in results:
        if r["backend"] == "raw_a2a":
            r["time_us"] = f"{r['mean_us']:.1f} +- {r['std_us']:.1f}"


def _report(args, results, skipped, env, R):
    _speedups(results)
    cols = [
        ("backend", "backend"), ("op", "op"), ("payload", "payload"), ("combine_payload", "wire"), ("tokens", "tok/rank"),
        ("time_us", "us (mean +- std)"), ("median_us", "median us"), ("back_to_back_us", "back-to-back us"),
        ("bytes_per_rank", "bytes to peers/rank"),
        ("gbps_per_rank", "GB/s/rank"),
        ("speedup_vs_bf16", "x vs bf16"), ("speedup_vs_raw_a2a", "x vs raw bf16 a2a"),
        ("wire_sqnr_db", "wire SQNR dB"), ("wire_max_rel_err", "wire max rel err"),
    ]  # fmt: skip
    order = {"raw_a2a": 0}
    rows = sorted(results, key=lambda r: (r["op"], order.get(r["backend"], 1), r["backend"], r["payload"],
                                          r.get("combine_payload", ""), r["tokens"]))  # fmt: skip
    print()
    print(common.format_table(rows, cols))
    for s in skipped:
        print(f"note: {s}")
    out: Path = args.out
    meta = dict(hidden=args.hidden, experts=args.experts, topk=args.topk, ranks=R, tokens=args.token_list,
                payloads=args.payload_list, combine_payloads=args.cpayload_list, backend=args.backend,
                host_sync=args.host_sync, iters=args.iters, warmup=args.warmup,
                scale_layout=args.scale_layout, launcher=env.launcher, dist_backend=env.backend,
                env=common.environment())  # fmt: skip
    clean = [{k: v for k, v in r.items() if k != "time_us"} for r in rows]
    j = common.write_json(out / "dispatch.json", dict(config=meta, results=clean, skipped=skipped))
    c = common.write_csv(out / "dispatch.csv", clean)
    panels = []
    for op in ("dispatch", "combine"):
        series = {}
        for r in rows:
            if r["op"] == op or (op == "dispatch" and r["backend"] == "raw_a2a"):
                key = f"{r['backend']}/{r['payload']}" + (f"/{r['combine_payload']}" if op == "combine" else "")
                series.setdefault(key, ([], []))
                series[key][0].append(r["tokens"])
                series[key][1].append(r["gbps_per_rank"])
        panels.append(dict(title=f"{op}: GB/s per rank (bytes to peers)", xlabel="tokens per rank", ylabel="GB/s", series=series, logx=True))
    sp = {}
    for r in rows:
        cp = r.get("combine_payload", "bf16")
        if r["backend"] != "raw_a2a" and ((r["op"] == "dispatch" and r["payload"] != "bf16") or cp != "bf16"):
            key = f"{r['op']} {r['backend']}/{r['payload']}" + (f" wire {cp}" if r["op"] == "combine" else "") + " vs bf16"
            sp.setdefault(key, ([], []))
            sp[key][0].append(r["tokens"])
            sp[key][1].append(r["speedup_vs_bf16"])
    panels.append(dict(title="speed-up vs BF16 payload", xlabel="tokens per rank", ylabel="x", series=sp, logx=True, hline=1.0))
    title = f"fp4comm EP dispatch/combine, H={args.hidden} E={args.experts} top-{args.topk}, {R} ranks ({env.backend})"
    png = common.plot_lines(out / "dispatch.png", panels, title)
    print(f"wrote {j}, {c}" + (f", {png}" if png else ""))


def _spawned(args):
    run(args)


def main(argv=None):
    args = parse_args(argv)
    if dist_env.detect().launcher != "none":
        run(args)
        return
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc, backend = (n_gpu, "nccl") if n_gpu >= 2 else (args.nproc, "gloo")
    print(f"[bench_dispatch] no launcher: spawning {nproc} {backend} ranks", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist_env.spawn_local(_spawned, nproc, args, backend=backend)


if __name__ == "__main__":
    main()
