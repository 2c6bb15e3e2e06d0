"""Paged KV-cache writes: Triton kernel bit-exact vs the plain-torch reference, saturation,
zero-safe dynamic scales, calibration, allocation, and input validation.

Strictness: cache bytes and scale caches ``torch.equal`` between kernel and reference
(every byte of the cache, untouched slots included); dequantized values within the format's
rounding bound (E4M3: half an ulp, relative 2^-4 for normals; int8: half a step).
"""

from __future__ import annotations

import pytest
import torch

from fp4comm.attention import KVCache, calibrate_kv_scales, write_kv_cache, write_tiles
from fp4comm.reference import attention as ref

FORMATS = list(ref.KV_FORMATS)
#: where the kernel tests run: the GPU when present, else CPU through the interpreter
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)


def make_inputs(T, H, D, dtype=torch.float32, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    mag = torch.logspace(-3, 2, H).view(1, H, 1)  # heads over 5 decades
    k = torch.randn(T, H, D, generator=g) * mag
    v = torch.randn(T, H, D, generator=g) * mag.flip(1)
    if T > 3:
        k[1, 0] = 0.0  # an all-zero head (dynamic: scale 1)
        v[2] = 0.0
        k[3, -1, 5] = 1e30  # saturates (static) / sets the scale (dynamic)
        v[3, 0, :3] = torch.tensor([float("inf"), -float("inf"), 3e38])
        k[0, 0, :4] = torch.tensor([1e-8, -1e-8, 2.0**-20, -0.0])  # subnormal / signed zero territory
    return k.to(dtype).to(device), v.to(dtype).to(device)


def make_cache(nb, bs, H, D, fmt, device=DEV, seed=0):
    """A cache pre-filled with random bytes, so untouched slots are checked too."""
    g = torch.Generator().manual_seed(seed + 100)
    ks = vs = None
    if fmt in ("fp8", "int8"):
        ks = torch.logspace(-4, 0, H) * 1.37  # per head, never 1
        vs = torch.tensor(0.0123)  # per tensor
    c = KVCache.allocate(nb, bs, H, D, fmt, k_scale=ks, v_scale=vs)
    for t in (c.k_cache, c.v_cache):
        raw = _raw(t)
        raw.copy_(torch.randint(0, 1 << (8 * t.element_size() - 1), raw.shape, generator=g, dtype=raw.dtype))
        if t.dtype == torch.bfloat16:
            t.clamp_(-100, 100).nan_to_num_(0.0)
        if t.dtype == torch.float8_e4m3fn:
            raw.bitwise_and_(0x77)  # no NaN bytes in the garbage (torch.equal on NaN is False)
    for t in (c.k_scale_cache, c.v_scale_cache):
        if t is not None:
            t.uniform_(0.5, 2.0, generator=g)
    return KVCache(*(x.to(device) if isinstance(x, torch.Tensor) else x
                     for x in (c.k_cache, c.v_cache, c.kv_format, c.k_scale, c.v_scale, c.k_scale_cache,
                               c.v_scale_cache)))


def clone(c: KVCache) -> KVCache:
    return KVCache(*(x.clone() if isinstance(x, torch.Tensor) else x
                     for x in (c.k_cache, c.v_cache, c.kv_format, c.k_scale, c.v_scale, c.k_scale_cache,
                               c.v_scale_cache)))


def assert_same(a: KVCache, b: KVCache):
    assert torch.equal(_raw(a.k_cache), _raw(b.k_cache)), "k_cache bytes differ"
    assert torch.equal(_raw(a.v_cache), _raw(b.v_cache)), "v_cache bytes differ"
    if a.k_scale_cache is not None:
        assert torch.equal(a.k_scale_cache, b.k_scale_cache), "k_scale_cache differs"
        assert torch.equal(a.v_scale_cache, b.v_scale_cache), "v_scale_cache differs"


SHAPES = {"T9_H3_D48_bs5": (9, 3, 48, 5), "T17_H2_D64_bs16": (17, 2, 64, 16), "T1_H1_D128_bs1": (1, 1, 128, 1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_write_bit_exact(fmt, shape, dtype):
    T, H, D, bs = SHAPES[shape]
    k, v = make_inputs(T, H, D, dtype)
    if dtype == torch.float16:
        k, v = k.nan_to_num(posinf=6e4, neginf=-6e4), v.nan_to_num(posinf=6e4, neginf=-6e4)
    nb = (2 * T) // bs + 2
    g = torch.Generator().manual_seed(7)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[::4] = -1  # skipped tokens
    slots = slots.to(DEV)
    a = make_cache(nb, bs, H, D, fmt)
    b = clone(a)
    a.write(k, v, slots, impl="triton")
    b.write(k, v, slots, impl="reference")
    assert_same(a, b)


def test_write_strided_inputs_and_int64_slots():
    """k, v as slices of a fused QKV tensor (token stride != H * D)."""
    T, H, D = 6, 2, 64
    qkv = torch.randn(T, 4 * H, D, device=DEV)
    k, v = qkv[:, H:2 * H], qkv[:, 3 * H:]
    slots = torch.tensor([5, 0, -3, 11, 7, 2], dtype=torch.int64, device=DEV)
    a = make_cache(4, 4, H, D, "fp8_dynamic")
    b = clone(a)
    a.write(k, v, slots, impl="triton")
    b.write(k.contiguous(), v.contiguous(), slots, impl="reference")
    assert_same(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_within_rounding_bound(fmt):
    T, H, D = 16, 2, 64
    g = torch.Generator().manual_seed(3)
    k = torch.randn(T, H, D, generator=g) * 3
    v = torch.randn(T, H, D, generator=g) * 0.2
    k, v = k.to(DEV), v.to(DEV)
    ks, vs = (calibrate_kv_scales(k, v, fmt, margin=1.1) if fmt in ("fp8", "int8") else (None, None))
    c = KVCache.allocate(8, 4, H, D, fmt, k_scale=ks, v_scale=vs, device=DEV)
    c.write(k, v, torch.arange(T, device=DEV), impl="triton")
    for x, cache, s_static, s_cache in ((k, c.k_cache, ks, c.k_scale_cache), (v, c.v_cache, vs, c.v_scale_cache)):
        q = cache.view(-1, H, D)[:T].float()
        if s_cache is not None:
            scale = s_cache.view(-1, H)[:T, :, None]
        elif s_static is not None:
            scale = s_static.view(1, -1, 1)
        else:
            scale = torch.ones(())
        deq = q * scale
        err = (deq - x).abs()
        base = ref.base_format(fmt)
        if base == "bf16":
            bound = x.abs() * 2.0**-8
        elif base == "fp8":
            bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)  # normals / subnormal step 2^-9
        else:
            bound = scale * 0.5 + 0 * x
        assert (err <= bound * (1 + 1e-6)).all(), f"{fmt}: max excess {(err - bound).max().item():.3e}"


@pytest.mark.parametrize("fmt", ["fp8", "int8", "fp8_dynamic", "int8_dynamic"])
def test_saturation_never_wraps(fmt):
    H, D = 2, 64
    k = torch.full((3, H, D), 1e30, device=DEV)
    k[1] = -1e30
    k[2, :, ::2] = float("inf")
    k[2, :, 1::2] = -float("inf")
    v = -k
    ks = torch.tensor([0.5, 2.0], device=DEV) if fmt in ("fp8", "int8") else None
    c = KVCache.allocate(2, 4, H, D, fmt, k_scale=ks, v_scale=ks, device=DEV)
    c.write(k, v, torch.tensor([0, 1, 2], device=DEV), impl="triton")
    qmax = ref.QMAX[ref.base_format(fmt)]
    for cache, x in ((c.k_cache, k), (c.v_cache, v)):
        got = cache.view(-1, H, D)[:3].float()
        assert got.isfinite().all()
        assert torch.equal(got, torch.sign(x) * qmax), "saturates at +-QMAX with the input's sign"
    if c.k_scale_cache is not None:
        assert c.k_scale_cache.isfinite().all() and (c.k_scale_cache > 0).all()
    if ref.base_format(fmt) == "int8":
        assert int(c.k_cache.min()) >= -127  # symmetric: -128 never written


@pytest.mark.parametrize("fmt", ["fp8_dynamic", "int8_dynamic"])
def test_dynamic_zero_heads_store_scale_one(fmt):
    H, D = 3, 64
    k = torch.randn(4, H, D, device=DEV)
    k[:, 1] = 0.0
    k[2] = 0.0
    k[3, 2] = 1e-44  # subnormal amax: amax / QMAX underflows to 0 -> scale 1
    k[0, 2] = 2e-37  # normal amax, subnormal amax / QMAX (1 / scale would be Inf) -> scale 1, zero codes
    v = torch.zeros(4, H, D, device=DEV)
    c = KVCache.allocate(2, 4, H, D, fmt, device=DEV)
    c.k_scale_cache.fill_(-5.0)
    c.write(k, v, torch.arange(4, device=DEV), impl="triton")
    sc = c.k_scale_cache.view(-1, H)[:4]
    assert (sc[:, 1] == 1).all() and (sc[2] == 1).all() and sc[3, 2] == 1 and sc[0, 2] == 1
    assert (c.k_cache.view(-1, H, D)[0, 2].float() == 0).all()
    assert (c.v_scale_cache.view(-1, H)[:4] == 1).all()
    assert (c.k_cache.view(-1, H, D)[:4, 1].float() == 0).all()
    assert sc.isfinite().all() and (sc > 0).all()


def test_recipe_multiplies_by_the_reciprocal():
    """The spec: ``v = x * RN(1 / scale)`` (one IEEE division a head), then the 8-bit rounding.
    Inputs picked where that and rounding the true quotient ``x / scale`` give different
    codes: kernel and reference follow the reciprocal."""
    s = torch.tensor(7.0)
    inv = torch.tensor(1.0) / s  # RN(1/7)
    x = (torch.randn(1 << 18, generator=torch.Generator().manual_seed(7)) * 700).to(torch.bfloat16).float()
    for fmt in ("fp8", "int8"):
        by_inv = ref.quantize_values(x * inv, torch.tensor(1.0), fmt)
        by_div = ref.quantize_values(x / s, torch.tensor(1.0), fmt)
        apart = x[by_inv.view(torch.uint8) != by_div.view(torch.uint8)]
        assert apart.numel() >= 8, fmt  # boundary cases exist for this scale
        xs = apart[:8].repeat_interleave(8).view(8, 1, 8)
        want = ref.quantize_values(xs, s, fmt)
        assert torch.equal(want.view(torch.uint8), ref.quantize_values(xs * inv, torch.tensor(1.0), fmt).view(torch.uint8))
        c = KVCache.allocate(2, 4, 1, 8, fmt, k_scale=s, v_scale=s, device=DEV)
        c.write(xs.to(DEV), xs.to(DEV), torch.arange(8, device=DEV), impl="triton")
        assert torch.equal(c.k_cache.view(-1, 1, 8)[:8].cpu().view(torch.uint8), want.view(torch.uint8)), fmt


def test_nan_input_is_defined():
    """NaN never turns into a silent finite fp8 value: fp8 stores NaN (0x7F); int8 stores 0."""
    k = torch.ones(1, 1, 64, device=DEV)
    half = torch.tensor(0.5, device=DEV)
    k[0, 0, 3] = float("nan")
    c8 = KVCache.allocate(1, 1, 1, 64, "fp8", k_scale=half, v_scale=half, device=DEV)
    c8.write(k, k, torch.tensor([0], device=DEV), impl="triton")
    assert c8.k_cache.view(torch.uint8)[0, 0, 0, 3] == 0x7F
    ci = KVCache.allocate(1, 1, 1, 64, "int8", k_scale=half, v_scale=half, device=DEV)
    ci.write(k, k, torch.tensor([0], device=DEV), impl="triton")
    assert ci.k_cache[0, 0, 0, 3] == 0 and ci.k_cache[0, 0, 0, 0] == 2


def test_calibrate_kv_scales():
    g = torch.Generator().manual_seed(5)
    k1, k2 = torch.randn(10, 3, 16, generator=g), torch.randn(5, 3, 16, generator=g) * 4
    v = torch.randn(10, 3, 16, generator=g)
    v[:, 2] = 0
    ks, vs = calibrate_kv_scales([k1, k2], v, "int8")
    amax = torch.cat([k1, k2]).abs().amax(dim=(0, 2))
    assert torch.equal(ks, amax / 127.0)
    assert vs[2] == 1.0  # never seen non-zero
    kt, _ = calibrate_kv_scales(k1, v, "fp8", per_head=False, margin=1.25)
    assert kt.dim() == 0 and torch.isclose(kt, k1.abs().max() * 1.25 / 448.0)
    # calibrated static fp8 never saturates on the calibration data
    c = KVCache.allocate(4, 4, 3, 16, "fp8", k_scale=ks * 127 / 448, v_scale=vs)
    c.write(k2, k2, torch.arange(5))
    assert c.k_cache.float().abs().max() <= 448
    with pytest.raises(ValueError, match="kv_format"):
        calibrate_kv_scales(k1, v, "fp8_dynamic")
    with pytest.raises(ValueError, match="margin"):
        calibrate_kv_scales(k1, v, "fp8", margin=0.5)


def test_kvcache_allocate():
    c = KVCache.allocate(3, 16, 2, 64, "int8_dynamic")
    assert c.k_cache.shape == (3, 16, 2, 64) and c.k_cache.dtype == torch.int8
    assert c.k_scale_cache.shape == (3, 16, 2) and (c.k_scale_cache == 1).all()
    assert c.nbytes() == 2 * 3 * 16 * 2 * 64 + 2 * 3 * 16 * 2 * 4
    assert (c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim) == (3, 16, 2, 64)
    c = KVCache.allocate(3, 16, 2, 64, "fp8", k_scale=0.5, v_scale=torch.tensor([0.1, 0.2]))
    assert c.k_cache.dtype == torch.float8_e4m3fn and c.k_scale.dim() == 0 and c.v_scale.shape == (2,)
    with pytest.raises(ValueError, match="k_scale"):
        KVCache.allocate(3, 16, 2, 64, "fp8")
    with pytest.raises(ValueError, match="kv_format"):
        KVCache.allocate(3, 16, 2, 64, "nvfp4")
    with pytest.raises(ValueError, match="block_size"):
        KVCache.allocate(3, 0, 2, 64, "bf16")


def test_empty_and_all_skipped():
    c = KVCache.allocate(2, 4, 1, 64, "fp8_dynamic")
    before = clone(c)
    c.write(torch.zeros(0, 1, 64), torch.zeros(0, 1, 64), torch.zeros(0, dtype=torch.int32))
    c.write(torch.ones(3, 1, 64), torch.ones(3, 1, 64), torch.full((3,), -1, dtype=torch.int32))
    assert_same(c, before)


def test_write_tiles():
    assert write_tiles(8, 128) == (8, 128, 1)  # one warp: 32 values a thread
    bh, bd, _ = write_tiles(64, 256)
    assert bd == 256 and bh * bd <= 4096
    assert write_tiles(1, 48)[1] == 64


# ----------------------------------------------------------------------------- bad inputs
def _args(fmt="fp8"):
    c = KVCache.allocate(2, 4, 2, 64, fmt, **({"k_scale": 0.5, "v_scale": 0.25} if fmt in ("fp8", "int8") else {}))
    return dict(k=torch.randn(3, 2, 64), v=torch.randn(3, 2, 64), k_cache=c.k_cache, v_cache=c.v_cache,
                slot_mapping=torch.tensor([0, 1, 2]), kv_format=fmt, k_scale=c.k_scale, v_scale=c.v_scale,
                k_scale_cache=c.k_scale_cache, v_scale_cache=c.v_scale_cache)


BAD = {
    "k_dtype": (TypeError, "k", lambda a: dict(k=a["k"].to(torch.int32))),
    "v_shape": (ValueError, "v", lambda a: dict(v=a["v"][:, :1])),
    "head_dim_mismatch": (ValueError, "k", lambda a: dict(k=torch.randn(3, 2, 32))),
    "cache_dtype": (TypeError, "k_cache", lambda a: dict(k_cache=a["k_cache"].view(torch.int8))),
    "cache_ndim": (ValueError, "k_cache", lambda a: dict(k_cache=a["k_cache"][0])),
    "slot_range": (ValueError, "slot_mapping", lambda a: dict(slot_mapping=torch.tensor([0, 8, 1]))),
    "slot_dtype": (TypeError, "slot_mapping", lambda a: dict(slot_mapping=torch.tensor([0.0, 1.0, 2.0]))),
    "slot_len": (ValueError, "slot_mapping", lambda a: dict(slot_mapping=torch.tensor([0, 1]))),
    "no_scale": (ValueError, "k_scale", lambda a: dict(k_scale=None)),
    "scale_zero": (ValueError, "v_scale", lambda a: dict(v_scale=torch.tensor(0.0))),
    "scale_subnormal": (ValueError, "k_scale", lambda a: dict(k_scale=torch.tensor(1e-39))),  # 1 / scale = Inf
    "scale_shape": (ValueError, "k_scale", lambda a: dict(k_scale=torch.ones(3))),
    "scale_dtype": (TypeError, "k_scale", lambda a: dict(k_scale=torch.ones(2, dtype=torch.float64))),
    "format": (ValueError, "kv_format", lambda a: dict(kv_format="e5m2")),
    "impl": (ValueError, "impl", lambda a: dict(impl="cuda")),
    "scale_cache_static": (ValueError, "k_scale_cache", lambda a: dict(k_scale_cache=torch.ones(2, 4, 2))),
}


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_inputs(name):
    exc, arg, over = BAD[name]
    a = _args()
    a.update(over(a))
    pos = [a.pop(n) for n in ("k", "v", "k_cache", "v_cache", "slot_mapping")]
    with pytest.raises(exc, match=arg):
        write_kv_cache(*pos, **a)


def test_dynamic_bad_inputs():
    a = _args("int8_dynamic")
    pos = [a.pop(n) for n in ("k", "v", "k_cache", "v_cache", "slot_mapping")]
    with pytest.raises(ValueError, match="k_scale"):
        write_kv_cache(*pos, **{**a, "k_scale": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="v_scale_cache"):
        write_kv_cache(*pos, **{**a, "v_scale_cache": None})
    with pytest.raises(ValueError, match="k_scale_cache"):
        write_kv_cache(*pos, **{**a, "k_scale_cache": torch.ones(2, 4, 3)})


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_write_bit_exact(fmt):
    T, H, D, bs = 3000, 8, 128, 16
    k, v = make_inputs(T, H, D, torch.bfloat16, device="cuda")
    nb = T // bs + 8
    slots = torch.randperm(nb * bs, device="cuda")[:T]
    slots[::7] = -1
    a = make_cache(nb, bs, H, D, fmt, device="cuda")
    b = clone(a)
    a.write(k, v, slots, impl="triton")
    b.write(k, v, slots, impl="reference")
    assert_same(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8_dynamic"])
def test_gpu_write_head_dim_256_many_heads(fmt):
    T, H, D, bs = 257, 32, 256, 32
    k, v = make_inputs(T, H, D, torch.float32, device="cuda")
    nb = T // bs + 2
    slots = torch.randperm(nb * bs, device="cuda")[:T]
    ks = torch.logspace(-3, 1, H, device="cuda") if fmt == "fp8" else None
    c = KVCache.allocate(nb, bs, H, D, fmt, device="cuda", k_scale=ks, v_scale=ks)
    d = clone(c)
    c.write(k, v, slots, impl="triton")
    d.write(k, v, slots, impl="reference")
    assert_same(c, d)
