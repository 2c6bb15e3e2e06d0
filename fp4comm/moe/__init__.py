"""Expert compute: masked grouped GEMM over the dispatch layout, fused SiLU-and-mul with
NVFP4 re-quantization, routing, and the expert-parallel MoE layer ``EPMoE``."""

from .activation import silu_and_mul
from .gemm import GemmConfig, dequantize_weights, grouped_gemm_masked, operand_format, quantize_weights

__all__ = [
    "GemmConfig",
    "silu_and_mul",
    "grouped_gemm_masked",
    "quantize_weights",
    "dequantize_weights",
    "operand_format",
]
