"""``EPMoE``: the expert-parallel MoE layer a model author drops into a transformer.

``forward(x [T, H] bf16)``: router -> ``EPBuffer.dispatch`` (NVFP4 / FP8 / BF16 on the wire,
masked layout on arrival) -> GEMM1 (gate_up) -> fused ``silu_and_mul`` (optionally
re-quantized to NVFP4) -> GEMM2 (down) -> ``EPBuffer.combine`` (weighted sum back on the
source rank) [+ shared expert, run on a side CUDA stream while dispatch communicates].

Weights come from a plain state dict with one tensor per expert, as checkpoints store them
(DeepSeek-V3 / Hugging Face names; ``I`` = ``intermediate``, ``Is`` = ``shared_intermediate``):

=============================================  =========  ============================
key                                            shape      notes
=============================================  =========  ============================
``gate.weight``                                ``[E, H]``  router, used in FP32
``gate.e_score_correction_bias``               ``[E]``     only with ``correction_bias``
``experts.{i}.gate_proj.weight``               ``[I, H]``
``experts.{i}.up_proj.weight``                 ``[I, H]``
``experts.{i}.down_proj.weight``               ``[H, I]``
``shared_experts.{gate,up,down}_proj.weight``  as above   only with ``shared_intermediate``
=============================================  =========  ============================

Rank ``r`` of ``R`` loads experts ``[r * E/R, (r + 1) * E/R)`` and quantizes them to
``weight_format`` at load time (``fp4comm.moe.quantize_weights``).

Process group: ``group=None`` uses the default group when ``torch.distributed`` is
initialized; otherwise the layer runs on one device with all experts local (a
:class:`LocalDispatcher` quantizes and permutes in plain torch) -- handy for single-GPU
benchmarks and tests of the compute path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice, check_positive_int, check_tensor
from .._runtime import round_up
from ..formats import FP8_BLOCK, NVFP4_BLOCK, FP8BlockTensor, NVFP4Tensor, swizzle_scales
from ..reference import moe as _ref
from .activation import silu_and_mul
from .gemm import grouped_gemm_masked, quantize_weights
from .router import SCORINGS, select_experts

__all__ = ["MoEConfig", "EPMoE", "LocalDispatcher", "random_moe_state_dict"]

PAYLOADS = ("nvfp4", "fp8", "bf16")


@dataclass(frozen=True)
class MoEConfig:
    """Static configuration of an :class:`EPMoE` layer (identical on every rank).

    Attributes:
        hidden: ``H`` (multiple of 16; of 128 for fp8 payload or weights).
        intermediate: ``I``, per-expert FFN width (``moe_intermediate_size``).
        num_experts, top_k: routed experts and experts per token.
        scoring, renormalize, num_expert_group, topk_group, routed_scaling_factor: routing,
            see :func:`fp4comm.moe.select_experts`.
        correction_bias: the router has an ``e_score_correction_bias`` (DeepSeek-V3).
        shared_intermediate: width of the shared expert (0: none).
        payload: dispatch wire / masked-layout format ``"nvfp4" | "fp8" | "bf16"``.
        weight_format: expert weights ``"bf16" | "fp8"`` (128x128 blocks) ``| "nvfp4"``.
        intermediate_quant: GEMM2 input: ``"nvfp4"`` (re-quantized by the fused activation),
            ``"none"`` (BF16), or ``"auto"`` (``"nvfp4"`` iff ``payload == "nvfp4"``).
        global_scale: NVFP4 dispatch encode scale, ``"per_token"`` or a static float.
        backend, scale_layout, max_tokens_per_rank: passed to ``EPBuffer``.
        gemm_config: tile configs of the expert GEMMs: ``"auto"`` (autotuned on GPU) or
            ``"heuristic"`` (``fp4comm.moe.gemm._select_config``: no tuning runs, e.g. quick
            benchmarks), see :func:`fp4comm.moe.grouped_gemm_masked`.
        act_path: how FP8 / NVFP4 GEMM inputs reach the tensor cores (``a_path`` of
            :func:`fp4comm.moe.grouped_gemm_masked`): ``"auto"`` (two-pass BF16 at prefill
            sizes on Hopper, in-register dequantization for decode), ``"registers"``, ``"bf16"``.
    """

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    num_expert_group: int | None = None
    topk_group: int | None = None
    correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    shared_intermediate: int = 0
    payload: str = "nvfp4"
    weight_format: str = "bf16"
    intermediate_quant: str = "auto"
    global_scale: str | float = "per_token"
    backend: str = "torch"
    scale_layout: str = "swizzled"
    max_tokens_per_rank: int = 4096
    gemm_config: str = "auto"
    act_path: str = "auto"

    def validate(self) -> None:
        check_positive_int("hidden", self.hidden, multiple_of=NVFP4_BLOCK)
        check_positive_int("intermediate", self.intermediate, multiple_of=NVFP4_BLOCK)
        check_positive_int("num_experts", self.num_experts)
        check_positive_int("top_k", self.top_k)
        check_positive_int("shared_intermediate", self.shared_intermediate, allow_zero=True)
        check_positive_int("max_tokens_per_rank", self.max_tokens_per_rank)
        check_choice("scoring", self.scoring, SCORINGS)
        check_choice("payload", self.payload, PAYLOADS)
        check_choice("weight_format", self.weight_format, _ref.WEIGHT_FORMATS)
        check_choice("intermediate_quant", self.intermediate_quant, ("auto", "nvfp4", "none"))
        check_choice("scale_layout", self.scale_layout, ("linear", "swizzled"))
        check_choice("gemm_config", self.gemm_config, ("auto", "heuristic"))
        check_choice("act_path", self.act_path, ("auto", "registers", "bf16"))
        if self.payload == "fp8" and self.hidden % FP8_BLOCK:
            raise ValueError(f"hidden: must be a multiple of {FP8_BLOCK} for the fp8 payload, got {self.hidden}")
        if self.weight_format == "fp8" and (self.hidden % FP8_BLOCK or self.intermediate % FP8_BLOCK):
            raise ValueError(
                f"weight_format: fp8 weights need hidden and intermediate multiples of {FP8_BLOCK}, "
                f"got {self.hidden}, {self.intermediate}"
            )
        if not isinstance(self.global_scale, str) and not float(self.global_scale) > 0:
            raise ValueError(f"global_scale: must be 'per_token' or a float > 0, got {self.global_scale!r}")
        if isinstance(self.global_scale, str):
            check_choice("global_scale", self.global_scale, ("per_token",))

    @property
    def gemm2_quant(self) -> str:
        if self.intermediate_quant == "auto":
            return "nvfp4" if self.payload == "nvfp4" else "none"
        return self.intermediate_quant


# ----------------------------------------------------------------------------- local dispatch
@dataclass
class _LocalHandle:
    token: torch.Tensor  # [P] source token of each routed (token, k) pair, expert-major
    slot: torch.Tensor  # [P] e * max_m + row
    weight: torch.Tensor  # [P] float32
    num_tokens: int


@dataclass
class _LocalDispatch:
    activations: object
    masked_m: torch.Tensor
    handle: _LocalHandle


class LocalDispatcher:
    """Single-device stand-in for ``EPBuffer`` (all experts local, no communication).

    Same masked layout and rounding as the real dispatch: each token is quantized once
    (NVFP4 per-token or static global scale, FP8 1x128, or BF16), rows ordered by token
    within an expert, ``max_m`` the largest count rounded up to 128; combine sums
    ``w_k * out[slot]`` in FP32 and rounds to BF16 once.
    """

    def __init__(self, num_experts: int, hidden: int, payload: str, scale_layout: str = "swizzled") -> None:
        self.num_experts, self.hidden, self.payload, self.scale_layout = num_experts, hidden, payload, scale_layout

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, global_scale="per_token"):
        from ..quant import quantize_fp8_blockwise, quantize_nvfp4

        T, K = topk_ids.shape
        E, dev = self.num_experts, x.device
        ids = topk_ids.reshape(-1).long()
        valid = (ids >= 0).nonzero().squeeze(1)
        key = ids[valid] * max(T, 1) + valid // K  # expert-major, then token
        order = valid[torch.argsort(key, stable=True)]
        exp, tok = ids[order], order // K
        counts = torch.bincount(exp, minlength=E)
        max_m = max(128, round_up(int(counts.max()) if exp.numel() else 0, 128))
        start = torch.cumsum(counts, 0) - counts
        row = torch.arange(exp.numel(), device=dev) - start[exp]
        slot = exp * max_m + row
        handle = _LocalHandle(tok, slot, topk_weights.reshape(-1)[order].float(), T)
        masked_m = counts.to(torch.int32)

        def scatter(src: torch.Tensor, fill=0) -> torch.Tensor:
            out = torch.full((E * max_m, *src.shape[1:]), fill, dtype=src.dtype, device=dev)
            out[slot] = src[tok]
            return out.view(E, max_m, *src.shape[1:])

        if self.payload == "bf16":
            act = scatter(x.to(torch.bfloat16))
        elif self.payload == "fp8":
            q = quantize_fp8_blockwise(x)
            act = FP8BlockTensor(scatter(q.data.view(torch.uint8)).view(torch.float8_e4m3fn), scatter(q.scales))
        else:
            q = quantize_nvfp4(x, global_scale, scale_layout="linear")
            sf = scatter(q.scales.view(torch.uint8))
            if self.scale_layout == "swizzled":
                sf = swizzle_scales(sf)
            gs = scatter(q.global_scale, 1.0) if q.global_scale.dim() else q.global_scale
            act = NVFP4Tensor(scatter(q.data), sf.view(torch.float8_e4m3fn), gs, self.scale_layout,
                              torch.Size((E, max_m, self.hidden)))
        return _LocalDispatch(act, masked_m, handle)

    def combine(self, expert_out: torch.Tensor, handle: _LocalHandle) -> torch.Tensor:
        H = expert_out.shape[-1]
        acc = torch.zeros(handle.num_tokens, H, dtype=torch.float32, device=expert_out.device)
        rows = expert_out.reshape(-1, H)[handle.slot].float() * handle.weight[:, None]
        acc.index_add_(0, handle.token, rows)
        return acc.to(torch.bfloat16)

    def destroy(self) -> None:
        pass


# ----------------------------------------------------------------------------- weights
def random_moe_state_dict(
    config: MoEConfig,
    *,
    seed: int = 0,
    experts: range | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A plain state dict with random weights (``1/sqrt(fan_in)`` Gaussians), for tests,
    demos and benchmarks. Expert ``i`` depends only on ``(seed, i)``, so every rank can
    build just its own ``experts`` range and still agree with the others."""
    H, I, E, Is = config.hidden, config.intermediate, config.num_experts, config.shared_intermediate
    dev = torch.device(device)

    def rnd(i, *shape, std):
        g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i)
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * std).to(dtype)

    sd = {"gate.weight": rnd(0, E, H, std=H**-0.5)}
    if config.correction_bias:
        sd["gate.e_score_correction_bias"] = rnd(1, E, std=0.05)
    for i in experts if experts is not None else range(E):
        base = 16 + 3 * i
        sd[f"experts.{i}.gate_proj.weight"] = rnd(base, I, H, std=H**-0.5)
        sd[f"experts.{i}.up_proj.weight"] = rnd(base + 1, I, H, std=H**-0.5)
        sd[f"experts.{i}.down_proj.weight"] = rnd(base + 2, H, I, std=I**-0.5)
    if Is:
        sd["shared_experts.gate_proj.weight"] = rnd(2, Is, H, std=H**-0.5)
        sd["shared_experts.up_proj.weight"] = rnd(3, Is, H, std=H**-0.5)
        sd["shared_experts.down_proj.weight"] = rnd(4, H, Is, std=Is**-0.5)
    return sd


def _get(sd: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"state_dict: missing {key!r}")
    t = sd[key]
    check_tensor(f"state_dict[{key!r}]", t, shape=list(shape))
    if not t.is_floating_point():
        raise TypeError(f"state_dict[{key!r}]: expected a float tensor, got {t.dtype}")
    return t


# ----------------------------------------------------------------------------- layer
class EPMoE(nn.Module):
    """Expert-parallel MoE layer (see module docstring).

    Args:
        config: :class:`MoEConfig`.
        group: process group (``None``: the default group if initialized, else single-device).
        device: where weights and activations live (default: ``cuda:<current>`` for NCCL
            groups / when CUDA is available in single-device mode, else CPU).
        impl: ``"auto" | "triton" | "reference"`` for the GEMM and activation ops.

    Quantized expert weights are not ``nn.Parameter``s: construct the layer on its device
    and call :meth:`load_weights`; ``.to()`` does not move them.
    """

    def __init__(self, config: MoEConfig, group=None, *, device: torch.device | str | None = None, impl: str = "auto"):
        super().__init__()
        config.validate()
        self.config = config
        self.impl = impl
        self.distributed = dist.is_initialized()
        if self.distributed:
            self.group = group
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
            nccl = dist.get_backend(group) == "nccl"
            default = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        else:
            if group is not None:
                raise ValueError("group: torch.distributed is not initialized; pass group=None for single-device mode")
            self.group, self.rank, self.world_size = None, 0, 1
            default = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device) if device is not None else default
        if config.num_experts % self.world_size:
            raise ValueError(f"num_experts: must be a multiple of the world size {self.world_size}, got {config.num_experts}")
        self.num_local_experts = config.num_experts // self.world_size
        self.expert_range = range(self.rank * self.num_local_experts, (self.rank + 1) * self.num_local_experts)
        H, E = config.hidden, config.num_experts
        self.gate_weight = nn.Parameter(torch.zeros(E, H, device=self.device), requires_grad=False)
        self.register_buffer("correction_bias", torch.zeros(E, device=self.device) if config.correction_bias else None)
        self.w13 = None  # [El, 2I, H] GEMM operand (gate rows first)
        self.w2 = None  # [El, H, I]
        self.shared = None  # (gate_up [2Is, H], down [H, Is]) bf16
        self._reference_sd: Mapping[str, torch.Tensor] | None = None
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.distributed:
            from ..ep import EPBuffer

            self.dispatcher = EPBuffer(
                group, hidden=H, num_experts=E, num_topk=config.top_k, max_tokens_per_rank=config.max_tokens_per_rank,
                payload=config.payload, backend=config.backend, scale_layout=config.scale_layout, impl=impl,
                device=self.device,
            )  # fmt: skip
        else:
            self.dispatcher = LocalDispatcher(E, H, config.payload, config.scale_layout)
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ---- weights
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], *, keep_reference: bool = False) -> EPMoE:
        """Load router, this rank's experts (quantized to ``weight_format``) and the shared
        expert from a plain state dict (keys in the module docstring). Entries for other
        ranks' experts may be absent. ``keep_reference``: keep a reference to ``state_dict``
        for :meth:`reference_forward` (no copy)."""
        c = self.config
        H, I, E, Is = c.hidden, c.intermediate, c.num_experts, c.shared_intermediate
        dev = self.device
        self.gate_weight.data.copy_(_get(state_dict, "gate.weight", (E, H)).float())
        if c.correction_bias:
            self.correction_bias.copy_(_get(state_dict, "gate.e_score_correction_bias", (E,)).float())
        w13, w2 = [], []
        for i in self.expert_range:
            g = _get(state_dict, f"experts.{i}.gate_proj.weight", (I, H))
            u = _get(state_dict, f"experts.{i}.up_proj.weight", (I, H))
            w13.append(torch.cat([g, u], 0).to(dev, torch.float32))
            w2.append(_get(state_dict, f"experts.{i}.down_proj.weight", (H, I)).to(dev, torch.float32))
        self.w13 = quantize_weights(torch.stack(w13), c.weight_format)
        self.w2 = quantize_weights(torch.stack(w2), c.weight_format)
        if Is:
            sg = _get(state_dict, "shared_experts.gate_proj.weight", (Is, H))
            su = _get(state_dict, "shared_experts.up_proj.weight", (Is, H))
            sdn = _get(state_dict, "shared_experts.down_proj.weight", (H, Is))
            self.shared = (torch.cat([sg, su], 0).to(dev, torch.bfloat16), sdn.to(dev, torch.bfloat16))
        self._reference_sd = state_dict if keep_reference else None
        return self

    # ---- forward
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> (``topk_weights [T, k]`` float32, ``topk_ids [T, k]`` int32)."""
        c = self.config
        logits = F.linear(x.float(), self.gate_weight.float())
        return select_experts(
            logits, c.top_k, scoring=c.scoring, renormalize=c.renormalize, num_expert_group=c.num_expert_group,
            topk_group=c.topk_group, correction_bias=self.correction_bias, routed_scaling_factor=c.routed_scaling_factor,
        )  # fmt: skip

    def _shared_mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.shared
        h = F.linear(x, gate_up)
        n = h.shape[-1] // 2
        return F.linear((F.silu(h[:, :n].float()) * h[:, n:].float()).to(torch.bfloat16), down)

    def forward(self, x: torch.Tensor, *, timer: Callable[[str], contextlib.AbstractContextManager] | None = None):
        """``x [T, H]`` bfloat16 -> ``[T, H]`` bfloat16. ``timer(name)``, if given, wraps the
        phases ``"route"``, ``"dispatch"``, ``"gemm"``, ``"combine"`` (benchmarks)."""
        if self.w13 is None:
            raise RuntimeError("EPMoE: call load_weights(state_dict) first")
        check_tensor("x", x, dtype=torch.bfloat16, shape=[None, self.config.hidden], device=self.device)
        c = self.config
        phase = timer or (lambda name: contextlib.nullcontext())
        with phase("route"):
            topk_weights, topk_ids = self.route(x)
        self.last_routing = (topk_weights, topk_ids)
        shared_out, event = None, None
        if self.shared is not None:
            if self._side_stream is not None:  # overlap with dispatch's communication
                self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._side_stream):
                    shared_out = self._shared_mlp(x)
                    event = torch.cuda.Event()
                    event.record()
            else:
                shared_out = self._shared_mlp(x)
        with phase("dispatch"):
            out = self.dispatcher.dispatch(x, topk_ids, topk_weights, global_scale=c.global_scale)
        with phase("gemm"):
            y = self.experts_forward(out.activations, out.masked_m, num_tokens=x.shape[0])
        with phase("combine"):
            z = self.dispatcher.combine(y, out.handle)
        if shared_out is not None:
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
                shared_out.record_stream(torch.cuda.current_stream(self.device))
            z = (z.float() + shared_out.float()).to(torch.bfloat16)
        return z

    def experts_forward(self, activations, masked_m: torch.Tensor, *, num_tokens: int | None = None) -> torch.Tensor:
        """The expert compute on the masked layout: GEMM1 -> silu_and_mul -> GEMM2.
        ``activations [El, max_m, H]`` (any payload format) -> BF16 ``[El, max_m, H]``."""
        c = self.config
        expected_m = None
        if num_tokens is not None:
            expected_m = max(1, -(-num_tokens * self.world_size * c.top_k // c.num_experts))
        h = grouped_gemm_masked(activations, self.w13, masked_m, expected_m=expected_m, config=c.gemm_config,
                                a_path=c.act_path, impl=self.impl)  # fmt: skip
        act = silu_and_mul(h, masked_m, quantize=c.gemm2_quant, scale_layout=c.scale_layout, impl=self.impl)
        return grouped_gemm_masked(act, self.w2, masked_m, expected_m=expected_m, config=c.gemm_config,
                                   a_path=c.act_path, impl=self.impl)  # fmt: skip

    # ---- reference
    @torch.no_grad()
    def reference_forward(
        self,
        x: torch.Tensor,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        *,
        routing: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Dense FP32 forward with the original (unquantized) weights of *all* experts, on
        ``x``'s device: the accuracy reference. ``state_dict`` defaults to the one kept by
        ``load_weights(..., keep_reference=True)``. ``routing`` = ``(topk_weights, topk_ids)``
        to reuse the layer's routing (e.g. ``self.last_routing``); else routed here in FP32."""
        sd = state_dict if state_dict is not None else self._reference_sd
        if sd is None:
            raise ValueError("state_dict: none given and none kept (load_weights(..., keep_reference=True))")
        c = self.config
        dev = x.device
        if routing is None:
            logits = x.float() @ sd["gate.weight"].to(dev).float().T
            bias = sd.get("gate.e_score_correction_bias") if c.correction_bias else None
            routing = _ref.select_experts_ref(
                logits, c.top_k, scoring=c.scoring, renormalize=c.renormalize, num_expert_group=c.num_expert_group,
                topk_group=c.topk_group, correction_bias=None if bias is None else bias.to(dev),
                routed_scaling_factor=c.routed_scaling_factor,
            )  # fmt: skip
        w, ids = routing

        def expert(e: int, xe: torch.Tensor) -> torch.Tensor:  # weights fetched per routed expert
            g, u, d = (sd[f"experts.{e}.{p}_proj.weight"].to(dev) for p in ("gate", "up", "down"))
            return _ref.mlp_ref(xe, g, u, d)

        out = _ref.routed_experts_ref(x, w.to(dev), ids.to(dev), expert)
        if c.shared_intermediate:
            out += _ref.mlp_ref(
                x, sd["shared_experts.gate_proj.weight"].to(dev), sd["shared_experts.up_proj.weight"].to(dev),
                sd["shared_experts.down_proj.weight"].to(dev),
            )  # fmt: skip
        return out

    def destroy(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.destroy()
            self.dispatcher = None

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"experts {self.expert_range.start}..{self.expert_range.stop - 1} of {c.num_experts}, top_k={c.top_k}, "
            f"H={c.hidden}, I={c.intermediate}, payload={c.payload}, weights={c.weight_format}, "
            f"gemm2_in={c.gemm2_quant}, act_path={c.act_path}, backend={c.backend if self.distributed else 'local'}"
        )
