"""Accuracy of the EP MoE layer against the dense FP32 reference.

Metrics (``ref`` = ``EPMoE.reference_forward``, FP32; ``y`` = the layer's BF16 output):
  * ``sqnr_db = 10 log10(sum ref^2 / sum (y - ref)^2)`` over all tokens and channels;
  * ``max_rel_err = max |y - ref| / max |ref|`` (largest error relative to the output's
    range; element-wise ratios are meaningless next to zeros).

Inputs: ``gaussian`` (``N(0, 1)`` tokens) and ``outliers`` (the same with a few channels
100x larger, as real activations have). On the outlier input the NVFP4 dispatch is run with
the per-token global scale and with a single static scale *calibrated on Gaussian data*
(``gs = 2688 / amax`` of a calibration batch): the static scale saturates the outlier
blocks at E4M3's 448, per-token scaling adapts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..formats import GS_NUMERATOR

__all__ = [
    "AccuracyRow",
    "evaluate",
    "format_report",
    "gaussian_input",
    "max_rel_err",
    "outlier_input",
    "run_report",
    "sqnr_db",
    "static_scale_from",
]


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref = ref.double()
    noise = (y.double() - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)


def max_rel_err(ref: torch.Tensor, y: torch.Tensor) -> float:
    return (y.double() - ref.double()).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def gaussian_input(T: int, H: int, *, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g).to(device, torch.bfloat16)


def outlier_input(T: int, H: int, *, seed: int = 0, channels: int = 4, factor: float = 100.0, device="cpu"):
    """Gaussian tokens with ``channels`` fixed channels scaled by ``factor``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    idx = torch.randperm(H, generator=torch.Generator().manual_seed(1234))[:channels]
    x[:, idx] *= factor
    return x.to(device, torch.bfloat16)


def static_scale_from(x: torch.Tensor) -> float:
    """A calibrated static NVFP4 encode scale: ``2688 / amax(x)``."""
    return GS_NUMERATOR / float(x.float().abs().max())


@dataclass
class AccuracyRow:
    input: str
    payload: str
    weights: str
    global_scale: str
    sqnr_db: float
    max_rel_err: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def evaluate(layer, x: torch.Tensor, name: str, gs_label: str = "per_token") -> AccuracyRow:
    """Run ``layer(x)`` and compare with its dense FP32 reference (same routing)."""
    y = layer(x)
    ref = layer.reference_forward(x, routing=layer.last_routing)
    c = layer.config
    return AccuracyRow(name, c.payload, c.weight_format, gs_label if c.payload == "nvfp4" else "-",
                       sqnr_db(ref, y.float()), max_rel_err(ref, y.float()))


def format_report(rows: list[AccuracyRow]) -> str:
    head = f"{'input':<9} {'payload':<7} {'weights':<7} {'global scale':<22} {'SQNR dB':>8} {'max rel err':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.input:<9} {r.payload:<7} {r.weights:<7} {r.global_scale:<22} {r.sqnr_db:8.2f} {r.max_rel_err:11.4f}"
        )
    return "\n".join(lines)


def run_report(
    config,
    state_dict,
    num_tokens: int,
    *,
    group=None,
    device=None,
    seed: int = 0,
    payloads=("nvfp4", "fp8", "bf16"),
    weight_formats=("bf16", "fp8", "nvfp4"),
    impl: str = "auto",
) -> list[AccuracyRow]:
    """The accuracy table: every payload x weight format on Gaussian and outlier inputs,
    plus NVFP4 with a static scale calibrated on Gaussian data on the outlier input.
    Collective when distributed (every rank builds the same layers); each rank feeds its
    own tokens (``seed + rank``) and reports its own numbers."""
    from dataclasses import replace

    import torch.distributed as dist

    from .layer import EPMoE

    rank = dist.get_rank(group) if dist.is_initialized() else 0
    H = config.hidden
    rows = []
    calib = None

    def layer_for(**kw):
        return EPMoE(replace(config, **kw), group, device=device, impl=impl).load_weights(state_dict, keep_reference=True)

    for payload in payloads:
        for wf in weight_formats:
            layer = layer_for(payload=payload, weight_format=wf, global_scale="per_token")
            dev = layer.device
            xg = gaussian_input(num_tokens, H, seed=seed + rank, device=dev)
            xo = outlier_input(num_tokens, H, seed=seed + rank, device=dev)
            calib = gaussian_input(num_tokens, H, seed=seed + 1000, device=dev)
            rows.append(evaluate(layer, xg, "gaussian"))
            rows.append(evaluate(layer, xo, "outliers"))
            layer.destroy()
    if "nvfp4" in payloads:
        gs = static_scale_from(calib)
        layer = layer_for(payload="nvfp4", weight_format=weight_formats[0], global_scale=gs)
        xo = outlier_input(num_tokens, H, seed=seed + rank, device=layer.device)
        rows.append(evaluate(layer, xo, "outliers", "static (gaussian calib)"))
        layer.destroy()
    return rows
