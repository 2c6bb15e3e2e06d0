"""NVLink backend on CPU: every rank emulated in one process (``fp4comm.ep.symmem.EmulatedWorld``),
the peer-store kernels run under ``TRITON_INTERPRET=1`` with host addresses as peer pointers.
Order: every rank's send half, then every rank's receive half (the interpreter cannot spin
on another rank). Results are compared bit for bit with a plain-torch model of the same
exchange built from the reference quantizers."""

from __future__ import annotations

import math
import os

import pytest
import torch
import triton
import triton.language as tl

from fp4comm.ep.low_latency import LowLatencyBuffer, LowLatencyConfig
from fp4comm.ep.symmem import EmulatedWorld
from fp4comm.formats import unswizzle_scales
from fp4comm.kernels.nvlink import _plan_rows
from fp4comm.reference.quant import (
    dequantize_fp8_blockwise_ref,
    dequantize_nvfp4_ref,
    quantize_fp8_blockwise_ref,
    quantize_nvfp4_ref,
)

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="emulated world runs on CPU under TRITON_INTERPRET=1",
)


# ----------------------------------------------------------------------------- helpers
def make_inputs(R, T_list, H, E, K, seed=0, dup=False, unrouted=True):
    g = torch.Generator().manual_seed(seed)
    xs, ids, ws = [], [], []
    for r in range(R):
        T = T_list[r]
        x = (torch.randn(T, H, generator=g) * torch.rand(T, 1, generator=g) * 4).bfloat16()
        i = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int() if T else torch.zeros(0, K).int()
        if unrouted and T:
            i[torch.rand(T, K, generator=g) < 0.15] = -1
            i[0] = -1  # a token routed nowhere
        if dup and T > 1:
            i[1, 1] = i[1, 0] = max(0, int(i[1].max()))  # duplicate ids within one token
        xs.append(x.contiguous())
        ids.append(i.contiguous())
        ws.append(torch.rand(T, K, generator=g))
    return xs, ids, ws


def token_message(payload, x):
    """Per-token wire content for ``x [T, H]``: (payload bytes [T, *], scales [T, *] | None, gs [T] | None)."""
    if payload == "nvfp4":
        q = quantize_nvfp4_ref(x)
        return q.data, q.scales.view(torch.uint8), q.global_scale
    if payload == "fp8":
        q = quantize_fp8_blockwise_ref(x)
        return q.data.view(torch.uint8), q.scales, None
    return x.view(torch.uint8).reshape(x.shape[0], -1), None, None


def expected_dispatch(payload, xs, ids, ws, R, E):
    """For each rank and local expert: the rows in (source rank, t, k) order."""
    EL = E // R
    msgs = [token_message(payload, x) for x in xs]
    exp = [[[] for _ in range(EL)] for _ in range(R)]
    for s in range(R):
        T, K = ids[s].shape
        for t in range(T):
            for k in range(K):
                e = int(ids[s][t, k])
                if e < 0:
                    continue
                p, sc, gs = msgs[s]
                exp[e // EL][e % EL].append(
                    dict(
                        payload=p[t],
                        scales=None if sc is None else sc[t],
                        gs=None if gs is None else gs[t],
                        w=ws[s][t, k],
                        src_rank=s,
                        src_slot=t * K + k,
                    )
                )
    return exp


def run_dispatch(bufs, xs, ids, ws):
    outs = [b.dispatch_send(x, i, w) for b, x, i, w in zip(bufs, xs, ids, ws)]
    return [b.dispatch_recv(o) for b, o in zip(bufs, outs)]


def run_combine(bufs, eos, outs):
    ys = [b.combine_send(eo, o.handle) for b, eo, o in zip(bufs, eos, outs)]
    return [b.combine_recv(y, o.handle) for b, y, o in zip(bufs, ys, outs)]


def check_dispatch(cfg, outs, exp, R):
    H = cfg.hidden
    for r in range(R):
        o = outs[r]
        ksf = H // 16
        scales = o.scales
        if cfg.payload == "nvfp4":
            scales = scales.view(torch.uint8)
            if cfg.scale_layout == "swizzled":
                EL, MM = o.x.shape[:2]
                scales = unswizzle_scales(o.scales, MM, ksf).view(torch.uint8).reshape(EL, MM, ksf)
        for e, rows in enumerate(exp[r]):
            n = len(rows)
            assert int(o.masked_m[e]) == n, (r, e)
            for m, row in enumerate(rows):
                got_p = o.x[e, m].view(torch.uint8).reshape(-1)
                assert torch.equal(got_p, row["payload"].reshape(-1)), (r, e, m)
                if row["scales"] is not None:
                    assert torch.equal(scales[e, m].reshape(-1)[: row["scales"].numel()].view(row["scales"].dtype), row["scales"].reshape(-1))
                if row["gs"] is not None:
                    assert torch.equal(o.global_scale[e, m], row["gs"])
                assert torch.equal(o.topk_weights[e, m], row["w"])
                assert int(o.handle.src_rank[e, m]) == row["src_rank"]
                assert int(o.handle.src_slot[e, m]) == row["src_slot"]


def wire_roundtrip(fmt, y):
    """What the combine wire does to expert rows ``y [N, H]`` (BF16 -> BF16/FP32 values)."""
    if fmt == "nvfp4":
        return dequantize_nvfp4_ref(quantize_nvfp4_ref(y), torch.float32)
    if fmt == "fp8":
        return dequantize_fp8_blockwise_ref(quantize_fp8_blockwise_ref(y), torch.float32)
    return y.float()


def check_combine(cfg, bufs, outs, ids, ws, R, seed):
    """Combine random expert outputs of ``outs`` on every rank; each result equals
    :func:`expected_combine` bit for bit. Returns the outputs."""
    eos = expert_outputs(outs, cfg, seed=seed)
    ys = run_combine(bufs, eos, outs)
    for y, ref in zip(ys, expected_combine(cfg, eos, outs, ids, ws, R)):
        assert torch.equal(y, ref)
    return ys


def expected_combine(cfg, eos, outs, ids, ws, R):
    """The combine's rounding order, from the dispatch outputs alone: per (source token,
    expert rank), FP32 ``acc = acc + w_k * float(out)`` over the token's pairs on that rank
    (``k`` ascending, product and sum rounded separately), one BF16 rounding, the wire's
    round trip; on the source, FP32 sum of those partials over ranks ascending, then BF16
    (RNE)."""
    EL = cfg.num_experts // R
    H = cfg.hidden
    res = []
    # (source rank, t * K + k) -> (expert rank, expert output row) of the pair
    where = {}
    for r in range(R):
        o = outs[r]
        for e in range(EL):
            for m in range(int(o.masked_m[e])):
                where[(int(o.handle.src_rank[e, m]), int(o.handle.src_slot[e, m]))] = (r, eos[r][e, m].float())
    for s in range(R):
        T, K = ids[s].shape
        y = torch.zeros(T, H, dtype=torch.float32)
        for t in range(T):
            parts = {}
            for k in range(K):
                if 0 <= int(ids[s][t, k]) < cfg.num_experts:
                    r, row = where[(s, t * K + k)]
                    parts[r] = parts.get(r, torch.zeros(H, dtype=torch.float32)) + ws[s][t, k] * row
            acc = torch.zeros(H, dtype=torch.float32)
            for r in sorted(parts):
                acc = acc + wire_roundtrip(cfg.combine_payload, parts[r].bfloat16()[None])[0].float()
            y[t] = acc
        res.append(y.bfloat16())
    return res


def expert_outputs(outs, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.x.shape[0], o.x.shape[1], cfg.hidden, generator=g).bfloat16() for o in outs]


# ----------------------------------------------------------------------------- tests
CASES = [
    # (R, E, K, H, payload, scale_layout, combine_payload)
    pytest.param(2, 8, 3, 48, "nvfp4", "linear", "bf16", id="R2-nvfp4-H48"),
    pytest.param(4, 8, 2, 64, "nvfp4", "swizzled", "nvfp4", id="R4-nvfp4-swz-comb_nvfp4"),
    pytest.param(2, 6, 2, 128, "fp8", "linear", "fp8", id="R2-fp8-comb_fp8"),
    pytest.param(3, 6, 2, 32, "bf16", "linear", "bf16", id="R3-bf16"),
]


#: every kernel variant must give the same bits (``LowLatencyConfig.variant``)
VARIANTS = pytest.mark.parametrize("variant", ["v1", "v2"])


@VARIANTS
@pytest.mark.parametrize("R,E,K,H,payload,layout,cpayload", CASES)
def test_ll_dispatch_combine_bit_exact(R, E, K, H, payload, layout, cpayload, variant):
    cfg = LowLatencyConfig(
        hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=6, payload=payload,
        scale_layout=layout, combine_payload=cpayload, variant=variant,
    )  # fmt: skip
    world = EmulatedWorld(R)
    bufs = [LowLatencyBuffer(cfg, mem=world.rank(r)) for r in range(R)]
    T_list = [5, 3, 6, 1][:R]
    xs, ids, ws = make_inputs(R, T_list, H, E, K, seed=1)
    outs = run_dispatch(bufs, xs, ids, ws)
    check_dispatch(cfg, outs, expected_dispatch(payload, xs, ids, ws, R, E), R)
    check_combine(cfg, bufs, outs, ids, ws, R, seed=2)
    for b in bufs:
        b.destroy()


@VARIANTS
def test_ll_many_cycles_varying_tokens_and_duplicates(variant):
    """Back-to-back cycles: sequence numbers, double buffers and self-resetting counters
    hold across calls with T changing (0 included) and duplicate ids inside a token."""
    R, E, K, H = 2, 4, 2, 32
    cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=4, payload="nvfp4", variant=variant)
    world = EmulatedWorld(R)
    bufs = [LowLatencyBuffer(cfg, mem=world.rank(r)) for r in range(R)]
    for it, T_list in enumerate([[4, 2], [0, 3], [1, 0], [3, 4], [2, 2], [4, 1]]):
        xs, ids, ws = make_inputs(R, T_list, H, E, K, seed=10 + it, dup=it % 2 == 1)
        outs = run_dispatch(bufs, xs, ids, ws)
        check_dispatch(cfg, outs, expected_dispatch("nvfp4", xs, ids, ws, R, E), R)
        check_combine(cfg, bufs, outs, ids, ws, R, seed=it)
    for b in bufs:
        assert int(b._counter.abs().sum()) == 0  # arrival counters reset themselves
        assert int(b._hist.abs().sum()) == 0  # per-expert pair counts: reset by the last send program
        assert b._epoch.tolist() == [6, 6, 6, 6]


def test_ll_outputs_are_fixed_double_buffers():
    """Outputs live in two fixed sets that alternate call by call (CUDA-graph replays reuse
    the memory, no call allocates); padding rows of the swizzled scales start at zero."""
    R, E, K, H = 2, 4, 2, 64
    cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=4, payload="nvfp4", scale_layout="swizzled")
    world = EmulatedWorld(R)
    bufs = [LowLatencyBuffer(cfg, mem=world.rank(r)) for r in range(R)]
    ptrs = []
    for it, T_list in enumerate([[4, 2], [3, 3], [1, 4]]):
        xs, ids, ws = make_inputs(R, T_list, H, E, K, seed=20 + it)
        outs = run_dispatch(bufs, xs, ids, ws)
        check_dispatch(cfg, outs, expected_dispatch("nvfp4", xs, ids, ws, R, E), R)
        if it == 0:
            o = outs[0]
            for e in range(o.x.shape[0]):  # rows past masked_m: never written yet -> zero
                n = int(o.masked_m[e])
                lin = unswizzle_scales(o.scales[e : e + 1], o.x.shape[1], H // 16).reshape(o.x.shape[1], -1)
                assert not bool(lin[n:].view(torch.uint8).any())
        ys = check_combine(cfg, bufs, outs, ids, ws, R, seed=it)
        o = outs[0]
        ptrs.append((o.x.data_ptr(), o.scales.data_ptr(), o.global_scale.data_ptr(), o.masked_m.data_ptr(),
                     o.topk_weights.data_ptr(), o.handle.src_rank.data_ptr(), ys[0].data_ptr()))  # fmt: skip
    assert ptrs[0] == ptrs[2] and all(a != b for a, b in zip(ptrs[0], ptrs[1])), ptrs
    for b in bufs:
        b.destroy()


def _run_compile_warmup(buf):
    """Run ``LowLatencyBuffer._compile_all`` (what the constructor does on GPUs only) on CPU:
    the warm-up launches are recorded instead of compiled."""
    warm, real = [], buf._launch

    def launch(kernel, grid, args, kw, warmup=False):
        if warmup:
            warm.append((kernel, args))
            return None
        return real(kernel, grid, args, kw)

    buf._launch = launch
    buf._compile_all()
    return warm


def _out_shapes(o):
    return dict(
        x=tuple(o.x.shape), scales=None if o.scales is None else tuple(o.scales.shape),
        gs=None if o.global_scale is None else tuple(o.global_scale.shape), masked_m=tuple(o.masked_m.shape),
        w=tuple(o.topk_weights.shape), src_rank=tuple(o.handle.src_rank.shape), src_slot=tuple(o.handle.src_slot.shape),
    )  # fmt: skip


def test_ll_gpu_compile_warmup_keeps_full_size_outputs():
    """Regression (4x H200 bench: illegal memory access; 2x H200 reference-model test:
    cudaErrorInvalidAddressSpace): the compile warm-up that the constructor runs on GPUs
    only built the cached output sets at ``[1, 1, ...]``, so every receive kernel wrote
    ``E_local * max_m`` rows past their end and combine read garbage ``src_rank`` (peer
    pointer table index) back. Run that warm-up on CPU: the outputs stay full size, and a
    cycle with unequal token counts per rank and the nvfp4 combine wire at H=512 (the
    reference test's shape, scaled down) is still bit-exact."""
    R, E, K, H, TMAX = 2, 8, 4, 512, 6
    cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=TMAX, combine_payload="nvfp4")
    EL, MM = E // R, R * TMAX
    want = dict(x=(EL, MM, H // 2), scales=(EL, MM, H // 16), gs=(EL, MM), masked_m=(EL,), w=(EL, MM),
                src_rank=(EL, MM), src_slot=(EL, MM))  # fmt: skip
    world = EmulatedWorld(R)
    bufs = [LowLatencyBuffer(cfg, mem=world.rank(r)) for r in range(R)]
    for b in bufs:
        warm = _run_compile_warmup(b)
        assert len(warm) == 4
        # the receive kernel's output arguments are the real, full-size set
        for t in warm[1][1]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.dtype != torch.int64:
                assert t.shape[:2] == (EL, MM), t.shape
        for st in b._out_sets:
            assert tuple(st["x"].shape) == want["x"] and tuple(st["src_rank"].shape) == want["src_rank"]
    xs, ids, ws = make_inputs(R, [TMAX, TMAX - 2], H, E, K, seed=7)
    for it in range(3):  # both output sets
        pend = [b.dispatch_send(x, i, w) for b, x, i, w in zip(bufs, xs, ids, ws)]
        for o in pend:
            assert _out_shapes(o) == want
        outs = [b.dispatch_recv(o) for b, o in zip(bufs, pend)]
        check_dispatch(cfg, outs, expected_dispatch("nvfp4", xs, ids, ws, R, E), R)
        check_combine(cfg, bufs, outs, ids, ws, R, seed=it)
    for b in bufs:
        b.destroy()


def test_ll_undersized_outputs_are_refused():
    """The receive / combine halves refuse output or handle tensors smaller than
    ``[E_local, max_m]`` (host check, no sync) instead of writing past their end."""
    R, E, K, H = 2, 4, 2, 32
    cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=3, payload="nvfp4")
    world = EmulatedWorld(R)
    bufs = [LowLatencyBuffer(cfg, mem=world.rank(r)) for r in range(R)]
    xs, ids, ws = make_inputs(R, [3, 2], H, E, K, seed=8)
    pend = [b.dispatch_send(x, i, w) for b, x, i, w in zip(bufs, xs, ids, ws)]
    good_x = pend[0].x
    pend[0].x = good_x[:1, :1]
    with pytest.raises(ValueError, match="dispatch_recv: x"):
        bufs[0].dispatch_recv(pend[0])
    pend[0].x = good_x
    outs = [b.dispatch_recv(o) for b, o in zip(bufs, pend)]
    eo = torch.zeros(E // R, bufs[0].max_m, H, dtype=torch.bfloat16)
    h = outs[0].handle
    for name in ("token_rows", "row_weights", "source_tokens"):
        good = getattr(h, name)
        setattr(h, name, good[:1])
        with pytest.raises(ValueError, match=f"handle: {name}"):
            bufs[0].combine_send(eo, h)
        setattr(h, name, good)
    ys = run_combine(bufs, [eo, eo], outs)
    assert all(not bool(y.float().abs().sum()) for y in ys)
    for b in bufs:
        b.destroy()


class _MetaMemory:
    """Symmetric memory that records the allocations and backs them with meta tensors (no
    storage), so a buffer at the bench's shape can be built on CPU to check its sizes."""

    emulated = True

    def __init__(self, rank, world_size):
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")
        self.allocs = []

    def alloc(self, shape, dtype):
        from fp4comm.ep.symmem import SymmetricTensor

        self.allocs.append((tuple(shape), dtype))
        ptrs = torch.zeros(self.world_size, dtype=torch.int64)
        return SymmetricTensor(local=torch.empty(shape, dtype=dtype, device="meta"), peer_ptrs=ptrs)

    def num_sms(self):
        return 132

    def free(self, t):
        pass


@pytest.mark.parametrize("payload,cpayload", [("nvfp4", "bf16"), ("bf16", "bf16"), ("nvfp4", "nvfp4")])
def test_ll_buffer_sizes_at_bench_shape(payload, cpayload):
    """The 4x H200 bench shape (H=7168, E=256, R=4, top-8, T_max=512): every message row /
    index entry / combine row / flag the kernels can address (their index formulas at the
    largest indices) lies inside its buffer (no more, no less). Output sets hold
    ``E_local * max_m`` rows (``max_m = R * T_max``)."""
    R, E, K, H, TMAX = 4, 256, 8, 7168, 512
    cfg = LowLatencyConfig(
        hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=TMAX, payload=payload, combine_payload=cpayload
    )
    for rank in (0, R - 1):
        mem = _MetaMemory(rank, R)
        b = LowLatencyBuffer(cfg, mem=mem)
        EL, RB, CRB = b.num_local_experts, b.layout.row_bytes, b.crow_bytes
        assert (EL, b.max_m) == (64, R * TMAX)
        sizes = (math.prod(s) * torch.empty(0, dtype=d).element_size() for s, d in mem.allocs)
        rows, sidx, dflags, crows, cflags = sizes
        g = b._dsend
        # dispatch: the last message row (b=1, last source, position T_max-1: one row per
        # (token, rank)) and the last index entry (b=1, last local expert, last source, T_max-1)
        last = 1 * g.row_b + (R - 1) * g.row_s + (TMAX - 1)
        assert (last + 1) * RB == rows
        assert (1 * g.slot_b + (EL - 1) * g.slot_e + (R - 1) * g.slot_s + (TMAX - 1) + 1) * 4 == sidx
        assert (1 * g.flag_b + (EL - 1) * g.flag_e + (R - 1) * g.flag_s + 1) * 8 == dflags
        # combine: row b*CB + (expert rank)*CS + t of the source's buffer, flag b*FLAG_B + src
        c = b._cgeo
        assert (1 * c["cb"] + (R - 1) * c["cs"] + (TMAX - 1) + 1) * CRB == crows
        assert (1 * c["cflag_b"] + (R - 1) * c["cflag_s"] + 1) * 8 == cflags
        specs = b._out_specs()
        assert specs["x"][0][:2] == (EL, R * TMAX) and specs["src_rank"][0] == (EL, R * TMAX)
        b.destroy()


def test_ll_wire_bytes_count_rows_per_token_and_rank():
    """``wire_bytes``: one dispatch row and one combine row per (token, rank) the token's
    valid ids reach, plus a 4-byte dispatch index entry per (token, expert); to peers only
    by default. Counted here from the ids by hand."""
    R, E, K, H = 4, 16, 4, 64
    cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=4, payload="nvfp4")
    b = LowLatencyBuffer(cfg, mem=_MetaMemory(1, R))  # rank 1 owns experts 4..7
    ids = torch.tensor([[0, 1, 5, -1], [4, 5, 6, 7], [8, 12, 13, -1], [-1, -1, -1, -1]], dtype=torch.int32)
    # peers (ranks 0, 2, 3): token 0 -> rank 0 (2 pairs); token 1 -> none; token 2 -> ranks 2, 3 (1 + 2 pairs)
    RB, CRB = b.layout.row_bytes, b.crow_bytes
    assert b.wire_bytes(ids) == {"dispatch": 3 * RB + 4 * 5, "combine": 3 * CRB}
    # self included: token 0 -> ranks 0, 1; token 1 -> rank 1 (4 pairs); token 2 -> ranks 2, 3
    assert b.wire_bytes(ids, peers_only=False) == {"dispatch": 5 * RB + 4 * 10, "combine": 5 * CRB}
    with pytest.raises(TypeError, match="topk_ids"):
        b.wire_bytes(ids.float())
    b.destroy()


def test_ll_async_hook_and_combine_identity():
    """Send halves first (async hook), receive later; identity experts give
    ``sum_k w_k * dequant(quant(x_t))``."""
    R, E, K, H = 2, 4, 2, 32
    cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=4, payload="bf16")
    world = EmulatedWorld(R)
    bufs = [LowLatencyBuffer(cfg, mem=world.rank(r)) for r in range(R)]
    xs, ids, ws = make_inputs(R, [3, 4], H, E, K, seed=3)
    pend = [b.dispatch(x, i, w, async_finish=True) for b, x, i, w in zip(bufs, xs, ids, ws)]
    outs = [hook() for _, hook in pend]
    assert all(o is p for o, (p, _) in zip(outs, pend))
    pend = [b.combine(o.x, o.handle, async_finish=True) for b, o in zip(bufs, outs)]
    ys = [hook() for _, hook in pend]
    for s in range(R):
        m = (ids[s] >= 0).float()
        ref = ((ws[s] * m).unsqueeze(-1) * xs[s].float().unsqueeze(1)).sum(1)
        torch.testing.assert_close(ys[s].float(), ref, rtol=1e-2, atol=1e-2)


@VARIANTS
def test_ll_timeout_names_peer(variant):
    R, E, K, H = 3, 3, 1, 16
    cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=2, payload="nvfp4", variant=variant)
    world = EmulatedWorld(R)
    bufs = [LowLatencyBuffer(cfg, mem=world.rank(r)) for r in range(R)]
    xs, ids, ws = make_inputs(R, [2, 2, 2], H, E, K, seed=4, unrouted=False)
    outs = [bufs[r].dispatch_send(xs[r], ids[r], ws[r]) for r in (0, 1)]  # rank 2 never sends
    with pytest.raises(TimeoutError, match="waiting for rank 2"):
        bufs[0].dispatch_recv(outs[0])


def test_ll_bad_input():
    R, E, K, H = 2, 4, 2, 32
    cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=3, payload="nvfp4")
    world = EmulatedWorld(R)
    bufs = [LowLatencyBuffer(cfg, mem=world.rank(r)) for r in range(R)]
    xs, ids, ws = make_inputs(R, [3, 3], H, E, K, seed=5)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        bufs[0].dispatch_send(torch.zeros(4, H, dtype=torch.bfloat16), ids[0], ws[0])
    with pytest.raises(TypeError, match="x"):
        bufs[0].dispatch_send(xs[0].float(), ids[0], ws[0])
    with pytest.raises(ValueError, match="topk_ids"):
        bufs[0].dispatch_send(xs[0], ids[0][:, :1], ws[0])
    with pytest.raises(RuntimeError, match="combine_send"):
        bufs[0].combine_send(torch.zeros(2, 6, H, dtype=torch.bfloat16), None)
    # ids out of range: skipped by the kernel, reported by check()
    bad = ids[0].clone()
    bad[0, 0] = E + 3
    outs = [bufs[0].dispatch_send(xs[0], bad, ws[0]), bufs[1].dispatch_send(xs[1], ids[1], ws[1])]
    with pytest.raises(ValueError, match=f"found {E + 3}"):
        bufs[0].dispatch_recv(outs[0])
    with pytest.raises(ValueError, match="LowLatencyConfig|payload"):
        LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=3, payload="int4")
    with pytest.raises(ValueError, match="swizzled"):
        LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=3, payload="fp8", scale_layout="swizzled")
    with pytest.raises(ValueError, match="num_topk: at most 256"):  # k travels in 8 bits of an index entry
        LowLatencyConfig(hidden=H, num_experts=512, num_topk=257, max_tokens_per_rank=3)
    with pytest.raises(ValueError, match="at most 64 ranks"):  # a token's ranks travel as a 64-bit mask
        cfg65 = LowLatencyConfig(hidden=H, num_experts=130, num_topk=K, max_tokens_per_rank=3)
        LowLatencyBuffer(cfg65, mem=_MetaMemory(0, 65))


def test_symmetric_allocation_order_checked():
    world = EmulatedWorld(2)
    a0 = world.rank(0).alloc((4,), torch.int64)
    with pytest.raises(ValueError, match="allocation #0"):
        world.rank(1).alloc((5,), torch.int64)
    a1 = world.rank(1).alloc((4,), torch.int64)
    assert a0.peer_ptrs.tolist() == a1.peer_ptrs.tolist() == [a0.local.data_ptr(), a1.local.data_ptr()]
    world.rank(0).close()
    world.rank(1).free(a1)
    assert world._allocs[0] is None


# ----------------------------------------------------------------------------- torch fallback (2 gloo ranks)
def _torch_fallback_worker(rank, world_size, port, q):
    import torch.distributed as dist

    os.environ["TRITON_INTERPRET"] = "1"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        R, E, K, H = world_size, 4, 2, 32
        cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=4, payload="nvfp4")
        buf = LowLatencyBuffer(cfg, group=None, backend="torch", device=torch.device("cpu"))
        results = []
        for it in range(2):
            xs, ids, ws = make_inputs(R, [4, 3], H, E, K, seed=20 + it)
            out = buf.dispatch(xs[rank], ids[rank], ws[rank])
            eo = torch.randn(out.x.shape[0], out.x.shape[1], H, generator=torch.Generator().manual_seed(rank + it)).bfloat16()
            y = buf.combine(eo, out.handle)
            results.append(
                dict(
                    masked_m=out.masked_m.clone(), x=out.x.clone(), scales=out.scales.clone(), gs=out.global_scale.clone(),
                    w=out.topk_weights.clone(), src_rank=out.handle.src_rank.clone(), src_slot=out.handle.src_slot.clone(),
                    eo=eo, y=y,
                )
            )  # fmt: skip
        import io

        blob = io.BytesIO()
        torch.save(results, blob)  # bytes, not shared-memory tensors: this process exits first
        q.put((rank, blob.getvalue()))
        dist.destroy_process_group()
    except Exception as ex:  # pragma: no cover - reported to the parent
        import traceback

        q.put((rank, traceback.format_exc()))


def test_ll_torch_fallback_matches_emulated_nvlink():
    """The ``torch`` low-latency backend (fixed-size all_to_all_single on gloo) gives the
    same bits as the emulated NVLink backend."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_torch_fallback_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    import io

    for r in range(2):
        assert not isinstance(got[r], str), got[r]
        got[r] = torch.load(io.BytesIO(got[r]))
    # the same exchange on the emulated NVLink world
    R, E, K, H = 2, 4, 2, 32
    cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=4, payload="nvfp4")
    world = EmulatedWorld(R)
    bufs = [LowLatencyBuffer(cfg, mem=world.rank(r)) for r in range(R)]
    for it in range(2):
        xs, ids, ws = make_inputs(R, [4, 3], H, E, K, seed=20 + it)
        outs = run_dispatch(bufs, xs, ids, ws)
        eos = [got[r][it]["eo"] for r in range(R)]
        ys = run_combine(bufs, eos, outs)
        for r in range(R):
            g, o = got[r][it], outs[r]
            assert torch.equal(g["masked_m"], o.masked_m)
            for e in range(o.x.shape[0]):
                n = int(o.masked_m[e])
                assert torch.equal(g["x"][e, :n], o.x[e, :n])
                assert torch.equal(g["scales"][e, :n].view(torch.uint8), o.scales[e, :n].view(torch.uint8))
                assert torch.equal(g["gs"][e, :n], o.global_scale[e, :n])
                assert torch.equal(g["w"][e, :n], o.topk_weights[e, :n])
                assert torch.equal(g["src_rank"][e, :n], o.handle.src_rank[e, :n])
                assert torch.equal(g["src_slot"][e, :n], o.handle.src_slot[e, :n])
            assert torch.equal(g["y"], ys[r])


# ----------------------------------------------------------------------------- high throughput via EPBuffer
def _ht_compare(pg, payload, layout, T_list, seed, H=64, variant="baseline", kernels="v1", host_sync=True, impl="auto"):
    """EPBuffer(backend="nvlink") (CPU: /dev/shm symmetric memory, interpreter kernels) vs
    EPBuffer(backend="torch") on the same inputs: every output bit equal (``variant``: the
    nvlink backend's host path, ``backend_nvlink.HOST_VARIANTS``; ``kernels``: the nvlink
    buffer's ``fp4comm.ep.buffer.KERNELS``, the torch buffer always runs ``"v1"``;
    ``host_sync=False``: the nvlink buffer's dispatch does not wait, both take ``max_m=128``)."""
    import fp4comm.ep.buffer as B
    from fp4comm.ep import EPBuffer
    from fp4comm.ep.backend_nvlink import set_host_variant

    set_host_variant(variant)

    def on(k, fn, *a):
        prev, B.KERNELS = B.KERNELS, k
        try:
            return fn(*a)
        finally:
            B.KERNELS = prev

    R, E, K = pg.world_size, 8, 3
    kw = dict(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=max(T_list), payload=payload, scale_layout=layout)
    if not host_sync:
        kw["max_m"] = 128
    res = []
    with EPBuffer(backend="nvlink", host_sync=host_sync, impl=impl, **kw) as nv, EPBuffer(backend="torch", **kw) as ref:
        for it in range(3):  # several calls: epochs advance, buffers reused
            xs, ids, ws = make_inputs(R, [T_list[(r + it) % R] for r in range(R)], H, E, K, seed=seed + it)
            x, i, w = xs[pg.rank], ids[pg.rank], ws[pg.rank]
            a = on(kernels, nv.dispatch, x, i, w)
            b = on("v1", ref.dispatch, x, i, w)
            assert torch.equal(a.masked_m, b.masked_m)
            for e in range(a.x.shape[0]):
                n = int(b.masked_m[e])
                assert torch.equal(a.x[e, :n].view(torch.uint8), b.x[e, :n].view(torch.uint8))
                assert torch.equal(a.topk_weights[e, :n], b.topk_weights[e, :n])
                if b.global_scale is not None:
                    assert torch.equal(a.global_scale[e, :n], b.global_scale[e, :n])
            if b.scales is not None:
                assert torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8))
            eo = torch.randn(a.x.shape[0], a.x.shape[1], H, generator=torch.Generator().manual_seed(it)).bfloat16()
            ya = on(kernels, nv.combine, eo, a.handle)
            yb = on("v1", ref.combine, eo, b.handle)
            assert torch.equal(ya, yb)
            assert a.num_recv_tokens == b.num_recv_tokens
            assert torch.equal(a.handle.slot_map, b.handle.slot_map)
            res.append(int(a.masked_m.sum()))
    return res


@pytest.mark.parametrize(
    "payload,layout", [("nvfp4", "swizzled"), ("fp8", "linear"), ("bf16", "linear")], ids=["nvfp4", "fp8", "bf16"]
)
def test_ht_epbuffer_nvlink_equals_torch(payload, layout):
    from tests.distributed import run_distributed

    H = 128 if payload == "fp8" else 64
    out = run_distributed(_ht_compare, 2, payload, layout, [5, 3], 7, H)
    assert len(out) == 2


@pytest.mark.parametrize(
    "kernels,variant", [("v2", "send_with_meta"), ("best", "send_with_meta"), ("best", "symmem_defer")]
)
@pytest.mark.parametrize(
    "payload,layout", [("nvfp4", "swizzled"), ("fp8", "linear"), ("bf16", "linear")], ids=["nvfp4", "fp8", "bf16"]
)
def test_ht_epbuffer_nvlink_kernels_v2_equal_torch_v1(payload, layout, kernels, variant):
    """The v2 kernels (all, or the per-kernel mix of ``"best"``) over emulated NVLink (peer
    stores through aligned word pointers, parallel layout, permute changes), with the rows
    sent right after the count exchange (offsets computed on the device; the default) or
    after the host read the counts, give the bits of the torch backend's v1 kernels."""
    from tests.distributed import run_distributed

    H = 128 if payload == "fp8" else 80
    out = run_distributed(_ht_compare, 2, payload, layout, [37, 3], 5, H, variant, kernels)
    assert len(out) == 2


def _error_case_inputs(pg, seed):
    """Inputs of the early-send error tests (host path ``send_with_meta``): sizes, whether
    this rank is the bad one (rank 1), its ``(x, ids, weights)``, and ids sending every
    token of every rank to expert 0 (rank 0: ``R * T`` rows and pairs)."""
    from fp4comm.ep.backend_nvlink import set_host_variant

    set_host_variant("send_with_meta")
    R, E, K, H, T = pg.world_size, 8, 3, 64, 6
    xs, ids, ws = make_inputs(R, [T] * R, H, E, K, seed=seed)
    i = ids[pg.rank]
    hot = torch.full_like(i, -1)
    hot[:, 0] = 0
    return R, E, K, H, T, pg.rank == 1, (xs[pg.rank], i, ws[pg.rank]), hot


def _ht_send_with_meta_errors(pg):
    """The early send (rows stored before the host sees the counts) stores nothing when any
    rank's input is bad or a receiver would overflow: every rank raises the same error, the
    receive buffers keep their bytes, and the next dispatch is correct."""
    import torch.distributed as dist

    from fp4comm.ep import EPBuffer

    R, E, K, H, T, bad, (x, i, w), hot = _error_case_inputs(pg, 41)
    kw = dict(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=T, payload="nvfp4")
    cases = [
        ("dtype", dict(), lambda: (x.float() if bad else x, i, w), r"^x: " if bad else r"^x: invalid on rank 1"),
        ("range", dict(), lambda: (x, torch.full_like(i, E) if bad else i, w), r"^topk_ids: values outside"),
        ("max_recv", dict(max_recv_tokens=R * T - 1), lambda: (x, hot, w), r"^max_recv_tokens: receive overflow"),
    ]
    for name, extra, args, match in cases:
        with EPBuffer(backend="nvlink", **kw, **extra) as nv:
            assert nv.backend.sends_with_meta
            recv = nv.backend._recv.local
            recv.fill_(0x5A)
            dist.barrier()
            with pytest.raises((TypeError, ValueError), match=match):
                nv.dispatch(*args())
            dist.barrier()  # every rank's pack ran (or not) before its raise
            assert bool((recv == 0x5A).all()), name
            d = nv.dispatch(x, i, w)  # still in sync, correct
            with EPBuffer(backend="torch", **kw) as ref:
                b = ref.dispatch(x, i, w)
                assert torch.equal(d.masked_m, b.masked_m), name
                assert torch.equal(d.scales.view(torch.uint8), b.scales.view(torch.uint8)), name
                eo = torch.randn(d.x.shape[0], d.max_m, H, generator=torch.Generator().manual_seed(3)).bfloat16()
                assert torch.equal(nv.combine(eo, d.handle), ref.combine(eo, b.handle)), name
    return len(cases)


def test_ht_send_with_meta_stores_nothing_on_errors():
    from tests.distributed import run_distributed

    assert run_distributed(_ht_send_with_meta_errors, 2) == [3, 3]


@pytest.mark.parametrize("variant", ["symmem", "symmem_defer"])
def test_ht_epbuffer_nvlink_host_variants_equal_torch(variant):
    """The symmetric-memory count exchange (and the deferred dispatch check) give the same
    bits as the torch backend over several calls (epochs advance, slot parity alternates)."""
    from tests.distributed import run_distributed

    out = run_distributed(_ht_compare, 2, "nvfp4", "swizzled", [5, 3], 11, 64, variant)
    assert len(out) == 2


@pytest.mark.parametrize("payload,layout", [("nvfp4", "swizzled"), ("fp8", "linear")], ids=["nvfp4", "fp8"])
def test_ht_nvlink_without_host_sync_equals_torch(payload, layout):
    """``host_sync=False``: dispatch never waits (the permute reads the row count on the
    device, over the whole receive buffer), the counts are checked and the plan built at
    the combine: the same bits, slot map and received-row count as the torch backend (37 + 3
    tokens: a receive capacity of two index chunks, so the histogram and scan phases run on
    the device count too; bf16 on GPUs: ``tests/test_nvlink_gpu.py``, variant ``nosync+best``)."""
    from tests.distributed import run_distributed

    H = 128 if payload == "fp8" else 80
    out = run_distributed(_ht_compare, 2, payload, layout, [37, 3], 9, H, "send_with_meta", "best", False)
    assert len(out) == 2


def test_ht_nvlink_reference_impl_equals_torch():
    """``impl="reference"`` over emulated NVLink (the plain-torch steps write the peers'
    buffers through per-call views, which the Triton path never builds): torch's bits."""
    from tests.distributed import run_distributed

    assert len(run_distributed(_ht_compare, 2, "nvfp4", "swizzled", [5, 3], 13, 64, "symmem_defer", "v1", True,
                               "reference")) == 2  # fmt: skip


def _ht_no_host_sync_errors(pg):
    """``host_sync=False``: a bad input raises in the bad rank's dispatch and, on every other
    rank, at its next call (combine or dispatch) with the message the synced path gives;
    counts errors (ids out of range, receive or ``max_m`` overflow) raise at the next call on
    every rank; no rows of a bad call are stored; the buffer then works again."""
    import torch.distributed as dist

    from fp4comm.ep import EPBuffer

    R, E, K, H, T, bad, (x, i, w), hot = _error_case_inputs(pg, 43)
    kw = dict(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=T, payload="nvfp4", host_sync=False)
    cases = [  # (name, buffer kwargs, dispatch args, raises in dispatch?, message, next call)
        ("dtype", dict(max_m=128), lambda: (x.float() if bad else x, i, w), bad,
         r"^x: " if bad else r"^x: invalid on rank 1 .*output is invalid", "combine"),
        ("range", dict(max_m=128), lambda: (x, torch.full_like(i, E) if bad else i, w), False,
         r"^topk_ids: values outside .*that dispatch sent no rows", "dispatch"),
        ("max_recv", dict(max_m=128, max_recv_tokens=R * T - 1), lambda: (x, hot, w), False,
         r"^max_recv_tokens: receive overflow.*that dispatch sent no rows", "combine"),
    ]  # fmt: skip
    for name, extra, args, now, match, then in cases:
        with EPBuffer(backend="nvlink", **kw, **extra) as nv:
            recv = nv.backend._recv.local
            recv.fill_(0x5A)
            dist.barrier()
            if now:
                with pytest.raises((TypeError, ValueError), match=match):
                    nv.dispatch(*args())
            else:
                d = nv.dispatch(*args())
                assert isinstance(d.masked_m, torch.Tensor)
            dist.barrier()  # every rank's pack ran (or not)
            assert bool((recv == 0x5A).all()), name
            if not now:
                with pytest.raises(ValueError, match=match):
                    if then == "combine":
                        nv.combine(torch.zeros(E // R, 128, H, dtype=torch.bfloat16), d.handle)
                    else:
                        nv.dispatch(x, i, w)
                with pytest.raises(RuntimeError, match="failed"):
                    d.handle.plan  # noqa: B018 (the failed dispatch's plan)
            failed = None if now else d
            d = nv.dispatch(x, i, w)  # in step again, correct
            if not now:  # asking the failed handle again does not resolve the new dispatch
                with pytest.raises(RuntimeError, match="failed"):
                    failed.handle.plan  # noqa: B018
                assert nv._deferred is not None and nv._deferred[0] is d.handle.plan_ref
            with EPBuffer(backend="torch", **{**kw, "host_sync": True}, **extra) as ref:
                b = ref.dispatch(x, i, w)
                assert torch.equal(d.masked_m, b.masked_m), name
                assert torch.equal(d.scales.view(torch.uint8), b.scales.view(torch.uint8)), name
                eo = torch.randn(d.x.shape[0], d.max_m, H, generator=torch.Generator().manual_seed(3)).bfloat16()
                assert torch.equal(nv.combine(eo, d.handle), ref.combine(eo, b.handle)), name
    # max_m overflow: stored (the pack does not know max_m), laid out up to max_m, raised next
    with EPBuffer(backend="nvlink", **{**kw, "max_tokens_per_rank": 80}, max_m=128) as nv:
        xs, ids, ws = make_inputs(R, [80] * R, H, E, K, seed=44)
        hot = torch.full_like(ids[pg.rank], -1)
        hot[:, 0] = 1  # 160 pairs to expert 1
        d = nv.dispatch(xs[pg.rank], hot, ws[pg.rank])
        if pg.rank == 0:
            assert int(d.masked_m[1]) == 160  # the true count; grouped_gemm_masked clamps to max_m
        with pytest.raises(ValueError, match=r"^max_m: receive overflow, expert 1 .* > max_m=128; that dispatch"):
            nv.combine(torch.zeros(E // R, 128, H, dtype=torch.bfloat16), d.handle)
        d = nv.dispatch(xs[pg.rank], ids[pg.rank], ws[pg.rank])
        assert d.num_recv_tokens == int(d.handle.plan.num_recv) > 0
    return len(cases)


def test_ht_no_host_sync_errors_raise_at_the_next_call():
    from tests.distributed import run_distributed

    assert run_distributed(_ht_no_host_sync_errors, 2) == [3, 3]


def test_host_sync_false_needs_nvlink_and_max_m():
    from tests.distributed import run_distributed

    assert run_distributed(_host_sync_config, 1) == [3]


def _host_sync_config(pg):
    from fp4comm.ep import EPBuffer

    kw = dict(hidden=64, num_experts=8, num_topk=2, max_tokens_per_rank=4, host_sync=False)
    with pytest.raises(ValueError, match="^host_sync: False needs backend='nvlink'"):
        EPBuffer(backend="torch", max_m=128, **kw)
    with pytest.raises(ValueError, match="^host_sync: False needs an int max_m"):
        EPBuffer(backend="nvlink", **kw)
    with pytest.raises(TypeError, match="^host_sync: expected a bool"):
        EPBuffer(backend="nvlink", max_m=128, **{**kw, "host_sync": 0})
    return 3


# ----------------------------------------------------------------------------- sm_90 compile check
_COMPILE_SCRIPT = r'''
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
TY = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv", torch.uint8: "u8",
      torch.int32: "i32", torch.int64: "i64"}
done = []
def compile_only(self, *args, grid, warmup, **kw):
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    vals = dict(zip(self.arg_names, args)); vals.update(kw)
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(self.params):  # mimic the JIT's specialization (16-divisibility, ==1)
        v, spec = vals[p.name], not p.do_not_specialize
        if p.is_constexpr or (spec and isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[p.name] = "constexpr"; consts[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TY[v.dtype]
            if v.data_ptr() % 16 == 0: attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool): sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if spec and v % 16 == 0: attrs[(i,)] = [["tt.divisibility", 16]]
        else: sig[p.name] = "fp32"
    triton.compile(ASTSource(self, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    done.append(self.fn.__name__)
JITFunction.run = compile_only
import fp4comm._runtime as rt
rt.triton_interpreting = lambda: True  # let the buffer take CPU tensors; kernels only compile
from fp4comm.ep.low_latency import LowLatencyBuffer, LowLatencyConfig
from fp4comm.ep.symmem import EmulatedWorld
R, E, K, H, T = 2, 8, 4, 1024, 5
for v, p, l, c in [(v, *pl) for v in ("v1", "v2") for pl in [("nvfp4", "linear", "bf16"), ("nvfp4", "swizzled", "nvfp4"), ("fp8", "linear", "fp8"), ("bf16", "linear", "bf16")]]:
    cfg = LowLatencyConfig(hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=16, payload=p, scale_layout=l, combine_payload=c, variant=v)
    b = LowLatencyBuffer(cfg, mem=EmulatedWorld(R).rank(0), sync_check=False)
    b._num_sms, b._gpu = 132, True  # the GPU variant (inline PTX: globaltimer, ld.acquire, fences)
    b._compile_all()  # the constructor's GPU-only warm-up: must leave full-size output sets
    shapes = [tuple(s["x"].shape[:2]) for s in b._out_sets]
    assert shapes == [(E // R, b.max_m)] * 2, shapes
    o = b.dispatch(torch.zeros(T, H).bfloat16(), torch.zeros(T, K, dtype=torch.int32), torch.zeros(T, K))
    b.combine(torch.zeros(E // R, b.max_m, H).bfloat16(), o.handle)
from fp4comm.kernels.nvlink import signal_wait_kernel
f, st = torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
st = torch.zeros(6, dtype=torch.int32)
for plan in (dict(PLAN=False, RP=1), dict(PLAN=True, RP=2)):  # the dispatch flag kernel also writes the plan rows
    signal_wait_kernel[(2,)](f, f, st, f, 1, 3, 0, 2, 1000, f, torch.zeros(18, dtype=torch.int64), 16,
                             STATUS_SLOT=0, SIGNAL=True, WAIT=True, GPU=True, num_warps=1, **plan)
from fp4comm.kernels.nvlink import meta_exchange_kernel
m = torch.zeros(64, dtype=torch.int64)
meta_exchange_kernel[(2,)](m, f, f, f, m, m, f, 1, 3, 10, 2, 1000, WP=16, SIGNAL=True, WAIT=True, GPU=True, num_warps=1)
print("COMPILED", len(done), sorted(set(done)))
'''


def test_nvlink_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects (the first GPU run failed on a
    loop variable redefined in a branch): compile every low-latency kernel variant, the
    flag kernel and the count-exchange kernel for sm_90 in a subprocess without TRITON_INTERPRET. No GPU needed."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "COMPILED 67" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


@triton.jit
def _plan_rows_kernel(meta_ptr, W, rank, R, out_ptr, RP: tl.constexpr):
    _plan_rows(meta_ptr, W, rank, R, out_ptr, RP)


@pytest.mark.parametrize("R", [2, 3, 4])
def test_device_plan_rows_equal_plan_array(R):
    """The early send's plan rows, computed by the dispatch flag kernel from the exchanged
    vectors, equal the host's ``plan_array`` for every rank (uneven counts, zeros included)."""
    import numpy as np

    from fp4comm.ep.backend import PLAN_ROWS, plan_array

    W = 2 + R + 5
    counts = np.random.default_rng(R).integers(0, 50, size=(R, R))
    counts[0, R - 1] = 0
    meta = torch.zeros(R, W, dtype=torch.int64)
    meta[:, 2 : 2 + R] = torch.from_numpy(counts)
    meta[:, 2 + R :] = 7  # per-expert words: ignored
    for rank in range(R):
        out = torch.full((len(PLAN_ROWS), R), -99, dtype=torch.int64)
        _plan_rows_kernel[(1,)](meta, W, rank, R, out, RP=triton.next_power_of_2(R))
        assert np.array_equal(out.numpy(), plan_array(counts, rank)), (rank, out, plan_array(counts, rank))
