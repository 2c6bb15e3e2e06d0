"""``fp4comm.moe.dequantize_masked`` (the first pass of the two-pass expert GEMM) against
``fp4comm.reference.moe.dequantize_masked_ref``, bit for bit, and the GEMM's ``a_path``."""

import pytest
import torch

from fp4comm.moe import dequantize_masked, grouped_gemm_masked, quantize_weights
from fp4comm.reference.moe import dequantize_any_ref, dequantize_masked_ref
from tests.test_grouped_gemm import SENTINEL, _to, make_a


def _make(fmt, E, M, K, seed=0):
    # channels spread over six decades, so block scales and global scales both vary
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, M, K, generator=g) * torch.logspace(-3, 3, K)[torch.randperm(K, generator=g)]
    return make_a(x, fmt)


FORMATS = ["nvfp4-linear", "nvfp4-swizzled", "nvfp4-static", "fp8", "fp8-ue8m0"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("E,M,K,masked", [(3, 40, 256, [5, 0, 40]), (2, 130, 1152, [130, 1])])
def test_bit_exact_and_masked_rows_untouched(device, fmt, E, M, K, masked):
    a = _make(fmt, E, M, K)
    mm = torch.tensor(masked, dtype=torch.int32)
    ref = dequantize_masked_ref(a, mm)
    out = torch.full((E, M, K), SENTINEL, dtype=torch.bfloat16, device=device)
    res = dequantize_masked(_to(a, device), mm.to(device), out=out)
    assert res is out
    out = out.cpu()
    for e, m in enumerate(masked):
        assert torch.equal(out[e, :m].view(torch.int16), ref[e, :m].view(torch.int16)), f"expert {e}"
        assert torch.all(out[e, m:] == SENTINEL), f"expert {e}: rows past masked_m were written"


@pytest.mark.parametrize("fmt", ["nvfp4-swizzled", "fp8"])
def test_reference_is_the_format_dequantization(fmt):
    # the reference's rounding (multiply by 1/gs) stays within one BF16 rounding of the exact value
    a = _make(fmt, 2, 16, 256, seed=3)
    mm = torch.tensor([16, 7], dtype=torch.int32)
    exact = dequantize_any_ref(a)
    got = dequantize_masked_ref(a, mm).float()
    for e, m in enumerate(mm.tolist()):
        torch.testing.assert_close(got[e, :m], exact[e, :m], rtol=2**-8, atol=0)
        assert torch.all(got[e, m:] == 0)


def test_nonfinite_block_and_zero_scale(device):
    a = _make("nvfp4-linear", 1, 4, 64)
    a.scales.view(torch.uint8)[0, 1, 2] = 0x7F  # NaN scale byte -> NaN block
    a.scales.view(torch.uint8)[0, 2, 0] = 0x00  # zero scale -> zeros
    mm = torch.tensor([4], dtype=torch.int32)
    out = dequantize_masked(_to(a, device), mm.to(device)).cpu().float()
    assert torch.isnan(out[0, 1, 32:48]).all() and not torch.isnan(out[0, 1, :32]).any()
    assert torch.all(out[0, 2, :16] == 0)


@pytest.mark.parametrize("fmt", ["nvfp4-swizzled", "fp8"])
def test_gemm_bf16_path_equals_bf16_gemm_of_dequantized(device, fmt):
    E, M, K, N = 2, 40, 256, 48
    a = _make(fmt, E, M, K, seed=1)
    w = torch.randn(E, N, K, generator=torch.Generator().manual_seed(2)) / K**0.5
    b = quantize_weights(w, "bf16")
    mm = torch.tensor([40, 9], dtype=torch.int32)
    out = grouped_gemm_masked(_to(a, device), b.to(device), mm.to(device), a_path="bf16").cpu()
    a16 = dequantize_masked(_to(a, device), mm.to(device))
    want = grouped_gemm_masked(a16, b.to(device), mm.to(device), a_path="registers").cpu()
    for e, m in enumerate(mm.tolist()):
        assert torch.equal(out[e, :m], want[e, :m])


def test_bad_inputs(device):
    a = _to(_make("nvfp4-linear", 2, 8, 64), device)
    mm = torch.tensor([8, 1], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="a:"):
        dequantize_masked(torch.zeros(2, 8, 64, dtype=torch.bfloat16, device=device), mm)
    with pytest.raises(TypeError, match="masked_m"):
        dequantize_masked(a, mm.long())
    with pytest.raises(ValueError, match="masked_m"):
        dequantize_masked(a, torch.tensor([8], dtype=torch.int32, device=device))
    with pytest.raises((TypeError, ValueError), match="out"):
        dequantize_masked(a, mm, out=torch.empty(2, 8, 64, dtype=torch.float32, device=device))
    with pytest.raises(ValueError, match="a_path"):
        grouped_gemm_masked(a, torch.zeros(2, 16, 64, dtype=torch.bfloat16, device=device), mm, a_path="fast")
    if device.type == "cpu":
        with pytest.raises(ValueError, match="masked_m"):
            dequantize_masked(a, torch.tensor([9, 0], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_prefill_shape_bit_exact(fmt):
    E, M, K = 4, 256, 7168
    a = _make(fmt, E, M, K, seed=4)
    mm = torch.tensor([256, 130, 0, 1], dtype=torch.int32)
    ref = dequantize_masked_ref(a, mm)
    out = dequantize_masked(_to(a, "cuda"), mm.cuda()).cpu()
    for e, m in enumerate(mm.tolist()):
        assert torch.equal(out[e, :m].view(torch.int16), ref[e, :m].view(torch.int16)), f"expert {e}"
