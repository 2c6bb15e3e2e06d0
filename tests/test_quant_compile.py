"""Every quantize / dequantize kernel variant compiles for sm_90 (no GPU needed)."""

from tests.sm90 import compile_calls


def test_quant_kernels_compile_for_sm90():
    names = compile_calls(
        """
        import fp4comm.quant as Q
        force_triton(Q)
        for H, T, hw in ((7168, 4, False), (7168, 4, True), (64, 8, True), (1040, 2, True)):
            Q._QUANT_HW = hw  # the GPU's inline-PTX path (max.u16x2, prmt) too
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                x = torch.zeros(T, H, dtype=dt)
                for layout in ("linear", "swizzled"):
                    for gs in ("per_token", 2.0, torch.ones(T)):
                        t = Q.quantize_nvfp4(x, gs, scale_layout=layout, pad_scales=True)
                        t.global_scale = torch.ones(T) if not isinstance(gs, float) else torch.tensor(gs)
                        Q.dequantize_nvfp4(t, torch.bfloat16)
            Q._QUANT_HW = None
            x = torch.zeros(T, max(H // 128, 1) * 128, dtype=torch.bfloat16)
            for ue8m0 in (False, True):
                Q.dequantize_fp8_blockwise(Q.quantize_fp8_blockwise(x, ue8m0=ue8m0))
        """
    )
    assert {"nvfp4_quantize_kernel", "nvfp4_dequantize_kernel", "fp8_block_quantize_kernel",
            "fp8_block_dequantize_kernel"} <= set(names)
