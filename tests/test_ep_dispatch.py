"""EPBuffer dispatch + combine across 2 and 4 ranks (gloo on CPU, NCCL on GPUs).

Per payload and routing case, on every rank:
* the masked layout (payload bytes of every used row, scale bytes incl. swizzle padding,
  global scales, weights) equals ``fp4comm.reference.ep.dispatch_ref`` bit for bit;
* ``masked_m`` equals the true per-expert counts (from all ranks' ids, counted in Python);
* combine of an identity expert equals ``combine_ref`` bit for bit, and equals
  ``sum_k w_k * bf16(dequant(quant(x_t)))`` computed in FP64 within
  ``2**-7 * sum_k |w_k * v_k|`` (two BF16 roundings: per-rank partial and total);
* dispatching again gives identical bytes (determinism).
Bad input on one rank raises on every rank, naming the argument, and the ranks stay in
sync (a correct dispatch follows).
"""

import pytest
import torch
import torch.distributed as dist
from tests.distributed import ProcessGroup, backend_params, dist_pool  # noqa: F401

from fp4comm.ep import EPBuffer, EPHandle
from fp4comm.reference import ep as ref
from fp4comm.reference.quant import (
    dequantize_fp8_blockwise_ref,
    dequantize_nvfp4_ref,
    quantize_fp8_blockwise_ref,
    quantize_nvfp4_ref,
)

ROUTINGS = ["random", "some_minus1", "one_expert", "uneven_T"]


def _inputs(pg: ProcessGroup, routing: str, H: int, E: int, K: int, seed: int = 0):
    """This rank's tokens, ids and weights for a routing case (deterministic per rank)."""
    g = torch.Generator().manual_seed(1000 * seed + 17 * pg.rank + len(routing))
    T = 16
    if routing == "uneven_T":
        T = [0, 40, 5, 31][pg.rank % 4]  # rank 0 sends nothing
    x = (torch.randn(T, H, generator=g) * torch.logspace(-2, 2, max(T, 1))[:T, None]).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)] or [torch.zeros(0, K)]).reshape(T, K)
    ids = ids.int()
    w = torch.rand(T, K, generator=g)
    if routing == "some_minus1":
        ids[torch.rand(T, K, generator=g) < 0.35] = -1
        ids[0] = -1  # a token routed nowhere
    elif routing == "one_expert":  # every token of every rank to the last expert only
        ids[:] = -1
        ids[:, 1] = E - 1
    elif routing == "uneven_T" and pg.rank == 1:
        ids[:] = -1  # a rank whose tokens all go nowhere
    return x.to(pg.device), ids.to(pg.device), w.to(pg.device)


def _all_gather_cpu(pg, t):
    n = torch.tensor([t.shape[0]], device=pg.device)
    ns = [torch.zeros_like(n) for _ in range(pg.world_size)]
    dist.all_gather(ns, n)
    m = int(max(int(v) for v in ns))
    pad = torch.zeros(m, *t.shape[1:], dtype=t.dtype, device=t.device)
    pad[: t.shape[0]] = t
    out = [torch.zeros_like(pad) for _ in range(pg.world_size)]
    dist.all_gather(out, pad)
    return [o[: int(k)].cpu() for o, k in zip(out, ns)]


def _dequant(d):
    a = d.activations
    if d.payload == "nvfp4":
        return dequantize_nvfp4_ref(a, torch.bfloat16)
    if d.payload == "fp8":
        return dequantize_fp8_blockwise_ref(a, torch.bfloat16)
    return a


def _source_dequant(x, payload):
    if payload == "nvfp4":
        return dequantize_nvfp4_ref(quantize_nvfp4_ref(x), torch.bfloat16)
    if payload == "fp8":
        return dequantize_fp8_blockwise_ref(quantize_fp8_blockwise_ref(x), torch.bfloat16)
    return x


def _bytes(t):
    return t.contiguous().view(torch.uint8)


def _check_case(pg, buf, payload, scale_layout, routing, H, E, K):
    El = E // pg.world_size
    x, ids, w = _inputs(pg, routing, H, E, K)
    d = buf.dispatch(x, ids, w)
    r = ref.dispatch_ref(x, ids, w, num_experts=E, payload=payload, scale_layout=scale_layout)

    # true per-expert counts from every rank's ids
    all_ids = torch.cat(_all_gather_cpu(pg, ids))
    true = [int((all_ids == pg.rank * El + e).sum()) for e in range(El)]
    assert d.masked_m.device.type == pg.device.type and d.masked_m.dtype == torch.int32
    assert d.masked_m.cpu().tolist() == true == r.masked_m.tolist(), (d.masked_m, true)
    assert d.max_m == r.max_m == max(128, -(-max(true) // 128) * 128)

    for e in range(El):
        n = true[e]
        assert torch.equal(_bytes(d.x[e, :n]).cpu(), _bytes(r.layout.x[e, :n]).cpu()), f"payload e={e}"
    assert torch.equal(d.topk_weights.cpu(), r.layout.topk_weights.cpu())
    if payload == "bf16":
        assert d.scales is None and d.global_scale is None
    else:
        assert d.scales.shape == r.layout.scales.shape
        assert torch.equal(_bytes(d.scales).cpu(), _bytes(r.layout.scales).cpu()), "scales"
    if payload == "nvfp4":
        assert torch.equal(d.global_scale.cpu(), r.layout.global_scale.cpu())

    # identity expert -> combine
    eo = _dequant(d).contiguous()
    y = buf.combine(eo, d.handle)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    y_ref = ref.combine_ref(eo, r)
    assert torch.equal(y.cpu().view(torch.int16), y_ref.cpu().view(torch.int16)), "combine vs reference"
    v = _source_dequant(x.cpu(), payload).double()
    wk = torch.where(ids.cpu() >= 0, w.cpu().double(), torch.zeros((), dtype=torch.float64))
    exact = (wk[:, :, None] * v[:, None, :]).sum(1)
    bound = 2.0**-7 * (wk[:, :, None] * v[:, None, :]).abs().sum(1)
    err = (y.cpu().double() - exact).abs()
    assert bool((err <= bound).all()), f"combine vs fp64: max excess {(err - bound).max().item()}"
    assert not bool(y.cpu()[(ids.cpu() < 0).all(1)].float().any()), "tokens routed nowhere must be zero"

    if routing != "some_minus1":
        return sum(true)
    # determinism: the same input gives the same bytes
    d2 = buf.dispatch(x, ids, w)
    for e in range(El):
        assert torch.equal(_bytes(d2.x[e, : true[e]]), _bytes(d.x[e, : true[e]]))
    for name in ("scales", "global_scale", "topk_weights", "masked_m"):
        a, b = getattr(d, name), getattr(d2, name)
        assert (a is None and b is None) or torch.equal(_bytes(a), _bytes(b)), name
    y2 = buf.combine(eo, d2.handle)
    assert torch.equal(y2.view(torch.int16), y.view(torch.int16))
    return sum(true)


def _dispatch_all_routings(pg: ProcessGroup, payload: str, scale_layout: str, kernels: str = "v1"):
    import fp4comm.ep.buffer as B

    torch.manual_seed(0)
    H = 128 if payload == "fp8" else 64
    E, K = (8, 3) if pg.world_size == 2 else (16, 4)
    received = {}
    prev, B.KERNELS = B.KERNELS, kernels  # the pool's workers are shared: restored below
    try:
        with EPBuffer(None, H, E, K, 40, payload=payload, scale_layout=scale_layout) as buf:
            for routing in ROUTINGS if pg.world_size == 2 else ROUTINGS[1:]:  # 4 ranks: CPU time
                received[routing] = _check_case(pg, buf, payload, scale_layout, routing, H, E, K)
    finally:
        B.KERNELS = prev
    return received


PAYLOADS = [("nvfp4", "swizzled"), ("nvfp4", "linear"), ("fp8", "linear"), ("bf16", "linear")]


@pytest.mark.parametrize("kernels", ["v1", "v2"])  # fp4comm.ep.buffer.KERNELS
@pytest.mark.parametrize("payload,scale_layout", PAYLOADS, ids=lambda v: str(v))
@pytest.mark.parametrize("world_size,backend", backend_params())
def test_dispatch_combine(dist_pool, world_size, backend, payload, scale_layout, kernels):  # noqa: F811
    got = dist_pool(world_size, backend).run(_dispatch_all_routings, payload, scale_layout, kernels)
    # "one_expert": only the last rank receives anything
    assert [g["one_expert"] > 0 for g in got] == [False] * (world_size - 1) + [True]


# ----------------------------------------------------------------------------- fixed max_m
def _fixed_max_m(pg: ProcessGroup):
    H, E, K = 64, 4 * pg.world_size, 2
    x, ids, w = _inputs(pg, "random", H, E, K)
    with EPBuffer(None, H, E, K, 40, payload="nvfp4", max_m=256) as buf:
        d = buf.dispatch(x, ids, w)
        assert d.x.shape == (4, 256, H // 2) and d.scales.shape == (4, 256, 4)
        r = ref.dispatch_ref(x, ids, w, num_experts=E, max_m=256)
        assert torch.equal(_bytes(d.scales).cpu(), _bytes(r.layout.scales).cpu())
        y = buf.combine(_dequant(d).contiguous(), d.handle)
        assert torch.equal(y.cpu().view(torch.int16), ref.combine_ref(_dequant(d).contiguous(), r).cpu().view(torch.int16))
        # a static global scale and a per-row one go through the same path
        for gs in (250.0, torch.full((x.shape[0],), 77.0, device=pg.device)):
            d = buf.dispatch(x, ids, w, global_scale=gs)
            r = ref.dispatch_ref(x, ids, w, num_experts=E, max_m=256, global_scale=gs)
            assert torch.equal(_bytes(d.x).cpu()[r.layout.topk_weights.cpu() > 0], _bytes(r.layout.x).cpu()[r.layout.topk_weights.cpu() > 0])
            assert torch.equal(d.global_scale.cpu(), r.layout.global_scale.cpu())
    return True


@pytest.mark.parametrize("world_size,backend", backend_params((2,)))
def test_fixed_max_m_and_static_scale(dist_pool, world_size, backend):  # noqa: F811
    assert all(dist_pool(world_size, backend).run(_fixed_max_m))


# ----------------------------------------------------------------------------- bad input
def _expect_everywhere(fn, match, exc=(TypeError, ValueError)):
    """fn() must raise ``exc`` matching ``match`` on this rank."""
    with pytest.raises(exc, match=match):
        fn()


def _bad_inputs(pg: ProcessGroup):
    bad = pg.rank == pg.world_size - 1
    H, E, K, T = 64, 4 * pg.world_size, 2, 12
    x, ids, w = _inputs(pg, "random", H, E, K)
    x, ids, w = x[:T].contiguous(), ids[:T].contiguous(), w[:T].contiguous()
    checked = []

    def case(name, match, **override):
        args = dict(x=x, topk_ids=ids, topk_weights=w)
        if bad:
            args.update(override)
        _expect_everywhere(lambda: buf.dispatch(args["x"], args["topk_ids"], args["topk_weights"], **args.get("kw", {})), match)
        checked.append(name)

    with EPBuffer(None, H, E, K, 16) as buf:
        case("x dtype", r"^x: ", x=x.float())
        case("x hidden", r"^x: ", x=torch.zeros(T, H + 16, dtype=torch.bfloat16, device=pg.device))
        case("x device", r"^x: ", x=torch.zeros(T, H, dtype=torch.bfloat16, device="meta"))
        case("x too many tokens", r"^x: ", x=torch.zeros(17, H, dtype=torch.bfloat16, device=pg.device))
        case("x not a tensor", r"^x: ", x=[[0.0] * H])
        case("ids dtype", r"^topk_ids: ", topk_ids=ids.float())
        case("ids K", r"^topk_ids: ", topk_ids=ids[:, :1].contiguous())
        case("ids >= E", r"^topk_ids: ", topk_ids=torch.full_like(ids, E))
        case("ids < -1", r"^topk_ids: ", topk_ids=torch.full_like(ids, -2))
        case("weights shape", r"^topk_weights: ", topk_weights=w[:-1])
        case("global_scale", r"^global_scale: ", kw={"global_scale": "bogus"})
        case("global_scale inf", r"^global_scale: ", kw={"global_scale": float("inf")})

        # stale handle on one rank
        d1 = buf.dispatch(x, ids, w)
        d2 = buf.dispatch(x, ids, w)
        eo = torch.zeros(d2.x.shape[0], d2.max_m, H, dtype=torch.bfloat16, device=pg.device)
        _expect_everywhere(lambda: buf.combine(eo, d1.handle if bad else d2.handle), r"^handle: ")
        _expect_everywhere(lambda: buf.combine(eo.float() if bad else eo, d2.handle), r"^expert_out: ")
        _expect_everywhere(lambda: buf.combine(eo, "nope" if bad else d2.handle), r"^handle: ")
        checked += ["stale handle", "expert_out dtype", "handle type"]
        # still in sync: a correct round trip
        y = buf.combine(_dequant(d2).contiguous(), d2.handle)
        r = ref.dispatch_ref(x, ids, w, num_experts=E)
        assert torch.equal(y.cpu().view(torch.int16), ref.combine_ref(_dequant(d2).contiguous(), r).cpu().view(torch.int16))
    assert isinstance(d2.handle, EPHandle)
    _expect_everywhere(lambda: buf.dispatch(x, ids, w), "destroy", RuntimeError)
    checked.append("after destroy")

    # receive overflow: every token of every rank to rank 0's first expert
    hot = torch.full_like(ids, -1)
    hot[:, 0] = 0
    with EPBuffer(None, H, E, K, 16, max_recv_tokens=T * pg.world_size - 1) as b2:
        _expect_everywhere(lambda: b2.dispatch(x, hot, w), r"^max_recv_tokens: receive overflow")
    with EPBuffer(None, H, E, K, 80, max_m=128) as b3:
        big = torch.ones(70, H, dtype=torch.bfloat16, device=pg.device)
        hot70 = torch.zeros(70, K, dtype=torch.int32, device=pg.device)  # 140 pairs a rank to expert 0
        w70 = torch.ones(70, K, device=pg.device)
        _expect_everywhere(lambda: b3.dispatch(big, hot70, w70), r"^max_m: receive overflow")
        n = 128 // pg.world_size
        hot70[:, 1] = -1
        d = b3.dispatch(big[:n], hot70[:n], w70[:n])  # exactly fills expert 0: no error
        assert d.x.shape[1] == 128 and (pg.rank != 0 or d.masked_m[0].item() == 128)
    checked.append("receive overflow")

    # construction: a config that differs across ranks, a bad one everywhere
    _expect_everywhere(lambda: EPBuffer(None, H + (16 if bad else 0), E, K, 16), r"^hidden: differs across ranks")
    _expect_everywhere(lambda: EPBuffer(None, H, E, K, 16, payload="fp4" if bad else "nvfp4"), r"^payload: differs")
    _expect_everywhere(lambda: EPBuffer(None, H, E + 1, K, 16), r"^num_experts: ")
    _expect_everywhere(lambda: EPBuffer(None, 72, E, K, 16, payload="fp8"), r"^hidden: ")
    _expect_everywhere(lambda: EPBuffer(None, H, E, K, 16, backend="carrier-pigeon"), r"^backend: ")
    _expect_everywhere(lambda: EPBuffer(None, H, E, K, 16, max_m=100), r"^max_m: ")
    checked.append("construction")
    return checked


@pytest.mark.parametrize("world_size,backend", backend_params())
def test_bad_input_raises_on_every_rank(dist_pool, world_size, backend):  # noqa: F811
    got = dist_pool(world_size, backend).run(_bad_inputs)
    assert all(g == got[0] for g in got) and len(got[0]) >= 18


def test_unknown_backend_class():
    from fp4comm.ep import get_backend_class

    with pytest.raises(ValueError, match="^backend: "):
        get_backend_class("carrier-pigeon")
    assert get_backend_class("torch").name == "torch"


def test_bench_dispatch_reports_combine_wire_error(tmp_path):
    """``bench_dispatch.py --combine-payloads``: each quantized combine wire's row carries its
    error against the bf16 wire on the same expert outputs (CPU, 2 gloo ranks): finite, FP8
    closer than NVFP4, none on the bf16 row itself."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "bd"
    cmd = [sys.executable, str(root / "benchmarks" / "bench_dispatch.py"), "--tokens", "16", "--payloads", "nvfp4",
           "--combine-payloads", "nvfp4,fp8,bf16", "--iters", "1", "--warmup", "1", "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {x["combine_payload"]: x for x in json.loads((out / "dispatch.json").read_text())["results"]
            if x["op"] == "combine"}  # fmt: skip
    assert set(rows) == {"bf16", "fp8", "nvfp4"} and "wire_sqnr_db" not in rows["bf16"]
    assert 25 < rows["fp8"]["wire_sqnr_db"] < 45 and 12 < rows["nvfp4"]["wire_sqnr_db"] < rows["fp8"]["wire_sqnr_db"]
    assert 0 < rows["fp8"]["wire_max_rel_err"] < rows["nvfp4"]["wire_max_rel_err"] < 0.5


def test_bench_dispatch_host_sync_both(tmp_path):
    """``bench_dispatch.py --backend nvlink --host-sync both`` (CPU: 2 gloo ranks, emulated
    NVLink under the interpreter): an ``nvlink`` and an ``nvlink-nosync`` row per op, moving
    the same bytes."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "bd"
    cmd = [sys.executable, str(root / "benchmarks" / "bench_dispatch.py"), "--backend", "nvlink", "--host-sync", "both",
           "--hidden", "64", "--experts", "8", "--topk", "2", "--tokens", "8", "--payloads", "nvfp4", "--iters", "1",
           "--warmup", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "nvlink-nosync: host_sync=False, max_m=128" in r.stdout
    rows = json.loads((out / "dispatch.json").read_text())["results"]
    got = {(x["backend"], x["op"]): x["bytes_per_rank"] for x in rows if x["backend"] != "raw_a2a"}
    assert set(got) == {(b, op) for b in ("nvlink", "nvlink-nosync") for op in ("dispatch", "combine")}
    assert got["nvlink", "dispatch"] == got["nvlink-nosync", "dispatch"] > 0
    assert got["nvlink", "combine"] == got["nvlink-nosync", "combine"] > 0
