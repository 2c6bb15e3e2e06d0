"""Format math: scalar converters against brute-force oracles, packing, the 128x4 swizzle."""

import numpy as np
import pytest
import torch

from fp4comm import formats
from tests import oracles


def test_e4m3_all_bytes_roundtrip_and_oracle():
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = ~vals.isnan()
    back = formats.e4m3_rne_satfinite(vals[finite]).view(torch.uint8)
    assert torch.equal(back, torch.arange(256)[finite].to(torch.uint8))
    # random FP32 values incl. subnormal range, ties and overflow
    g = torch.Generator().manual_seed(0)
    v = torch.cat([
        torch.randn(20000, generator=g) * 100,
        torch.rand(5000, generator=g) * 0.02,  # E4M3 subnormals
        torch.tensor([448.0, 449.0, 464.0, 465.0, 480.0, 1e30, float("inf"), -float("inf"), 2.0**-10, 2.0**-9 * 1.5]),
        torch.tensor(oracles.E4M3[1:0x7E] + np.diff(oracles.E4M3[1:0x7F]) / 2, dtype=torch.float32),  # exact ties
    ])
    got = formats.e4m3_rne_satfinite(v).view(torch.uint8).numpy()
    assert np.array_equal(got, oracles.e4m3_byte(v.numpy()))


@pytest.mark.parametrize(
    "v, code",
    [(0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6), (7.0, 7), (1e9, 7),
     (0.2500001, 1), (-0.25, 8), (-0.1, 8), (-6.0, 15), (0.0, 0), (-0.0, 8), (5.0000005, 7)],
    ids=lambda p: str(p),
)
def test_e2m1_ties_and_saturation(v, code):
    got = formats.e2m1_rne_satfinite(torch.tensor([v], dtype=torch.float32)).item()
    assert got == code
    assert oracles.e2m1_code(np.array([v], dtype=np.float32))[0] == code


def test_e2m1_random_against_oracle():
    v = torch.randn(50000, generator=torch.Generator().manual_seed(1)) * 3
    assert np.array_equal(formats.e2m1_rne_satfinite(v).numpy(), oracles.e2m1_code(v.numpy()))


def test_pack_unpack_even_element_low_nibble():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = formats.pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(formats.unpack_e2m1(packed), codes)


@pytest.mark.parametrize("E, M, K", [(1, 1, 1), (1, 128, 4), (3, 130, 7), (2, 257, 448)], ids=str)
def test_swizzle_matches_offset_formula_and_inverts(E, M, K):
    s = torch.randint(1, 255, (E, M, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(E * M + K))
    sw = formats.swizzle_scales(s)
    Mp, Kp = formats.swizzled_shape(M, K)
    assert sw.shape == (E, Mp, Kp)
    flat = sw.reshape(-1)
    e, m, k = torch.meshgrid(torch.arange(E), torch.arange(M), torch.arange(K), indexing="ij")
    offs = torch.tensor([formats.sf_offset(a, b, c, M, K) for a, b, c in zip(e.flatten().tolist(), m.flatten().tolist(), k.flatten().tolist())])
    assert torch.equal(flat[offs], s.flatten())
    # padding bytes are zero and every byte is accounted for
    assert int((flat != 0).sum()) == E * M * K
    assert torch.equal(formats.unswizzle_scales(sw, M, K), s)
    # fp8 dtype round-trips too
    s8 = s.view(torch.float8_e4m3fn)
    assert torch.equal(formats.unswizzle_scales(formats.swizzle_scales(s8), M, K).view(torch.uint8), s)


def test_swizzle_rejects_bad_input():
    with pytest.raises(ValueError, match="s:"):
        formats.swizzle_scales(torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="s:"):
        formats.unswizzle_scales(torch.zeros(1, 128, 4, dtype=torch.uint8), 129, 4)
