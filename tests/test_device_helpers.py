"""The shared device helpers of ``kernels/common.py`` against brute-force oracles and the
torch reference, value by value (the quantize kernels are tested end to end elsewhere)."""

import numpy as np
import torch
import triton
import triton.language as tl

from fp4comm import formats
from fp4comm.kernels import common as C
from tests import oracles


@triton.jit
def _apply(x_ptr, code_ptr, e4_ptr, bf_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(x_ptr + o, mask=m, other=0.0)
    tl.store(code_ptr + o, C.e2m1_encode(x), mask=m)
    _, b = C.e4m3_encode(x)
    tl.store(e4_ptr + o, b, mask=m)
    C.store_rounded(bf_ptr + o, x, m)


def _special_values() -> torch.Tensor:
    e2m1 = torch.tensor(oracles.E2M1, dtype=torch.float32)
    mids = (e2m1[1:] + e2m1[:-1]) / 2  # every E2M1 tie
    e4m3 = torch.tensor(oracles.E4M3[1:0x7F], dtype=torch.float32)
    e4mid = (e4m3[1:] + e4m3[:-1]) / 2  # every E4M3 tie
    near = torch.cat([mids, e2m1, e4mid])
    near = torch.cat([near, torch.nextafter(near, torch.full_like(near, 1e9)), torch.nextafter(near, torch.zeros_like(near))])
    extra = torch.tensor([0.0, -0.0, 6.0, 6.5, 7.0, 7.5, 8.0, 1e30, 3.4e38, 1e-30, 1.2e-38, 1e-45, 448.0, 464.0, 480.0, 1e9])
    v = torch.cat([near, extra])
    return torch.cat([v, -v])


def test_e2m1_e4m3_bf16_helpers_match_oracles_value_by_value(device):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([_special_values(), torch.randn(20000, generator=g) * 3, torch.rand(5000, generator=g) * 0.02,
                   torch.randn(5000, generator=g) * 300])
    n = x.numel()
    code = torch.empty(n, dtype=torch.int32, device=device)
    e4 = torch.empty(n, dtype=torch.int32, device=device)
    bf = torch.empty(n, dtype=torch.bfloat16, device=device)
    _apply[(triton.cdiv(n, 1024),)](x.to(device), code, e4, bf, n, BLOCK=1024)
    assert np.array_equal(code.cpu().numpy().astype(np.uint8), oracles.e2m1_code(x.numpy()))
    assert torch.equal(code.cpu().to(torch.uint8), formats.e2m1_rne_satfinite(x))
    assert np.array_equal(e4.cpu().numpy().astype(np.uint8), oracles.e4m3_byte(x.numpy()))
    assert torch.equal(bf.cpu(), x.to(torch.bfloat16))


def test_e2m1_nan_and_inf_codes_are_harmless(device):
    x = torch.tensor([float("nan"), float("inf"), -float("inf")])
    code = torch.empty(3, dtype=torch.int32, device=device)
    e4 = torch.empty(3, dtype=torch.int32, device=device)
    bf = torch.empty(3, dtype=torch.bfloat16, device=device)
    _apply[(1,)](x.to(device), code, e4, bf, 3, BLOCK=4)
    c = code.cpu().tolist()
    assert all(0 <= v <= 15 for v in c)  # callers zero non-finite blocks; the value only must stay a code
    assert c[1] == 7 and c[2] == 15  # +-Inf saturate like any |v| > 6
    assert e4.cpu().tolist() == [0x7F, 0x7E, 0xFE]
