"""Masked grouped GEMM: kernel vs plain-torch reference for every A x B format.

Numeric contract (flash-attention style): against an FP32 product of the *dequantized*
operands, the kernel's BF16 output error is at most 2x the error of torch's BF16 matmul on
the same dequantized operands (rounded to BF16), plus a small slack. Rows at or past
``masked_m[e]`` keep a sentinel; bad input raises errors naming the argument.
"""

import pytest
import torch

from fp4comm.formats import FP8BlockTensor, NVFP4Tensor
from fp4comm.moe import GemmConfig, grouped_gemm_masked, quantize_weights
from fp4comm.reference.moe import dequantize_any_ref, grouped_gemm_masked_ref
from fp4comm.reference.quant import quantize_fp8_blockwise_ref, quantize_nvfp4_ref

SENTINEL = 12352.0  # exact in BF16

A_FORMATS = ["bf16", "fp8", "fp8-ue8m0", "nvfp4-linear", "nvfp4-swizzled", "nvfp4-static"]
B_FORMATS = ["bf16", "fp8", "nvfp4", "nvfp4-swizzled-rowgs"]


def make_a(x: torch.Tensor, fmt: str):
    if fmt == "bf16":
        return x.bfloat16()
    if fmt == "fp8":
        return quantize_fp8_blockwise_ref(x)
    if fmt == "fp8-ue8m0":  # power-of-two scales: scaled in registers, no per-K-step promotion
        return quantize_fp8_blockwise_ref(x, 128, True)
    if fmt == "nvfp4-linear":
        return quantize_nvfp4_ref(x, "per_token", scale_layout="linear")
    if fmt == "nvfp4-swizzled":
        return quantize_nvfp4_ref(x, "per_token", scale_layout="swizzled")
    if fmt == "nvfp4-static":
        return quantize_nvfp4_ref(x, 2688.0 / float(x.abs().max()), scale_layout="swizzled")
    raise AssertionError(fmt)


def make_b(w: torch.Tensor, fmt: str):
    if fmt == "nvfp4-swizzled-rowgs":  # per-row (per output channel) global scale
        return quantize_nvfp4_ref(w, "per_token", scale_layout="swizzled")
    return quantize_weights(w, fmt)


def check_against_reference(a, b, masked_m, out, slack=1e-3):
    """Error bound of the module docstring, and the sentinel rows."""
    A = dequantize_any_ref(a)
    B = dequantize_any_ref(b, weight=True)
    for e in range(A.shape[0]):
        m = int(masked_m[e])
        assert torch.all(out[e, m:] == SENTINEL), f"expert {e}: rows past masked_m={m} were written"
        if m == 0:
            continue
        ref = A[e, :m] @ B[e].T
        torch_bf16 = (A[e, :m].bfloat16() @ B[e].bfloat16().T).float()
        torch_err = (torch_bf16 - ref).abs().max().item()
        err = (out[e, :m].float() - ref).abs().max().item()
        bound = 2 * torch_err + slack * ref.abs().max().item() + 1e-6
        assert err <= bound, f"expert {e}: max err {err:.3g} > bound {bound:.3g} (torch bf16 err {torch_err:.3g})"


def run_case(device, E, max_m, K, N, masked, a_fmt, b_fmt, config="auto", seed=0, a_path="auto"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, max_m, K, generator=g)
    w = torch.randn(E, N, K, generator=g) / K**0.5
    a = _to(make_a(x, a_fmt), device)
    b = _to(make_b(w, b_fmt), device)
    masked_m = torch.tensor(masked, dtype=torch.int32, device=device)
    out = torch.full((E, max_m, N), SENTINEL, dtype=torch.bfloat16, device=device)
    res = grouped_gemm_masked(a, b, masked_m, out=out, config=config, a_path=a_path)
    assert res is out
    check_against_reference(_to(a, "cpu"), _to(b, "cpu"), masked_m.cpu(), out.cpu())


def _to(t, device):
    if isinstance(t, torch.Tensor):
        return t.to(device)
    if isinstance(t, NVFP4Tensor):
        return NVFP4Tensor(t.data.to(device), t.scales.to(device), t.global_scale.to(device), t.scale_layout, t.shape)
    return FP8BlockTensor(t.data.to(device), t.scales.to(device), t.block, t.ue8m0)


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("b_fmt", B_FORMATS)
@pytest.mark.parametrize("a_fmt", A_FORMATS)
def test_formats(device, a_fmt, b_fmt):
    # max_m 40 and N 80 are not tile multiples; expert 1 is empty
    run_case(device, E=3, max_m=40, K=256, N=80, masked=[5, 0, 33], a_fmt=a_fmt, b_fmt=b_fmt)


@pytest.mark.parametrize(
    "K,N,a_fmt,b_fmt",
    [
        (64, 48, "nvfp4-swizzled", "bf16"),
        (192, 80, "nvfp4-linear", "nvfp4"),
        (192, 16, "bf16", "nvfp4-swizzled-rowgs"),
        (384, 48, "fp8", "fp8"),
        (128, 200, "nvfp4-swizzled", "fp8"),
    ],
    ids=lambda v: str(v),
)
def test_awkward_shapes(device, K, N, a_fmt, b_fmt):
    run_case(device, E=2, max_m=24, K=K, N=N, masked=[24, 7], a_fmt=a_fmt, b_fmt=b_fmt)


@pytest.mark.parametrize(
    "config",
    [GemmConfig(16, 32, 64, loop_m=False), GemmConfig(16, 64, 128, loop_m=True), GemmConfig(32, 16, 64, loop_m=True)],
    ids=["one-tile-per-program", "loop-m", "loop-m-narrow-n"],
)
def test_tile_schedules(device, config):
    # both schedules, several m tiles per expert, one full expert
    run_case(device, E=3, max_m=48, K=128, N=64, masked=[48, 17, 0], a_fmt="nvfp4-swizzled", b_fmt="bf16", config=config)


def test_empty_experts_untouched(device):
    E, M, K, N = 4, 32, 64, 32
    a = _to(make_a(torch.randn(E, M, K), "nvfp4-swizzled"), device)
    b = torch.randn(E, N, K, device=device).bfloat16()
    out = torch.full((E, M, N), SENTINEL, dtype=torch.bfloat16, device=device)
    grouped_gemm_masked(a, b, torch.zeros(E, dtype=torch.int32, device=device), out=out)
    assert torch.all(out == SENTINEL)


def test_out_dtype_and_reference_impl(device):
    E, M, K, N = 2, 16, 64, 32
    a = _to(make_a(torch.randn(E, M, K), "nvfp4-linear"), device)
    b = _to(quantize_weights(torch.randn(E, N, K) * 0.1, "nvfp4"), device)
    mm = torch.tensor([16, 9], dtype=torch.int32, device=device)
    got = grouped_gemm_masked(a, b, mm, out_dtype=torch.float32)
    ref = grouped_gemm_masked(a, b, mm, out_dtype=torch.float32, impl="reference")
    assert got.dtype == torch.float32
    # FP32 output: only summation order differs
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, :9], ref[1, :9], rtol=1e-5, atol=1e-5)
    ref2 = grouped_gemm_masked_ref(a, b, mm, out_dtype=torch.float32)
    torch.testing.assert_close(ref[1, :9], ref2[1, :9], rtol=0, atol=0)


def test_nonfinite_block_propagates(device):
    # an NVFP4 block whose scale byte is 0x7F (the NaN marker) must give NaN, never a finite value
    E, M, K, N = 1, 16, 64, 16
    a = make_a(torch.randn(E, M, K), "nvfp4-linear")
    a.scales.view(torch.uint8)[0, 3, 1] = 0x7F
    out = grouped_gemm_masked(_to(a, device), torch.ones(E, N, K, device=device).bfloat16(),
                              torch.tensor([M], dtype=torch.int32, device=device)).cpu()
    assert out[0, 3].isnan().all() and not out[0, [0, 1, 2, 4]].isnan().any()


# ----------------------------------------------------------------------------- bad input
def _good(device):
    E, M, K, N = 2, 16, 128, 32
    a = _to(make_a(torch.randn(E, M, K), "nvfp4-swizzled"), device)
    b = torch.randn(E, N, K, device=device).bfloat16()
    mm = torch.tensor([3, 0], dtype=torch.int32, device=device)
    return a, b, mm


def test_bad_inputs(device):
    a, b, mm = _good(device)
    E, M, K, N = 2, 16, 128, 32
    with pytest.raises(TypeError, match="^a: dtype"):
        grouped_gemm_masked(torch.randn(E, M, K, device=device), b, mm)
    with pytest.raises(TypeError, match="^a: expected"):
        grouped_gemm_masked([1, 2], b, mm)
    with pytest.raises(ValueError, match="^b: expected 3 dims"):
        grouped_gemm_masked(a, b[0], mm)
    with pytest.raises(ValueError, match="^b: K mismatch"):
        grouped_gemm_masked(a, b[:, :, :64].contiguous(), mm)
    with pytest.raises(ValueError, match="^b: has 3 experts"):
        grouped_gemm_masked(a, torch.cat([b, b[:1]]), mm)
    with pytest.raises(TypeError, match="^masked_m: dtype"):
        grouped_gemm_masked(a, b, mm.long())
    with pytest.raises(ValueError, match="^masked_m: expected shape"):
        grouped_gemm_masked(a, b, mm[:1])
    with pytest.raises(ValueError, match="^masked_m: values must lie in"):
        grouped_gemm_masked(a, b, torch.tensor([M + 1, 0], dtype=torch.int32, device=device), check_masked_m=True)
    with pytest.raises(ValueError, match="^masked_m: values must lie in"):
        grouped_gemm_masked(a, b, torch.tensor([-1, 0], dtype=torch.int32, device=device), check_masked_m=True)
    with pytest.raises(ValueError, match="^out: expected shape"):
        grouped_gemm_masked(a, b, mm, out=torch.empty(E, M, N + 1, device=device, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="^out_dtype"):
        grouped_gemm_masked(a, b, mm, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="^b: is on meta but a is on"):
        grouped_gemm_masked(a, b.to("meta"), mm)
    with pytest.raises(ValueError, match="^masked_m: is on meta"):
        grouped_gemm_masked(a, b, mm.to("meta"))
    with pytest.raises(TypeError, match="^config"):
        grouped_gemm_masked(a, b, mm, config=3)
    with pytest.raises(ValueError, match="^config: must be one of"):
        grouped_gemm_masked(a, b, mm, config="fast")
    # weight formats: fp8 needs K % 128; wrong scale shapes; wrong global-scale shapes
    w = torch.randn(E, N, 64)
    with pytest.raises(ValueError, match="^w: K must be a multiple of 128"):
        quantize_weights(w, "fp8")
    bf8 = quantize_weights(torch.randn(E, N, K), "fp8")
    bad = FP8BlockTensor(bf8.data, bf8.scales[:, :, :0].contiguous())
    with pytest.raises(ValueError, match=r"^b.scales: expected \[2, 1, 1\] \(128x128 block scales\)"):
        grouped_gemm_masked(a, _to(bad, device), mm)
    bnv = quantize_weights(torch.randn(E, N, K), "nvfp4")
    bnv.global_scale = torch.ones(E, N + 1)
    with pytest.raises(ValueError, match=r"^b.global_scale: expected shape \[\], \[2\] or \[2, 32\]"):
        grouped_gemm_masked(a, _to(bnv, device), mm)
    a2 = make_a(torch.randn(E, M, K), "nvfp4-linear")
    a2.global_scale = torch.ones(E)
    with pytest.raises(ValueError, match=r"^a.global_scale: expected shape \[\] or \[2, 16\]"):
        grouped_gemm_masked(_to(a2, device), b, mm)
    a3 = make_a(torch.randn(E, M, K), "nvfp4-swizzled")
    a3.scales = a3.scales[:, :64].contiguous()
    with pytest.raises(ValueError, match=r"^a.scales: expected shape \[2, 128, 8\]"):
        grouped_gemm_masked(_to(a3, device), b, mm)
    with pytest.raises(ValueError, match="^config: block_k must divide 128"):
        grouped_gemm_masked(a, _to(bf8, device), mm, config=GemmConfig(16, 32, 256, True))


def test_masked_m_above_max_m_checked_on_cpu():
    a, b, _ = _good("cpu")
    with pytest.raises(ValueError, match=r"^masked_m: values must lie in \[0, max_m=16\], got min 0, max 17"):
        grouped_gemm_masked(a, b, torch.tensor([17, 0], dtype=torch.int32))


# ----------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("a_fmt,b_fmt", [("nvfp4-swizzled", "bf16"), ("nvfp4-linear", "fp8"), ("fp8", "fp8"),
                                         ("nvfp4-swizzled", "nvfp4"), ("bf16", "bf16")])
@pytest.mark.parametrize("a_path", ["registers", "bf16"])
def test_gpu_prefill_shapes(a_fmt, b_fmt, a_path):
    # DeepSeek-V3 GEMM1 shape per expert (K=7168, N=2*2048/8 sharded-ish), uneven rows
    run_case("cuda", E=4, max_m=256, K=7168, N=512, masked=[256, 130, 0, 1], a_fmt=a_fmt, b_fmt=b_fmt, a_path=a_path)


@pytest.mark.gpu
@pytest.mark.parametrize("b_fmt", ["bf16", "fp8", "nvfp4"])
def test_gpu_decode_shapes(b_fmt):
    masked = [0] * 16
    masked[3], masked[9], masked[15] = 1, 16, 7
    run_case("cuda", E=16, max_m=128, K=2048, N=1024, masked=masked, a_fmt="nvfp4-swizzled", b_fmt=b_fmt)


@pytest.mark.gpu
@pytest.mark.parametrize("expected_m", [8, 64, 512])
def test_gpu_heuristic_and_autotuned_agree(expected_m):
    E, M, K, N = 8, 512, 1024, 768
    a = _to(make_a(torch.randn(E, M, K), "nvfp4-swizzled"), "cuda")
    b = torch.randn(E, N, K, device="cuda").bfloat16() / 32
    mm = torch.randint(0, M + 1, (E,), dtype=torch.int32, device="cuda")
    x = grouped_gemm_masked(a, b, mm, expected_m=expected_m, out_dtype=torch.float32)
    y = grouped_gemm_masked(a, b, mm, expected_m=expected_m, out_dtype=torch.float32, config="heuristic")
    for e in range(E):
        m = int(mm[e])
        torch.testing.assert_close(x[e, :m], y[e, :m], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "a_fmt,b_fmt,buckets",
    [("nvfp4-swizzled", "bf16", (16, 64, 128, 512)), ("fp8", "fp8", (16, 512)), ("fp8-ue8m0", "bf16", (512,)),
     ("nvfp4-swizzled", "nvfp4", (16,))],
    ids=["nvfp4xbf16-all", "fp8xfp8", "fp8ue8m0xbf16", "nvfp4xnvfp4-decode"],
)  # fmt: skip
def test_gpu_every_autotune_config(a_fmt, b_fmt, buckets):
    """Whatever config the autotuner picks is correct: each candidate, run as an explicit
    config, against the reference (uneven rows, an empty expert, N not a tile multiple)."""
    from fp4comm.moe import gemm as G

    fmt = {"bf16": 0, "fp8": 1, "nvfp4": 2}
    seen = set()
    for bucket in buckets:
        for c in G._bucket_configs(G._autotune_configs(), bucket, fmt[a_fmt.split("-")[0]], fmt[b_fmt]):
            kw = c.kwargs
            cfg = GemmConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["LOOP_M"], c.num_warps, c.num_stages)
            if cfg in seen:
                continue
            seen.add(cfg)
            run_case("cuda", E=3, max_m=300, K=1024, N=320, masked=[300, 0, 37], a_fmt=a_fmt, b_fmt=b_fmt, config=cfg,
                     a_path="registers")  # the candidates are tiles of the in-register kernel
    assert seen


# ----------------------------------------------------------------------------- silu_and_mul
from fp4comm.formats import unswizzle_scales  # noqa: E402
from fp4comm.moe import silu_and_mul  # noqa: E402
from fp4comm.reference.moe import silu_and_mul_ref  # noqa: E402


def _act_input(E, M, N, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, M, 2 * N, generator=g) * 3
    x[0, 1, 5] = 40.0  # saturating sigmoid, outlier in the row
    x[0, 2, 7] = -40.0
    return x.bfloat16().to(device)


@pytest.mark.parametrize("E,M,N", [(2, 24, 48), (3, 9, 256), (1, 130, 32)], ids=["48", "256", "130rows"])
def test_silu_and_mul_bf16(device, E, M, N):
    x = _act_input(E, M, N, device)
    mm = torch.tensor([M, 3, 0][:E], dtype=torch.int32, device=device)
    out = silu_and_mul(x, mm)
    assert out.shape == (E, M, N) and out.dtype == torch.bfloat16
    for e in range(E):
        m = int(mm[e])
        ref = silu_and_mul_ref(x[e, :m].cpu())
        # one rounding to BF16 (<= half an ulp, <= 2^-8 relative) of an FP32 value within ulps of torch's
        torch.testing.assert_close(out[e, :m].cpu().float(), ref, rtol=2**-8 * 1.01, atol=1e-30)


@pytest.mark.parametrize("scale_layout", ["swizzled", "linear"])
@pytest.mark.parametrize("gs", ["per_token", 50.0], ids=["per-token-gs", "static-gs"])
@pytest.mark.parametrize("N", [64, 80])
def test_silu_and_mul_nvfp4_bit_exact(device, scale_layout, gs, N):
    # fused quantization == reference quantizer applied to the kernel's own BF16 output
    E, M = 3, 40
    x = _act_input(E, M, N, device)
    mm = torch.tensor([40, 0, 17], dtype=torch.int32, device=device)
    y = silu_and_mul(x, mm).cpu()
    q = silu_and_mul(x, mm, quantize="nvfp4", global_scale=gs, scale_layout=scale_layout)
    assert isinstance(q, NVFP4Tensor) and q.shape == (E, M, N) and q.scale_layout == scale_layout
    for e in range(E):
        y[e, int(mm[e]):] = 0  # rows the kernel never writes: compare layouts with zero rows
    ref = quantize_nvfp4_ref(y, gs, scale_layout=scale_layout)
    ksf = N // 16
    q_sf = q.scales.cpu().view(torch.uint8)
    r_sf = ref.scales.view(torch.uint8)
    if scale_layout == "swizzled":
        assert torch.equal(q_sf, r_sf)  # whole buffer, padding included (zero)
        q_sf, r_sf = unswizzle_scales(q_sf, M, ksf), unswizzle_scales(r_sf, M, ksf)
    for e in range(E):
        m = int(mm[e])
        assert torch.equal(q.data[e, :m].cpu(), ref.data[e, :m])
        assert torch.equal(q_sf[e, :m], r_sf[e, :m])
        if gs == "per_token":
            assert torch.equal(q.global_scale[e, :m].cpu(), ref.global_scale[e, :m])
    if gs != "per_token":
        assert q.global_scale.dim() == 0 and float(q.global_scale) == gs


def test_silu_and_mul_rows_untouched_and_reference(device):
    E, M, N = 2, 16, 32
    x = _act_input(E, M, N, device)
    mm = torch.tensor([5, 0], dtype=torch.int32, device=device)
    q = silu_and_mul(x, mm, quantize="nvfp4")
    assert torch.all(q.global_scale.cpu()[0, 5:] == 1) and torch.all(q.global_scale.cpu()[1] == 1)
    r = silu_and_mul(x, mm, quantize="nvfp4", impl="reference")
    assert torch.equal(q.data[0, :5].cpu(), r.data[0, :5].cpu())


def test_silu_and_mul_bad_inputs(device):
    x = torch.randn(2, 8, 64, device=device).bfloat16()
    mm = torch.tensor([1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="^x: expected 3 dims"):
        silu_and_mul(x[0], mm)
    with pytest.raises(ValueError, match="^x: last dim must be even"):
        silu_and_mul(x[..., :63].contiguous(), mm)
    with pytest.raises(ValueError, match="^x: N = x.shape"):
        silu_and_mul(x[..., :40].contiguous(), mm, quantize="nvfp4")
    with pytest.raises(ValueError, match="^quantize: must be one of"):
        silu_and_mul(x, mm, quantize="fp8")
    with pytest.raises(TypeError, match="^masked_m: dtype"):
        silu_and_mul(x, mm.float())
    with pytest.raises(ValueError, match="^global_scale: must be finite"):
        silu_and_mul(x, mm, quantize="nvfp4", global_scale=-1.0)
    with pytest.raises(ValueError, match="^global_scale: a tensor must be a 0-dim"):
        silu_and_mul(x, mm, quantize="nvfp4", global_scale=torch.ones(3, device=device))
    with pytest.raises(ValueError, match="^masked_m: is on meta"):
        silu_and_mul(x, mm.to("meta"))
    if device.type == "cpu":
        with pytest.raises(ValueError, match=r"^masked_m: values must lie in \[0, max_m=8\]"):
            silu_and_mul(x, torch.tensor([9, 0], dtype=torch.int32))


# ----------------------------------------------------------------------------- E2M1 PTX decode
def _run_ptx(asm: str, regs: dict) -> dict:
    """A tiny emulator of the PTX subset the E2M1 decode uses (b32 logic, prmt in the default
    mode, fma.rn.bf16x2), so the GPU-only inline assembly is checked on CPU bit for bit."""
    import re

    M32 = 0xFFFFFFFF

    def val(tok):
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else (int(tok) if tok.isdigit() else regs[tok])

    def bf16_bits_to_float(h):
        return torch.tensor([h - 0x10000 if h >= 0x8000 else h], dtype=torch.int16).view(torch.bfloat16).item()

    def float_to_bf16_bits(x):
        return torch.tensor([x], dtype=torch.float64).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        d = args[0]
        if op == "mov.b32":
            regs[d] = val(args[1])
        elif op == "and.b32":
            regs[d] = val(args[1]) & val(args[2])
        elif op == "or.b32":
            regs[d] = val(args[1]) | val(args[2])
        elif op == "shl.b32":
            regs[d] = (val(args[1]) << val(args[2])) & M32
        elif op == "shr.b32":
            regs[d] = val(args[1]) >> val(args[2])
        elif op == "prmt.b32":
            src = val(args[1]) | (val(args[2]) << 32)
            sel = val(args[3])
            out = 0
            for i in range(4):
                s = (sel >> (4 * i)) & 0xF
                assert s < 8, "sign-replicate mode is not used"
                out |= ((src >> (8 * s)) & 0xFF) << (8 * i)
            regs[d] = out
        elif op == "fma.rn.bf16x2":
            a, b, c = val(args[1]), val(args[2]), val(args[3])
            out = 0
            for h in range(2):
                fa, fb, fc = (bf16_bits_to_float((v >> (16 * h)) & 0xFFFF) for v in (a, b, c))
                out |= float_to_bf16_bits(fa * fb + fc) << (16 * h)
            regs[d] = out
        else:
            raise AssertionError(f"unemulated instruction {op}")
        assert re.fullmatch(r"[$\w]+", d)
    return regs


def test_e2m1_ptx_decode_is_exact():
    from fp4comm.formats import e2m1_table
    from fp4comm.kernels.gemm import E2M1_BF16_ASM

    asm = E2M1_BF16_ASM.value if hasattr(E2M1_BF16_ASM, "value") else E2M1_BF16_ASM
    table = e2m1_table()
    g = torch.Generator().manual_seed(0)
    # every byte value in every position; scales: random finite E4M3 values, both signs of codes
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = e4m3[torch.isfinite(e4m3) & (e4m3 >= 0)]
    for i in range(256):
        bytes_ = [(i + 64 * p) % 256 for p in range(4)]
        scales = finite[torch.randint(len(finite), (4,), generator=g)].tolist()
        sbits = [torch.tensor([s]).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF for s in scales]
        regs = {"$4": sum(b << (8 * p) for p, b in enumerate(bytes_)),
                "$5": sbits[0] | (sbits[1] << 16), "$6": sbits[2] | (sbits[3] << 16)}  # fmt: skip
        regs = _run_ptx(asm, regs)
        for p, b in enumerate(bytes_):
            reg_lo, reg_hi, half = ("$0", "$2", p) if p < 2 else ("$1", "$3", p - 2)
            for reg, code in ((reg_lo, b & 15), (reg_hi, b >> 4)):
                bits = (regs[reg] >> (16 * half)) & 0xFFFF
                got = torch.tensor([bits - 0x10000 if bits >= 0x8000 else bits], dtype=torch.int16).view(torch.bfloat16).item()
                want = float(table[code]) * scales[p]
                assert got == want, (hex(b), code, scales[p], got, want)
