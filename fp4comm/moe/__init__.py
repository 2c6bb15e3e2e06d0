"""Expert compute: masked grouped GEMM over the dispatch layout, fused SiLU-and-mul with
NVFP4 re-quantization, routing, and the expert-parallel MoE layer ``EPMoE``."""

from .activation import silu_and_mul
from .gemm import GemmConfig, dequantize_masked, dequantize_weights, grouped_gemm_masked, operand_format, quantize_weights
from .layer import EPMoE, LocalDispatcher, MoEConfig, random_moe_state_dict
from .router import select_experts

__all__ = [
    "EPMoE",
    "GemmConfig",
    "LocalDispatcher",
    "MoEConfig",
    "dequantize_masked",
    "dequantize_weights",
    "grouped_gemm_masked",
    "operand_format",
    "quantize_weights",
    "random_moe_state_dict",
    "select_experts",
    "silu_and_mul",
]
