"""Compile every grouped-GEMM and SiLU-and-mul variant for sm_90 (Hopper) without a GPU:
the interpreter runs neither the inline-PTX E2M1 decode nor FP8 dots, and accepts code the
GPU compiler rejects, so CPU-only CI compiles each variant with Triton's bundled ptxas in
a subprocess without TRITON_INTERPRET (launches are intercepted: nothing runs).

Covered: every A x B operand format (incl. NVFP4 scale layouts and global-scale modes, FP8
with FP32 and UE8M0 scales) with the heuristic prefill and decode tiles; every autotune
candidate of every rows-per-expert bucket for the formats the benchmarks time; the
activation kernel's variants. The PTX of the NVFP4-activation variants (and of NVFP4
weights under decode tiles) must contain the prmt-based decode, and FP8 x FP8 under wgmma
tiles an FP8 wgmma.
"""

import textwrap

from tests.sm90 import compile_calls

_BODY = r'''
import sys, time
import fp4comm.moe.gemm as G
import fp4comm.moe.activation as ACT
from fp4comm.moe import GemmConfig, grouped_gemm_masked, quantize_weights, silu_and_mul
from fp4comm.reference.quant import quantize_fp8_blockwise_ref, quantize_nvfp4_ref
force_triton(G, ACT)
G._gpu_codegen = lambda d: True
ACT._gpu_codegen = lambda d: True

E, M, K, N = 2, 64, 512, 256
g = torch.Generator().manual_seed(0)
x = torch.randn(E, M, K, generator=g); w = torch.randn(E, N, K, generator=g) / K**0.5
A = {
    "bf16": x.bfloat16(),
    "fp8": quantize_fp8_blockwise_ref(x),
    "fp8-ue8m0": quantize_fp8_blockwise_ref(x, 128, True),
    "nvfp4-linear": quantize_nvfp4_ref(x, "per_token", scale_layout="linear"),
    "nvfp4-swizzled": quantize_nvfp4_ref(x, "per_token", scale_layout="swizzled"),
    "nvfp4-static": quantize_nvfp4_ref(x, 100.0, scale_layout="swizzled"),
}
B = {
    "bf16": quantize_weights(w, "bf16"),
    "fp8": quantize_weights(w, "fp8"),
    "nvfp4": quantize_weights(w, "nvfp4"),
    "nvfp4-swizzled-rowgs": quantize_nvfp4_ref(w, "per_token", scale_layout="swizzled"),
}
masked = torch.full((E,), M, dtype=torch.int32)
def gemm(a, b, cfg):
    grouped_gemm_masked(a, b, masked, config=cfg, a_path="registers")
only = ONLY
t0 = time.time()
if only in ("all", "formats"):
    for an, a in A.items():
        for bn, b in B.items():
            for cfg in (G._select_config(512, N, K, an.split("-")[0], bn.split("-")[0], interpreter=False),
                        G._select_config(8, N, K, an.split("-")[0], bn.split("-")[0], interpreter=False)):
                if ("fp8" in (an[:3], bn[:3])) and 128 % cfg.block_k:
                    cfg = GemmConfig(cfg.block_m, cfg.block_n, 64, cfg.loop_m, cfg.num_warps, cfg.num_stages)
                gemm(a, b, cfg)
    n_formats = len(KERNELS)
    print("FORMATS", n_formats, flush=True)
if only in ("all", "autotune"):
    FMT = {"bf16": 0, "fp8": 1, "nvfp4": 2}
    # the pairs the benchmarks time: prefill / small batches with BF16 weights, decode with every weight format
    pairs = {16: [("nvfp4-swizzled", "bf16"), ("nvfp4-swizzled", "fp8"), ("nvfp4-swizzled", "nvfp4"), ("fp8", "fp8")],
             64: [("nvfp4-swizzled", "bf16"), ("fp8", "fp8")],
             128: [("nvfp4-swizzled", "bf16")],
             512: [("nvfp4-swizzled", "bf16"), ("fp8", "bf16"), ("fp8-ue8m0", "bf16"), ("bf16", "bf16"), ("fp8", "fp8")]}
    n0 = len(KERNELS)
    for bucket, ps in pairs.items():
        for an, bn in ps:
            for c in G._bucket_configs(G._autotune_configs(), bucket, FMT[an.split("-")[0]], FMT[bn.split("-")[0]]):
                kw = c.kwargs
                gemm(A[an], B[bn], GemmConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["LOOP_M"], c.num_warps, c.num_stages))
    print("AUTOTUNE", len(KERNELS) - n0, flush=True)
if only in ("all", "masked"):
    from fp4comm.moe import dequantize_masked
    n0 = len(KERNELS)
    for an in ("fp8", "fp8-ue8m0", "nvfp4-linear", "nvfp4-swizzled", "nvfp4-static"):
        dequantize_masked(A[an], masked)
    # the two-pass route of the GEMM: dequantize, then the BF16 kernel
    grouped_gemm_masked(A["nvfp4-swizzled"], B["bf16"], masked, config="heuristic", a_path="bf16")
    print("MASKED", len(KERNELS) - n0, flush=True)
    for _name, _sig, consts, ptx in KERNELS[n0:]:
        if _name == "fp8_masked_dequant_kernel":
            assert "cvt.rn.f16x2.e4m3x2" in ptx, "fp8 dequant must use the hardware conversion"
        if _name.endswith("masked_dequant_kernel"):
            assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx, _name
if only in ("all", "activation"):
    n0 = len(KERNELS)
    h = torch.randn(E, M, 2 * 128, generator=g).bfloat16()
    silu_and_mul(h, masked)
    for gs in ("per_token", 1.0):
        for layout in ("swizzled", "linear"):
            silu_and_mul(h, masked, quantize="nvfp4", global_scale=gs, scale_layout=layout)
    print("ACTIVATION", len(KERNELS) - n0, flush=True)
# the decode and dot flavours actually made it into the PTX
for _name, _sig, consts, ptx in KERNELS:
    if "A_FMT" not in consts:
        continue
    if consts["A_FMT"] == 2 or (consts["B_FMT"] == 2 and consts["BLOCK_M"] < 64):  # the inline-PTX decode
        assert "prmt.b32" in ptx and "fma.rn.bf16x2" in ptx, consts
    if consts["A_FMT"] == 1 and consts["B_FMT"] == 1 and consts["BLOCK_M"] >= 64:
        assert "e4m3.e4m3" in ptx, consts  # FP8 wgmma
'''


def _run(part: str) -> list[str]:
    return compile_calls(f"ONLY = {part!r}\n" + textwrap.dedent(_BODY))


def test_gemm_format_variants_compile_for_sm90():
    names = _run("formats")
    assert len(names) == 48, names  # 6 A formats x 4 B formats x (prefill, decode tiles)


def test_gemm_autotune_configs_compile_for_sm90():
    assert len(_run("autotune")) > 0


def test_masked_dequant_variants_compile_for_sm90():
    names = _run("masked")
    # fp8 (1 variant: ue8m0 is the same kernel), nvfp4 linear / swizzled x per-row / static gs, the BF16 GEMM
    assert names.count("grouped_gemm_masked_kernel") == 1, names
    assert names.count("fp8_masked_dequant_kernel") == 1 and names.count("nvfp4_masked_dequant_kernel") == 3, names


def test_activation_variants_compile_for_sm90():
    assert len(_run("activation")) == 5
