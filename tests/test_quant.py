"""Quantize / dequantize: Triton kernel == plain-torch reference bit for bit, reference ==
an independent oracle, edge values, error bounds, and bad input.

On CPU the kernels run under TRITON_INTERPRET=1 (see conftest.py); on a GPU the same tests
run the compiled kernels, plus larger shapes (marked ``gpu``)."""

import math

import numpy as np
import pytest
import torch

import fp4comm
from fp4comm import formats
from fp4comm.reference import quant as ref
from tests import oracles

SHAPES = [(1, 16), (3, 48), (129, 48), (1000, 16), (3, 7168), (2, 5, 64), (2, 1040)]
SHAPE_IDS = ["1x16", "3x48", "129x48", "1000x16", "3x7168", "2x5x64", "2x1040_partial_chunk"]
GPU_SHAPES = [(1000, 7168), (4096, 7168), (3, 1823, 256), (129, 2048)]


def _bytes(t):
    return t.contiguous().view(torch.uint8).cpu()


def assert_nvfp4_equal(a: formats.NVFP4Tensor, b: formats.NVFP4Tensor):
    assert a.scale_layout == b.scale_layout and tuple(a.shape) == tuple(b.shape)
    assert torch.equal(a.data.cpu(), b.data.cpu()), "E2M1 codes differ"
    assert torch.equal(_bytes(a.scales), _bytes(b.scales)), "scale bytes differ"
    assert torch.equal(a.global_scale.cpu().view(torch.int32), b.global_scale.cpu().view(torch.int32)), "gs differ"


def make_input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[:-1] + (1,), generator=g) * 2)
    return x.to(dtype)


def sqnr_db(x, y):
    x, y = x.double(), y.double()
    return 10 * math.log10(float((x * x).sum() / ((x - y) ** 2).sum()))


# ----------------------------------------------------------------------------- kernel == reference
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("gs", ["per_token", 0.37, "per_row"], ids=["per_token", "static", "per_row"])
@pytest.mark.parametrize("layout", ["linear", "swizzled"])
def test_nvfp4_kernel_matches_reference(shape, gs, layout, device):
    if layout == "swizzled" and shape[-1] % 64:
        pytest.skip("swizzled needs H % 64 == 0 (padding tested separately)")
    x = make_input(shape, torch.bfloat16)
    if gs == "per_row":
        gs = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(3)) * 100 + 0.5
    got = fp4comm.quantize_nvfp4(x.to(device), gs.to(device) if torch.is_tensor(gs) else gs, scale_layout=layout)
    want = ref.quantize_nvfp4_ref(x, gs, scale_layout=layout)
    assert_nvfp4_equal(got, want)
    deq = fp4comm.dequantize_nvfp4(got, torch.bfloat16)
    assert torch.equal(deq.cpu(), ref.dequantize_nvfp4_ref(want, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["out_fp32", "out_fp16"])
def test_nvfp4_other_dtypes(dtype, out_dtype, device):
    x = make_input((7, 128), dtype, seed=5)
    got = fp4comm.quantize_nvfp4(x.to(device))
    want = ref.quantize_nvfp4_ref(x)
    assert_nvfp4_equal(got, want)
    assert torch.equal(fp4comm.dequantize_nvfp4(got, out_dtype).cpu(), ref.dequantize_nvfp4_ref(want, out_dtype))


def test_static_global_scale_as_device_tensor(device):
    x = make_input((5, 64), torch.bfloat16, seed=2)
    for g in (torch.tensor(2.5), torch.tensor([2.5])):
        got = fp4comm.quantize_nvfp4(x.to(device), g.to(device))
        assert got.global_scale.dim() == 0
        assert_nvfp4_equal(got, ref.quantize_nvfp4_ref(x, torch.tensor(2.5)))


def test_unaligned_storage_offset(device):
    # a contiguous bf16 view starting at an odd element cannot be read as 32-bit words
    base = make_input((3 * 64 + 1,), torch.bfloat16, seed=6).to(device)
    x = base[1:].view(3, 64)
    assert_nvfp4_equal(fp4comm.quantize_nvfp4(x), ref.quantize_nvfp4_ref(x.cpu()))


def test_one_dim_input_and_empty(device):
    x = make_input((64,), torch.bfloat16)
    got = fp4comm.quantize_nvfp4(x.to(device), scale_layout="swizzled")
    assert got.scales.shape == (128, 4)
    assert_nvfp4_equal(got, ref.quantize_nvfp4_ref(x, scale_layout="swizzled"))
    e = fp4comm.quantize_nvfp4(torch.empty(0, 64, dtype=torch.bfloat16, device=device))
    assert e.data.shape == (0, 32) and fp4comm.dequantize_nvfp4(e).shape == (0, 64)


def test_swizzled_equals_swizzle_of_linear_and_padding(device):
    x = make_input((3, 130, 48), torch.bfloat16, seed=7)
    lin = fp4comm.quantize_nvfp4(x.to(device))
    with pytest.raises(ValueError, match="multiple of 64"):
        fp4comm.quantize_nvfp4(x.to(device), scale_layout="swizzled")
    sw = fp4comm.quantize_nvfp4(x.to(device), scale_layout="swizzled", pad_scales=True)
    assert sw.scales.shape == (3, 256, 4)
    assert torch.equal(_bytes(sw.scales), _bytes(formats.swizzle_scales(lin.scales.cpu())))
    assert torch.equal(sw.data.cpu(), lin.data.cpu())
    assert torch.equal(fp4comm.dequantize_nvfp4(sw).cpu(), fp4comm.dequantize_nvfp4(lin).cpu())


# ----------------------------------------------------------------------------- reference == oracle
@pytest.mark.parametrize("gs", [None, 1.7], ids=["per_token", "static"])
def test_reference_matches_independent_oracle(gs):
    x = make_input((64, 256), torch.float32, seed=11)
    x[3] = 0.0
    x[4, :16] = 1e-6  # block whose scale is E4M3-subnormal or zero
    x[5] *= 1e-30  # tiny row
    t = ref.quantize_nvfp4_ref(x, "per_token" if gs is None else gs)
    codes, sfb, g = oracles.nvfp4_quantize(x.numpy(), None if gs is None else np.float32(gs))
    assert np.array_equal(formats.unpack_e2m1(t.data).numpy(), codes)
    assert np.array_equal(t.scales.view(torch.uint8).numpy(), sfb)
    assert np.array_equal(np.broadcast_to(t.global_scale.numpy(), (64,)).view(np.int32), g.view(np.int32))


# ----------------------------------------------------------------------------- edge values
def test_rounding_ties_exact(device):
    # with gs = 1 and a block max of 6, sf = e4m3(1) = 1 and inv = 1: codes are e2m1(x) itself
    vals = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.1, -6.0, 0.0, 0.5, 4.0, -1.75, 3.0]
    want = [7, 0, 2, 2, 4, 4, 6, 6, 8, 8, 15, 0, 1, 6, 12, 5]
    x = torch.tensor([vals], dtype=torch.float32)
    t = fp4comm.quantize_nvfp4(x.to(device), 1.0)
    assert formats.unpack_e2m1(t.data.cpu()).flatten().tolist() == want
    assert t.scales.cpu().float().item() == 1.0


def test_zero_rows_tiny_huge_and_subnormal_scales(device):
    x = torch.zeros(6, 64, dtype=torch.float32)
    x[1] = torch.linspace(-1e-38, 1e-38, 64)  # FP32 subnormal/normal boundary
    x[2] = torch.linspace(-1e38, 1e38, 64)  # huge (dequantized values may exceed |x| by the
    # scale rounding, up to 6.25%, so values above ~3.2e38 dequantize to Inf in FP32)
    x[3, 0] = 1000.0
    x[3, 16:32] = 1e-2  # block scale falls in E4M3's subnormal range
    x[3, 32:48] = 1e-7  # block scale rounds to zero -> inv 0 -> codes zero
    x[4] = torch.randn(64) * 1e-20
    x[5, 5] = -0.0
    got = fp4comm.quantize_nvfp4(x.to(device))
    want = ref.quantize_nvfp4_ref(x)
    assert_nvfp4_equal(got, want)
    assert got.global_scale[0].item() == 1.0 and not got.data[0].any() and not _bytes(got.scales[0]).any()
    sf3 = _bytes(got.scales[3])
    assert 0 < sf3[1] < 8, "expected an E4M3 subnormal scale byte"
    assert sf3[2] == 0
    deq = fp4comm.dequantize_nvfp4(got, torch.float32).cpu()
    assert torch.isfinite(deq).all()
    assert sqnr_db(x[2], deq[2]) > 18 and sqnr_db(x[4], deq[4]) > 18


def test_nonfinite_blocks_become_nan_and_check_finite_raises(device):
    x = make_input((4, 64), torch.bfloat16, seed=9)
    x[1, 3] = float("nan")
    x[2, 40] = float("inf")
    x[2, 0] = -float("inf")
    got = fp4comm.quantize_nvfp4(x.to(device))
    want = ref.quantize_nvfp4_ref(x)
    assert_nvfp4_equal(got, want)
    sfb = _bytes(got.scales)
    assert sfb[1, 0] == 0x7F and sfb[2, 0] == 0x7F and sfb[2, 2] == 0x7F
    assert (sfb[0] != 0x7F).all() and sfb[1, 1] != 0x7F
    # per-token amax ignores non-finite values: row 1's other blocks match a clean row
    clean = x.clone()
    clean[1, :16] = 0
    assert torch.equal(got.global_scale[1].cpu(), ref.quantize_nvfp4_ref(clean).global_scale[1])
    deq = fp4comm.dequantize_nvfp4(got).cpu()
    assert deq[1, :16].isnan().all() and torch.isfinite(deq[1, 16:]).all()
    assert deq[2, 32:48].isnan().all() and torch.isfinite(deq[0]).all()
    assert torch.equal(fp4comm.quant.nonfinite_blocks(got).cpu()[2], torch.tensor([True, False, True, False]))
    with pytest.raises(ValueError, match=r"x: row 1 "):
        fp4comm.quantize_nvfp4(x.to(device), check_finite=True)
    with pytest.raises(ValueError, match=r"x: row 1 "):
        fp4comm.quantize_fp8_blockwise(torch.cat([x, x], -1).to(device), check_finite=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("H", [7168, 1040], ids=["streamed", "streamed_partial_chunk"])
def test_nonfinite_long_rows_match_reference(dtype, H, device):
    """Streamed rows (the per-token amax pass and its finite-max fallback): NaN / +-Inf in
    even and odd positions (for BF16 the odd element is read with its word's low half),
    a row of only non-finite values, and one clean row."""
    x = make_input((5, H), torch.float32, seed=11)
    x[0, 1] = float("inf")  # odd element, Inf
    x[0, 4000 % H] = -float("inf")  # even element
    x[1, 7] = float("nan")
    x[1, 2] = 1e30 if dtype == torch.float32 else 100.0  # the row's finite maximum, next to NaN
    x[2] = float("nan")
    x[3, H - 1] = -float("inf")  # last block of the row
    x = x.to(dtype)
    for gs in ("per_token", 0.37):
        got = fp4comm.quantize_nvfp4(x.to(device), gs)
        assert_nvfp4_equal(got, ref.quantize_nvfp4_ref(x, gs))


def test_saturated_and_subnormal_block_scales_long_rows(device):
    """Codes of blocks whose E4M3 scale saturates (a large static gs) or is subnormal / zero
    (tiny blocks beside a huge one), where ``x * inv`` exceeds 6 and must saturate."""
    x = make_input((4, 7168), torch.bfloat16, seed=12)
    x[1, 100:200] *= 1e-6
    x[2, ::97] = 3e4
    for gs in ("per_token", 1e4, 2.0):
        got = fp4comm.quantize_nvfp4(x.to(device), gs)
        assert_nvfp4_equal(got, ref.quantize_nvfp4_ref(x, gs))


# ----------------------------------------------------------------------------- error bounds
def test_round_trip_sqnr(device):
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    t = fp4comm.quantize_nvfp4(x.to(device))
    assert sqnr_db(x.float(), fp4comm.dequantize_nvfp4(t, torch.float32).cpu()) >= 18.0
    f = fp4comm.quantize_fp8_blockwise(x.to(device))
    assert sqnr_db(x.float(), fp4comm.dequantize_fp8_blockwise(f, torch.float32).cpu()) >= 30.0


# ----------------------------------------------------------------------------- FP8 block
@pytest.mark.parametrize("shape", [(1, 128), (33, 384), (2, 3, 256)], ids=["1x128", "33x384", "2x3x256"])
@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32_scale", "ue8m0"])
def test_fp8_kernel_matches_reference(shape, ue8m0, device):
    x = make_input(shape, torch.bfloat16, seed=4)
    x.view(-1)[7] = 0.0
    if shape[0] > 1:
        x[1] = 0  # all-zero row: amax clamps at 1e-4
    got = fp4comm.quantize_fp8_blockwise(x.to(device), ue8m0=ue8m0)
    want = ref.quantize_fp8_blockwise_ref(x, ue8m0=ue8m0)
    assert torch.equal(_bytes(got.data), _bytes(want.data))
    assert torch.equal(got.scales.cpu(), want.scales)
    assert torch.equal(fp4comm.dequantize_fp8_blockwise(got).cpu(), ref.dequantize_fp8_blockwise_ref(want))
    if ue8m0:
        m, _ = torch.frexp(got.scales.cpu())
        assert (m == 0.5).all(), "ue8m0 scales must be powers of two"


def test_fp8_matches_deepep_recipe():
    # DeepEP per_token_cast_to_fp8: amax clamp 1e-4, sf = amax / 448, x * (1 / sf)
    x = make_input((9, 256), torch.bfloat16, seed=8)
    xv = x.float().view(9, 2, 128)
    sf = xv.abs().amax(-1).clamp(1e-4) / 448.0
    q = (xv * (1.0 / sf.unsqueeze(-1))).to(torch.float8_e4m3fn).view(9, 256)
    got = ref.quantize_fp8_blockwise_ref(x)
    assert torch.equal(_bytes(got.data), _bytes(q)) and torch.equal(got.scales, sf)


def test_fp8_nonfinite_block(device):
    x = make_input((2, 256), torch.float32, seed=1)
    x[0, 200] = float("nan")
    got = fp4comm.quantize_fp8_blockwise(x.to(device))
    assert got.scales[0, 1].isnan() and not got.scales[0, 0].isnan()
    deq = fp4comm.dequantize_fp8_blockwise(got).cpu()
    assert deq[0, 128:].isnan().all() and torch.isfinite(deq[0, :128]).all() and torch.isfinite(deq[1]).all()


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_naming_the_argument(device):
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    with pytest.raises(TypeError, match="x: dtype"):
        fp4comm.quantize_nvfp4(x.int())
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        fp4comm.quantize_nvfp4([1.0] * 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        fp4comm.quantize_nvfp4(x[:, :24].contiguous())
    with pytest.raises(ValueError, match="x: must be contiguous"):
        fp4comm.quantize_nvfp4(torch.randn(64, 4, dtype=torch.bfloat16, device=device).t())
    with pytest.raises(ValueError, match="scale_layout"):
        fp4comm.quantize_nvfp4(x, scale_layout="blocked")
    with pytest.raises(ValueError, match="global_scale"):
        fp4comm.quantize_nvfp4(x, -1.0)
    with pytest.raises(ValueError, match="global_scale"):
        fp4comm.quantize_nvfp4(x, "per_tensor")
    with pytest.raises(ValueError, match="global_scale: expected a scalar or one scale per row"):
        fp4comm.quantize_nvfp4(x, torch.ones(3, device=device))
    with pytest.raises(TypeError, match="global_scale"):
        fp4comm.quantize_nvfp4(x, torch.ones(4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="block"):
        fp4comm.quantize_fp8_blockwise(x, block=48)
    with pytest.raises(ValueError, match="multiple of block=128"):
        fp4comm.quantize_fp8_blockwise(x)
    t = fp4comm.quantize_nvfp4(x)
    with pytest.raises(TypeError, match="t: expected an NVFP4Tensor"):
        fp4comm.dequantize_nvfp4(x)
    broken = formats.NVFP4Tensor(t.data[:2], t.scales, t.global_scale, t.scale_layout, t.shape)
    with pytest.raises(ValueError, match="t.data"):
        fp4comm.dequantize_nvfp4(broken)
    with pytest.raises(TypeError, match="dtype"):
        fp4comm.dequantize_nvfp4(t, torch.int8)
    with pytest.raises(ValueError, match="impl"):
        fp4comm.quantize_nvfp4(x, impl="cuda")


def test_impl_switch_reference_equals_triton(device):
    x = make_input((5, 128), torch.bfloat16)
    a = fp4comm.quantize_nvfp4(x.to(device), impl="reference")
    b = fp4comm.quantize_nvfp4(x.to(device), impl="triton")
    assert_nvfp4_equal(a, b)


# ----------------------------------------------------------------------------- GPU sizes
@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["linear", "swizzled"])
def test_gpu_large_shapes_bit_exact(shape, layout):
    x = make_input(shape, torch.bfloat16, seed=21)
    got = fp4comm.quantize_nvfp4(x.cuda(), scale_layout=layout)
    assert_nvfp4_equal(got, ref.quantize_nvfp4_ref(x, scale_layout=layout))
    f = fp4comm.quantize_fp8_blockwise(x.cuda())
    w = ref.quantize_fp8_blockwise_ref(x)
    assert torch.equal(_bytes(f.data), _bytes(w.data)) and torch.equal(f.scales.cpu(), w.scales)


@pytest.mark.gpu
def test_gpu_reference_on_gpu_equals_cpu():
    # the torch reference itself gives the same bytes on CUDA (IEEE division, RNE casts)
    x = make_input((257, 1024), torch.bfloat16, seed=3)
    assert_nvfp4_equal(ref.quantize_nvfp4_ref(x.cuda()), ref.quantize_nvfp4_ref(x))
