"""``fp4comm._launch``: the cached direct launch gives the JIT's results, and its cache key
separates exactly what Triton specializes on (checked against Triton's own
``native_specialize_impl``, CPU), so a cached ``CompiledKernel`` is never reused for an
argument tuple the JIT would compile differently.

GPU: ``pytest tests/test_launch_cache.py`` (~10 s, mostly compiles)."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl

from fp4comm import _launch


def _native(v):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, v, False, True, True)


INTS = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, (1 << 31) - 16, (1 << 31) - 1, 1 << 31, (1 << 31) + 8,
        (1 << 31) + 16, -(1 << 31), -(1 << 31) - 1, -(1 << 31) - 16, (1 << 40) + 3, (1 << 63) - 16,
        1 << 63, (1 << 63) + 8, (1 << 64) - 16]  # fmt: skip


def _tensors():
    out = []
    for dt in (torch.bfloat16, torch.float32, torch.uint8, torch.int32, torch.int64, torch.float8_e4m3fn):
        base = torch.zeros(64, dtype=dt)
        for off in range(0, 5):
            out.append(base[off:])
    return out


@pytest.mark.parametrize("kind", ["int", "tensor", "other"])
def test_key_matches_triton_specialization(kind):
    """Equal keys <=> equal JIT specializations, over every pair of sample values."""
    vals = {"int": INTS, "tensor": _tensors(), "other": [0.5, 3.0, True, False, None]}[kind]
    for a, b in itertools.combinations_with_replacement(vals, 2):
        same_key = _launch.arg_key(a)[0] == _launch.arg_key(b)[0]
        assert same_key == (_native(a) == _native(b)), (_describe(a), _describe(b))


def _describe(v):
    return (v.dtype, v.data_ptr() % 16) if isinstance(v, torch.Tensor) else v


def test_launcher_value_is_address_for_tensors():
    t = torch.zeros(8, dtype=torch.float32)[1:]
    assert _launch.arg_key(t)[1] == t.data_ptr()
    assert _launch.arg_key(7)[1] == 7
    assert _launch.arg_key(object()) is None  # unknown types take the JIT path


@triton.jit(do_not_specialize=["d"])
def _probe_kernel(x_ptr, y_ptr, n, a, d, s, BLOCK: tl.constexpr, MUL: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    v = tl.load(x_ptr + i, mask=m, other=0.0)
    tl.store(y_ptr + i, v * MUL + a + d + s, mask=m)


def _ref(x, n, a, d, s, mul):
    y = torch.zeros_like(x)
    y[:n] = x[:n] * mul + a + d + s
    return y


def test_launch_matches_jit(device):
    """Same results as ``kernel[grid]`` over varying pointer alignment, ints equal to 1 /
    multiples of 16, a ``do_not_specialize`` int, floats and constexprs; on GPUs every
    specialization gets one cache entry and repeats hit it."""
    base = torch.arange(300, dtype=torch.float32, device=device)
    cases = [(0, 200, 1, 1, 0.5, 2), (0, 200, 16, 3, 1.5, 2), (1, 17, 5, 16, 0.0, 2), (4, 64, 1, 1, 2.0, 3),
             (3, 1, 32, 1, 1.0, 2), (0, 200, 1, 1, 0.5, 2)]  # fmt: skip
    _launch.clear_cache()
    for off, n, a, d, s, mul in cases * 2:
        x = base[off:]
        y = torch.full_like(x, -7.0)
        _launch.launch(_probe_kernel, (triton.cdiv(max(n, 1), 64),), x, y, n, a, d, s, BLOCK=64, MUL=mul)
        exp = _ref(x, n, a, d, s, mul)
        exp[n:] = -7.0
        assert torch.equal(y, exp), (off, n, a, d, s, mul)
    if device.type == "cuda":
        keys = {(off % 4 == 0, n == 1, n % 16 == 0, a == 1, a % 16 == 0, d == 1, d % 16 == 0, mul)
                for off, n, a, d, _, mul in cases}  # fmt: skip
        assert _launch.cache_entries(_probe_kernel) == len(keys)


def test_disabled_and_interpreted_take_the_jit_path(device, monkeypatch):
    x = torch.arange(64, dtype=torch.float32, device=device)
    y = torch.zeros_like(x)
    monkeypatch.setattr(_launch, "ENABLED", False)
    _launch.clear_cache()
    _launch.launch(_probe_kernel, (1,), x, y, 64, 2, 3, 0.5, BLOCK=64, MUL=2)
    assert torch.equal(y, x * 2 + 5.5)
    assert _launch.cache_entries(_probe_kernel) == 0
