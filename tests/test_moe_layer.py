"""Routing, the EPMoE layer (single device and 2 gloo ranks) and its accuracy report.

Accuracy floors are SQNR (dB) of the layer's BF16 output against the dense FP32 reference
with the original weights (same routing), measured margins below the observed values:
BF16 everything ~46 dB, FP8 somewhere ~26-35 dB, NVFP4 somewhere ~14-21 dB.
"""

from dataclasses import replace

import pytest
import torch

from fp4comm.moe import EPMoE, MoEConfig, random_moe_state_dict, select_experts
from fp4comm.moe.accuracy import (
    AccuracyRow,
    evaluate,
    format_report,
    gaussian_input,
    max_rel_err,
    outlier_input,
    run_report,
    sqnr_db,
    static_scale_from,
)

from .distributed import dist_pool  # noqa: F401  (fixture)
from .distributed import backend_params

BASE = MoEConfig(
    hidden=256, intermediate=128, num_experts=8, top_k=2, scoring="sigmoid", num_expert_group=4, topk_group=2,
    correction_bias=True, routed_scaling_factor=2.5, shared_intermediate=64, max_tokens_per_rank=64,
)  # fmt: skip
T = 32
# SQNR floors by the least precise of (payload incl. GEMM2 input, weights)
FLOOR = {"bf16": 40.0, "fp8": 22.0, "nvfp4": 12.0}
RANK = {"bf16": 0, "fp8": 1, "nvfp4": 2}


def floor_for(payload, weights):
    worst = max(payload, weights, key=RANK.get)
    return FLOOR[worst]


# ----------------------------------------------------------------------------- routing
def _route_oracle(logits, k, scoring, groups, topk_group, bias, scale, renorm):
    """Token by token, in plain Python order (independent of the vectorized reference)."""
    T, E = logits.shape
    ws, ids = [], []
    for t in range(T):
        s = torch.softmax(logits[t].double(), 0) if scoring == "softmax" else torch.sigmoid(logits[t].double())
        c = s + (bias.double() if bias is not None else 0)
        allowed = list(range(E))
        if groups:
            gsz = E // groups
            gscore = []
            for g in range(groups):
                vals = sorted(c[g * gsz : (g + 1) * gsz].tolist(), reverse=True)
                gscore.append(sum(vals[:2]) if scoring == "sigmoid" else vals[0])
            best = sorted(range(groups), key=lambda g: -gscore[g])[:topk_group]
            allowed = [e for e in range(E) if e // gsz in best]
        chosen = sorted(allowed, key=lambda e: -c[e].item())[:k]
        w = torch.stack([s[e] for e in chosen])
        if renorm:
            w = w / w.sum()
        ws.append(w * scale)
        ids.append(chosen)
    return torch.stack(ws).float(), torch.tensor(ids, dtype=torch.int32)


@pytest.mark.parametrize(
    "scoring,groups,topk_group,bias,renorm",
    [("softmax", None, None, False, True), ("softmax", None, None, False, False), ("softmax", 4, 2, False, True),
     ("sigmoid", 4, 2, True, True), ("sigmoid", 8, 3, True, True), ("sigmoid", None, None, True, False)],
    ids=["softmax", "softmax-norenorm", "softmax-groups", "v3", "v3-8groups", "sigmoid-bias"],
)  # fmt: skip
def test_router_matches_oracle(scoring, groups, topk_group, bias, renorm):
    g = torch.Generator().manual_seed(3)
    E, k = 16, 4
    logits = torch.randn(20, E, generator=g)
    b = torch.randn(E, generator=g) * 0.3 if bias else None
    w, ids = select_experts(logits, k, scoring=scoring, renormalize=renorm, num_expert_group=groups,
                            topk_group=topk_group, correction_bias=b, routed_scaling_factor=2.5)  # fmt: skip
    w_o, ids_o = _route_oracle(logits, k, scoring, groups, topk_group, b, 2.5, renorm)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, ids_o)
    torch.testing.assert_close(w, w_o, rtol=1e-6, atol=1e-7)


def test_router_bad_args():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="^top_k: must be <= num_experts"):
        select_experts(logits, 9)
    with pytest.raises(ValueError, match="^scoring"):
        select_experts(logits, 2, scoring="relu")
    with pytest.raises(ValueError, match="^num_expert_group: give both"):
        select_experts(logits, 2, num_expert_group=2)
    with pytest.raises(ValueError, match="^num_expert_group: must divide"):
        select_experts(logits, 2, num_expert_group=3, topk_group=1)
    with pytest.raises(ValueError, match="^top_k: 5 experts do not fit"):
        select_experts(logits, 5, num_expert_group=4, topk_group=2)
    with pytest.raises(ValueError, match="^correction_bias: expected shape"):
        select_experts(logits, 2, correction_bias=torch.zeros(7))
    with pytest.raises(TypeError, match="^logits: dtype"):
        select_experts(logits.long(), 2)


# ----------------------------------------------------------------------------- single device
@pytest.fixture(scope="module")
def state_dict():
    return random_moe_state_dict(BASE, seed=1)


@pytest.mark.parametrize("weights", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("payload", ["bf16", "fp8", "nvfp4"])
def test_layer_accuracy_local(device, state_dict, payload, weights):
    layer = EPMoE(replace(BASE, payload=payload, weight_format=weights), device=device)
    layer.load_weights(state_dict, keep_reference=True)
    x = gaussian_input(T, BASE.hidden, device=device)
    y = layer(x)
    assert y.shape == (T, BASE.hidden) and y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    ref = layer.reference_forward(x)  # routes by itself: the same experts as the layer
    assert torch.equal(layer.reference_forward(x, routing=layer.last_routing)[:1], ref[:1])
    assert sqnr_db(ref, y.float()) >= floor_for(payload, weights), sqnr_db(ref, y.float())


def test_per_token_scale_beats_static_on_outliers(device, state_dict):
    """A static NVFP4 scale calibrated on Gaussian activations saturates outlier channels at
    E4M3's 448; the per-token scale adapts (measured: ~21 dB vs < 1 dB)."""
    x_cal = gaussian_input(T, BASE.hidden, seed=99, device=device)
    xo = outlier_input(T, BASE.hidden, device=device)
    cfg = replace(BASE, payload="nvfp4", weight_format="bf16", intermediate_quant="none")
    per_tok = evaluate(EPMoE(cfg, device=device).load_weights(state_dict, keep_reference=True), xo, "outliers")
    static = EPMoE(replace(cfg, global_scale=static_scale_from(x_cal)), device=device)
    static_row = evaluate(static.load_weights(state_dict, keep_reference=True), xo, "outliers", "static")
    assert per_tok.sqnr_db >= 18.0, per_tok
    assert per_tok.sqnr_db >= static_row.sqnr_db + 10.0, (per_tok, static_row)
    assert per_tok.max_rel_err < static_row.max_rel_err


def test_accuracy_metrics():
    ref = torch.tensor([1.0, -2.0, 4.0])
    assert sqnr_db(ref, ref) == float("inf")
    assert abs(sqnr_db(ref, ref * 1.1) - 20.0) < 1e-4  # noise = 0.1 * signal (1.1 not exact in FP32)
    assert abs(max_rel_err(ref, ref + torch.tensor([0.0, 0.5, 0.0])) - 0.125) < 1e-12
    rows = [AccuracyRow("gaussian", "nvfp4", "bf16", "per_token", 20.0, 0.1)]
    assert "per_token" in format_report(rows)


def test_state_dict_errors(state_dict):
    layer = EPMoE(BASE, device="cpu")
    with pytest.raises(RuntimeError, match="load_weights"):
        layer(torch.zeros(2, BASE.hidden, dtype=torch.bfloat16))
    sd = dict(state_dict)
    del sd["experts.3.up_proj.weight"]
    with pytest.raises(KeyError, match="experts.3.up_proj.weight"):
        layer.load_weights(sd)
    sd = dict(state_dict)
    sd["experts.0.down_proj.weight"] = sd["experts.0.down_proj.weight"].T
    with pytest.raises(ValueError, match=r"^state_dict\['experts.0.down_proj.weight'\]: expected shape \[256, 128\]"):
        layer.load_weights(sd)
    layer.load_weights(state_dict)
    with pytest.raises(ValueError, match="^x: expected shape"):
        layer(torch.zeros(2, 128, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="^x: dtype"):
        layer(torch.zeros(2, BASE.hidden))
    with pytest.raises(ValueError, match="^state_dict: none given"):
        layer.reference_forward(torch.zeros(2, BASE.hidden))


def test_config_errors():
    with pytest.raises(ValueError, match="^payload"):
        EPMoE(replace(BASE, payload="int4"))
    with pytest.raises(ValueError, match="^weight_format: fp8 weights need"):
        EPMoE(replace(BASE, weight_format="fp8", intermediate=48))
    with pytest.raises(ValueError, match="^hidden: must be a multiple of 16"):
        EPMoE(replace(BASE, hidden=100))
    with pytest.raises(ValueError, match="^global_scale"):
        EPMoE(replace(BASE, global_scale=-1.0))


def test_empty_batch_and_unrouted(device, state_dict):
    layer = EPMoE(replace(BASE, shared_intermediate=0), device=device).load_weights(state_dict)
    y = layer(torch.zeros(0, BASE.hidden, dtype=torch.bfloat16, device=device))
    assert y.shape == (0, BASE.hidden)


# ----------------------------------------------------------------------------- 2 gloo ranks
def _ep_worker(pg, configs):
    sd = random_moe_state_dict(BASE, seed=1)
    out = []
    for payload, weights, backend in configs:
        cfg = replace(BASE, payload=payload, weight_format=weights, backend=backend)
        layer = EPMoE(cfg, device=pg.device).load_weights(sd, keep_reference=True)
        assert list(layer.expert_range) == list(range(pg.rank * 4, pg.rank * 4 + 4))
        # uneven token counts: rank 1 has fewer tokens
        x = gaussian_input(T - 12 * pg.rank, BASE.hidden, seed=10 + pg.rank, device=pg.device)
        y1 = layer(x)
        ref = layer.reference_forward(x, routing=layer.last_routing)
        y2 = layer(x)  # the same bits again (deterministic dispatch order)
        out.append((payload, weights, sqnr_db(ref, y1.float()), bool(torch.equal(y1, y2))))
        layer.destroy()
    return out


def test_ep_layer_two_ranks(dist_pool):  # noqa: F811
    configs = [("nvfp4", "nvfp4", "torch"), ("fp8", "fp8", "torch"), ("bf16", "bf16", "torch")]
    results = dist_pool(2).run(_ep_worker, configs, timeout=200)
    for rank_rows in results:
        for payload, weights, sqnr, deterministic in rank_rows:
            assert sqnr >= floor_for(payload, weights), (payload, weights, sqnr)
            assert deterministic


# ----------------------------------------------------------------------------- NCCL ranks (GPUs)
def _ep_nccl_worker(pg, configs):
    """Each rank: its share of the experts at real-ish width, uneven token counts, every
    payload x weight format given; SQNR against the dense FP32 reference on the same
    routing and bitwise determinism of a second call."""
    from fp4comm.ep import available_backends

    cfg0 = replace(BASE, hidden=1024, intermediate=256, num_experts=16, max_tokens_per_rank=512)
    sd = random_moe_state_dict(cfg0, seed=3, device=pg.device)
    El = cfg0.num_experts // pg.world_size
    out = []
    for payload, weights, backend in configs:
        if backend not in available_backends():  # nvlink needs nvshmem4py
            continue
        cfg = replace(cfg0, payload=payload, weight_format=weights, backend=backend)
        layer = EPMoE(cfg, device=pg.device).load_weights(sd, keep_reference=True)
        assert list(layer.expert_range) == list(range(pg.rank * El, (pg.rank + 1) * El))
        x = gaussian_input(512 - 100 * pg.rank, cfg.hidden, seed=20 + pg.rank, device=pg.device)
        y1 = layer(x)
        ref = layer.reference_forward(x, routing=layer.last_routing)
        y2 = layer(x)
        torch.cuda.synchronize()
        out.append((payload, weights, backend, sqnr_db(ref, y1.float()), bool(torch.equal(y1, y2))))
        layer.destroy()
    return out


@pytest.mark.parametrize(
    "world_size,backend", [p for p in backend_params((2, 4)) if p.values[1] == "nccl"], ids=lambda v: str(v)
)
def test_ep_layer_nccl(dist_pool, world_size, backend):  # noqa: F811
    configs = [(p, w, "torch") for p, w in (("nvfp4", "bf16"), ("nvfp4", "nvfp4"), ("fp8", "fp8"), ("bf16", "bf16"))]
    configs += [("nvfp4", "bf16", "nvlink")]
    results = dist_pool(world_size, backend).run(_ep_nccl_worker, configs, timeout=300)
    for rank_rows in results:
        for payload, weights, ep_backend, sqnr, deterministic in rank_rows:
            assert sqnr >= floor_for(payload, weights), (payload, weights, ep_backend, sqnr)
            assert deterministic, (payload, weights, ep_backend)


def _report_worker(pg):
    cfg = replace(BASE, shared_intermediate=0)
    sd = random_moe_state_dict(cfg, seed=2)
    rows = run_report(cfg, sd, 16, payloads=("nvfp4",), weight_formats=("bf16",), device=pg.device)
    return [r.as_dict() for r in rows]


def test_accuracy_report_two_ranks(dist_pool):  # noqa: F811
    per_rank = dist_pool(2).run(_report_worker, timeout=200)
    for rows in per_rank:
        by = {(r["input"], r["global_scale"]): r["sqnr_db"] for r in rows}
        assert by[("outliers", "per_token")] > by[("outliers", "static (gaussian calib)")] + 10


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("payload", ["nvfp4", "fp8", "bf16"])
def test_gpu_layer_local_real_width(payload):
    cfg = MoEConfig(hidden=2048, intermediate=512, num_experts=32, top_k=8, scoring="sigmoid", num_expert_group=8,
                    topk_group=4, correction_bias=True, routed_scaling_factor=2.5, shared_intermediate=512,
                    payload=payload, weight_format="fp8", max_tokens_per_rank=1024)  # fmt: skip
    sd = random_moe_state_dict(cfg, seed=0, device="cuda")
    layer = EPMoE(cfg, device="cuda").load_weights(sd, keep_reference=True)
    row = evaluate(layer, gaussian_input(1024, cfg.hidden, device="cuda"), "gaussian")
    assert row.sqnr_db >= floor_for(payload, "fp8"), row


def test_bench_smoke(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_moe import main

    res = main(["--smoke", "--out", str(tmp_path)])
    assert set(res) == {"prefill", "decode", "epmoe"}
    data = json.loads((tmp_path / "bench_moe_epmoe.json").read_text())
    assert [(r["payload"], r["act_path"]) for r in data["rows"]] == [
        ("bf16", "auto"), ("nvfp4", "auto"), ("nvfp4", "registers"), ("nvfp4", "auto")
    ]
    prefill = json.loads((tmp_path / "bench_moe_prefill.json").read_text())["rows"]
    assert {r.get("a_path") for r in prefill} >= {"auto", "registers"}
    assert (tmp_path / "bench_moe_prefill.csv").exists() and (tmp_path / "bench_moe_decode.csv").exists()
