"""NVLink backend on real GPUs (NVSHMEM symmetric memory, peer stores over NVLink).

Each test spawns one process per GPU through ``tests/distributed.py`` (NCCL group), so
NVSHMEM is initialised and finalised once per process. Needs nvshmem4py importable
(``pip install --no-deps --target DIR shared/wheels/nvshmem4py*.whl``, DIR on PYTHONPATH)
and, for the big shapes, ``NVSHMEM_SYMMETRIC_SIZE`` large enough (set below if unset).
Run: ``pytest tests/test_nvlink_gpu.py -m multigpu`` (2 and 4 GPU cases skip when fewer).

A rank that fails raises at once and skips the collective teardown (NVSHMEM frees and
finalize are collectives: calling them while a peer waits in another collective would hang
both); the pool then kills the ranks. Every rank also arms a faulthandler watchdog that
prints its Python stack if a test runs far longer than it should (diagnosis of hangs).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.multigpu

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORLDS = [pytest.param(n, id=f"{n}gpu", marks=pytest.mark.skipif(NUM_GPUS < n, reason=f"needs {n} GPUs")) for n in (2, 4)]


#: kernel variants (``LowLatencyConfig.variant``): every one must give the torch fallback's bits
LL_VARIANTS = pytest.mark.parametrize("variant", ["v1", "v2"])

WATCHDOG_S = float(os.environ.get("FP4COMM_WATCHDOG_S", "90"))
#: seconds a receive half waits for a silent peer in these tests (the library default is 60)
PEER_TIMEOUT_S = 20.0


def _watch(seconds=WATCHDOG_S):
    """Dump every thread's Python stack to stderr if this rank is still busy after ``seconds``."""
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(seconds, repeat=False, file=sys.stderr, exit=False)


def _setup(pg, watchdog=WATCHDOG_S):
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "8G")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    _watch(watchdog)
    from fp4comm.ep.symmem import init_nvshmem

    return init_nvshmem(None, pg.device)


def _teardown(mem, *bufs):
    import faulthandler

    from fp4comm.ep.symmem import finalize

    for b in bufs:
        b.destroy()
    torch.cuda.synchronize()
    if mem is not None:
        mem.close()
    finalize()
    faulthandler.cancel_dump_traceback_later()


def _inputs(pg, T, H, E, K, seed):
    from tests.test_nvlink_emulated import make_inputs

    xs, ids, ws = make_inputs(pg.world_size, [T] * pg.world_size, H, E, K, seed=seed)
    d = pg.device
    return xs[pg.rank].to(d), ids[pg.rank].to(d), ws[pg.rank].to(d)


# ----------------------------------------------------------------------------- low latency
def _ll_vs_torch(pg, payload, layout, cpayload, H, E, K, T, variant):
    """NVSHMEM low-latency path (kernel ``variant``) == the torch fallback (v1 kernels, NCCL
    all-to-all) bit for bit: the variants agree with each other as well."""
    from fp4comm.ep.low_latency import LowLatencyBuffer, LowLatencyConfig

    mem = _setup(pg)
    cfg = LowLatencyConfig(
        hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=T, payload=payload, scale_layout=layout,
        combine_payload=cpayload, timeout_s=PEER_TIMEOUT_S,
    )  # fmt: skip
    nv = LowLatencyBuffer(dataclasses.replace(cfg, variant=variant), mem=mem, sync_check=True)
    tb = LowLatencyBuffer(cfg, group=None, backend="torch", device=pg.device, sync_check=True)
    for it, t in enumerate([T, T // 3, 1, 0, T]):
        x, ids, w = _inputs(pg, t, H, E, K, seed=100 + it)
        a = nv.dispatch(x, ids, w)
        b = tb.dispatch(x, ids, w)
        assert torch.equal(a.masked_m, b.masked_m)
        for e in range(a.x.shape[0]):
            n = int(a.masked_m[e])
            assert torch.equal(a.x[e, :n].view(torch.uint8), b.x[e, :n].view(torch.uint8)), (it, e)
            if a.scales is not None and layout == "linear":
                assert torch.equal(a.scales[e, :n].view(torch.uint8), b.scales[e, :n].view(torch.uint8))
            assert torch.equal(a.handle.src_slot[e, :n], b.handle.src_slot[e, :n])
            assert torch.equal(a.topk_weights[e, :n], b.topk_weights[e, :n])
        eo = torch.randn(a.x.shape[0], a.x.shape[1], H, device=pg.device).bfloat16()
        ya = nv.combine(eo, a.handle)
        yb = tb.combine(eo, b.handle)
        assert torch.equal(ya, yb), (it, (ya.float() - yb.float()).abs().max().item())
    _teardown(mem, nv, tb)
    return True


@LL_VARIANTS
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    "payload,layout,cpayload",
    [("nvfp4", "linear", "bf16"), ("nvfp4", "swizzled", "nvfp4"), ("fp8", "linear", "fp8"), ("bf16", "linear", "bf16")],
    ids=["nvfp4", "nvfp4-swz-cnvfp4", "fp8-cfp8", "bf16"],
)
def test_ll_nvlink_equals_torch(world, payload, layout, cpayload, variant):
    args = (payload, layout, cpayload, 7168, 64, 8, 96, variant)
    assert all(run_distributed(_ll_vs_torch, world, *args, backend="nccl"))


def _ll_reference(pg, variant):
    """Dispatch on GPUs == the plain-torch model (reference quantizers on CPU), combine ==
    :func:`tests.test_nvlink_emulated.expected_combine` (per-rank partials, then their sum)."""
    from fp4comm.ep.low_latency import LowLatencyBuffer, LowLatencyConfig
    from tests.test_nvlink_emulated import check_dispatch, expected_combine, expected_dispatch, make_inputs

    mem = _setup(pg)
    R, H, E, K, T = pg.world_size, 512, 16, 4, 24
    cfg = LowLatencyConfig(
        hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=T, combine_payload="nvfp4", timeout_s=PEER_TIMEOUT_S,
        variant=variant,
    )
    nv = LowLatencyBuffer(cfg, mem=mem, sync_check=True)
    xs, ids, ws = make_inputs(R, [T, T - 5, 3, T][:R], H, E, K, seed=5)
    out = nv.dispatch(xs[pg.rank].cuda(), ids[pg.rank].cuda(), ws[pg.rank].cuda())
    import torch.distributed as dist

    # gather every rank's outputs to check against the global model on rank 0
    cpu = lambda t: t.cpu()  # noqa: E731
    # float8 tensors do not survive all_gather_object's pickling (torch 2.11: "UntypedStorage has
    # no attribute dtype"): the scales travel as uint8 and are viewed back on rank 0
    mine = dict(x=cpu(out.x), scales=cpu(out.scales.view(torch.uint8)), gs=cpu(out.global_scale),
                masked_m=cpu(out.masked_m), w=cpu(out.topk_weights), src_rank=cpu(out.handle.src_rank),
                src_slot=cpu(out.handle.src_slot))  # fmt: skip
    g = torch.Generator().manual_seed(9)
    eos = [torch.randn(E // R, nv.max_m, H, generator=g).bfloat16() for _ in range(R)]
    y = nv.combine(eos[pg.rank].cuda(), out.handle).cpu()
    allo = [None] * R
    dist.all_gather_object(allo, (mine, y))
    _teardown(mem, nv)
    if pg.rank == 0:
        from types import SimpleNamespace as NS

        outs = [
            NS(x=o["x"], scales=o["scales"].view(torch.float8_e4m3fn), global_scale=o["gs"], masked_m=o["masked_m"],
               topk_weights=o["w"],
               handle=NS(src_rank=o["src_rank"], src_slot=o["src_slot"]))
            for o, _ in allo
        ]  # fmt: skip
        check_dispatch(cfg, outs, expected_dispatch("nvfp4", xs, ids, ws, R, E), R)
        refs = expected_combine(cfg, eos, outs, ids, ws, R)
        for (_, yy), ref in zip(allo, refs):  # combine runs without FMA contraction: exact
            assert torch.equal(yy, ref)
    return True


@LL_VARIANTS
@pytest.mark.parametrize("world", WORLDS)
def test_ll_matches_reference_model(world, variant):
    assert all(run_distributed(_ll_reference, world, variant, backend="nccl"))


def _ll_cuda_graph_and_cycles(pg, variant):
    """Capture dispatch + identity-expert + combine once, replay with new inputs: equals
    eager. Then 1000 eager cycles with varying T: no drift (epochs), no leak (allocator)."""
    from fp4comm.ep.low_latency import LowLatencyBuffer, LowLatencyConfig

    mem = _setup(pg, watchdog=300)
    H, E, K, T = 7168, 256 if pg.world_size == 4 else 64, 8, 128
    cfg = LowLatencyConfig(
        hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=T, payload="bf16", timeout_s=PEER_TIMEOUT_S,
        variant=variant,
    )
    g_buf = LowLatencyBuffer(cfg, mem=mem, sync_check=False)
    e_buf = LowLatencyBuffer(cfg, mem=mem, sync_check=True)
    x, ids, w = _inputs(pg, T, H, E, K, seed=1)
    sx, sids, sw = x.clone(), ids.clone(), w.clone()

    def step(buf, a, b, c):
        o = buf.dispatch(a, b, c)
        return buf.combine(o.x, o.handle)  # bf16 payload: identity expert

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(g_buf, sx, sids, sw)  # warm-up (compiles kernels)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gy = step(g_buf, sx, sids, sw)
    for it in range(3):
        x, ids, w = _inputs(pg, T, H, E, K, seed=10 + it)
        sx.copy_(x), sids.copy_(ids), sw.copy_(w)
        graph.replay()
        ey = step(e_buf, x, ids, w)
        torch.cuda.synchronize()
        assert torch.equal(gy, ey), it
    g_buf.check()
    # 1000 cycles, varying token counts
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    gen = torch.Generator().manual_seed(0)
    sets = [_inputs(pg, T, H, E, K, seed=50 + i) for i in range(4)]
    for it in range(1000):
        t = int(torch.randint(0, T + 1, (1,), generator=gen))
        x, ids, w = sets[it % 4]
        step(e_buf, x[:t], ids[:t], w[:t])
    torch.cuda.synchronize()
    e_buf.check()
    assert e_buf._epoch.tolist() == [1003] * 4  # 3 checks + 1000 cycles
    assert int(e_buf._counter.abs().sum()) == 0
    assert int(e_buf._hist.abs().sum()) == 0  # per-expert pair counts reset themselves
    leak = torch.cuda.memory_allocated() - (before or 0)
    assert leak < (64 << 20), leak
    _teardown(mem, g_buf, e_buf)
    return True


@LL_VARIANTS
@pytest.mark.parametrize("world", WORLDS)
def test_ll_cuda_graph_replay_and_1000_cycles(world, variant):
    assert all(run_distributed(_ll_cuda_graph_and_cycles, world, variant, backend="nccl", timeout=600))


def _ll_timeout(pg, variant):
    """Rank 0 dispatches alone: its receive half gives up after ``timeout_s`` and ``check``
    raises ``TimeoutError`` naming rank 1 (not a hang); then the buffer is torn down
    collectively as usual."""
    import time

    import torch.distributed as dist

    from fp4comm.ep.low_latency import LowLatencyBuffer, LowLatencyConfig

    mem = _setup(pg)
    cfg = LowLatencyConfig(hidden=256, num_experts=8, num_topk=2, max_tokens_per_rank=8, timeout_s=0.5, variant=variant)
    buf = LowLatencyBuffer(cfg, mem=mem, sync_check=True)  # collective: compiles, then a barrier
    x, ids, w = _inputs(pg, 8, 256, 8, 2, seed=3)
    err, took = None, 0.0
    if pg.rank == 0:  # the other ranks never send
        t0 = time.monotonic()
        try:
            buf.dispatch(x, ids, w)
        except TimeoutError as ex:
            err = str(ex)
        took = time.monotonic() - t0
    dist.barrier()
    _teardown(mem, buf)
    if pg.rank == 0:
        assert err is not None and "waiting for rank 1" in err, err
        assert took < 20, took  # 0.5 s of waiting (every flag shares one deadline)
    return True


@LL_VARIANTS
@pytest.mark.parametrize("world", WORLDS[:1])
def test_ll_timeout_names_peer_gpu(world, variant):
    assert all(run_distributed(_ll_timeout, world, variant, backend="nccl"))


def _ht_flag_timeout(pg):
    """The high-throughput flag exchange gives up too: rank 0 signals and waits alone."""
    import torch.distributed as dist

    from fp4comm.ep import EPBuffer
    from fp4comm.ep.symmem import finalize

    from fp4comm.ep.backend_nvlink import set_host_variant

    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "8G")
    _watch()
    set_host_variant("baseline")  # check() reads the status at once (the deferred read: next test)
    buf = EPBuffer(backend="nvlink", hidden=256, num_experts=8, num_topk=2, max_tokens_per_rank=8, timeout_s=0.5)
    be = buf.backend
    err = None
    if pg.rank == 0:
        try:
            be._flags(be._dflags, 1, 0, 0)
            be.check("dispatch")
        except TimeoutError as ex:
            err = str(ex)
    dist.barrier()
    buf.destroy()
    finalize()
    if pg.rank == 0:
        assert err is not None and "waiting for rank 1" in err, err
    return True


@pytest.mark.parametrize("world", WORLDS[:1])
def test_ht_flag_timeout_names_peer_gpu(world):
    assert all(run_distributed(_ht_flag_timeout, world, backend="nccl"))


def _ht_deferred_and_exchange_timeout(pg):
    """``symmem_defer``: rank 0 alone runs a dispatch flag wait (deferred: check() returns at
    once), then a symmetric-memory count exchange: the deferred dispatch timeout raises there
    first; a second exchange alone raises the count exchange's own timeout."""
    import torch.distributed as dist

    from fp4comm.ep import EPBuffer
    from fp4comm.ep.backend_nvlink import set_host_variant
    from fp4comm.ep.symmem import finalize

    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "8G")
    _watch()
    set_host_variant("symmem_defer")
    buf = EPBuffer(backend="nvlink", hidden=256, num_experts=8, num_topk=2, max_tokens_per_rank=8, timeout_s=0.5)
    be = buf.backend
    errs = []
    if pg.rank == 0:
        meta = torch.zeros(be._meta_w, dtype=torch.int64, device=pg.device)
        be._flags(be._dflags, 1, 0, 0)
        assert be.check("dispatch") == [0] * pg.world_size  # no host read
        for _ in range(2):
            try:
                be.exchange_meta(meta)
            except TimeoutError as ex:
                errs.append(str(ex))
    dist.barrier()
    buf.destroy()
    finalize()
    if pg.rank == 0:
        assert len(errs) == 2, errs
        assert "dispatch timed out waiting for rank 1" in errs[0], errs
        assert "count exchange timed out waiting for rank 1" in errs[1], errs
    return True


@pytest.mark.parametrize("world", WORLDS[:1])
def test_ht_deferred_and_exchange_timeout_gpu(world):
    assert all(run_distributed(_ht_deferred_and_exchange_timeout, world, backend="nccl"))


def _ht_send_with_meta_timeout(pg):
    """The early send: rank 0 alone dispatches. Its count exchange gives up, its pack stores
    nothing (the device plan sees the missing vector), its flag wait gives up too, and the
    dispatch raises the exchange's timeout naming rank 1 instead of hanging."""
    import torch.distributed as dist

    from fp4comm.ep import EPBuffer
    from fp4comm.ep.backend_nvlink import set_host_variant
    from fp4comm.ep.symmem import finalize

    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "8G")
    _watch()
    set_host_variant("send_with_meta")
    buf = EPBuffer(backend="nvlink", hidden=256, num_experts=8, num_topk=2, max_tokens_per_rank=8, timeout_s=0.5)
    assert buf.backend.sends_with_meta
    recv = buf.backend._recv.local
    recv.fill_(0x5A)
    torch.cuda.synchronize()
    dist.barrier()
    err = None
    if pg.rank == 0:
        x = torch.randn(8, 256, device=pg.device).bfloat16()
        ids = torch.randint(0, 8, (8, 2), device=pg.device, dtype=torch.int32)
        try:
            buf.dispatch(x, ids, torch.rand(8, 2, device=pg.device))
        except TimeoutError as ex:
            err = str(ex)
        torch.cuda.synchronize()
    dist.barrier()
    untouched = bool((recv == 0x5A).all())  # rank 0 stored nothing into rank 1 (nor its own buffer)
    buf.destroy()
    finalize()
    if pg.rank == 0:
        assert err is not None and "count exchange timed out waiting for rank 1" in err, err
    assert untouched
    return True


@pytest.mark.parametrize("world", WORLDS[:1])
def test_ht_send_with_meta_timeout_gpu(world):
    assert all(run_distributed(_ht_send_with_meta_timeout, world, backend="nccl"))


# ----------------------------------------------------------------------------- high throughput
def _ht_vs_torch(pg, payload, cycles, cpayload="bf16", variant="baseline"):
    from fp4comm.ep import EPBuffer
    from fp4comm.ep.backend_nvlink import set_host_variant
    from fp4comm.ep.symmem import finalize

    import fp4comm.ep.buffer as B

    host, _, kernels = variant.partition("+")  # e.g. "symmem_defer+v2": host variant + EP kernels
    nosync = host == "nosync"  # EPBuffer(host_sync=False) over the default host path, both max_m=512
    set_host_variant("send_with_meta" if nosync else host)
    kernels = kernels or B.KERNELS

    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "8G")
    _watch(300)
    R, H, E, K, TMAX = pg.world_size, 7168, 256 if pg.world_size == 4 else 64, 8, 512
    kw = dict(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=TMAX, payload=payload,
              combine_payload=cpayload, timeout_s=PEER_TIMEOUT_S, max_m=512 if nosync else None)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    # no `with`: on a failure this rank must not enter the collective frees (see module doc)
    nv = EPBuffer(backend="nvlink", host_sync=not nosync, **kw)
    ref = EPBuffer(backend="torch", **kw)
    # a few full input sets, sliced per cycle (making inputs on the CPU costs more than a cycle)
    sets = [_inputs(pg, TMAX, H, E, K, seed=s) for s in range(min(cycles, 4))]
    before = None
    for it in range(cycles):
        if it == 1:  # fixed buffers (torch backend: allocated by the first call) are not a leak
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
        t = TMAX if it == 0 else int(torch.randint(0, TMAX + 1, (1,), generator=gen))
        x, ids, w = (v[:t] for v in sets[it % len(sets)])
        B.KERNELS = kernels
        a = nv.dispatch(x, ids, w)
        eo = a.x if payload == "bf16" else torch.randn(a.x.shape[0], a.x.shape[1], H, device=pg.device).bfloat16()
        ya = nv.combine(eo, a.handle)
        if it % 50 == 0 or it == cycles - 1:
            B.KERNELS = "v1"  # the reference side: torch backend, v1 kernels (set again before nv)
            b = ref.dispatch(x, ids, w)
            assert torch.equal(a.masked_m, b.masked_m)
            for e in range(a.x.shape[0]):
                n = int(b.masked_m[e])
                assert torch.equal(a.x[e, :n].view(torch.uint8), b.x[e, :n].view(torch.uint8)), (it, e)
            if b.scales is not None:
                assert torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8))
            yb = ref.combine(eo, b.handle)
            assert torch.equal(ya, yb), it
            assert a.num_recv_tokens == b.num_recv_tokens and torch.equal(a.handle.slot_map, b.handle.slot_map)
    torch.cuda.synchronize()
    leak = torch.cuda.memory_allocated() - (before or 0)
    assert leak < (256 << 20), leak
    assert nv.backend._epoch_d == cycles and nv.backend._epoch_c == cycles
    ref.destroy()
    nv.destroy()
    finalize()
    import faulthandler

    faulthandler.cancel_dump_traceback_later()
    return True


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("payload", ["nvfp4", "fp8", "bf16"])
@pytest.mark.parametrize(
    "variant", ["baseline", "symmem_defer", "symmem_defer+v2", "symmem_defer+best", "send_with_meta+best", "nosync+best"]
)
def test_ht_nvlink_equals_torch(world, payload, variant):
    assert all(run_distributed(_ht_vs_torch, world, payload, 20, "bf16", variant, backend="nccl", timeout=300))


@pytest.mark.parametrize("world", WORLDS[1:])
@pytest.mark.parametrize("cpayload", ["fp8", "nvfp4"])
def test_ht_nvlink_combine_wire_equals_torch(world, cpayload):
    """Quantized combine wire: nvlink and torch backends bit-identical on GPUs."""
    assert all(run_distributed(_ht_vs_torch, world, "nvfp4", 10, cpayload, backend="nccl", timeout=300))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("variant", ["baseline", "symmem_defer", "symmem_defer+v2", "send_with_meta+best", "nosync+best"])
def test_ht_1000_cycles(world, variant):
    assert all(run_distributed(_ht_vs_torch, world, "nvfp4", 1000, "bf16", variant, backend="nccl", timeout=600))
