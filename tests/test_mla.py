"""MLA latent cache: write bit-exact vs the reference (656-byte fp8 slots with per-128 FP32
scales, or 576 BF16 values), zero-safe and saturating scales, and decode vs the FP32
reference that dequantizes the same cache (``KERNEL_TOL``) and vs attention on the
unquantized latent (``QUANT_TOL``, both relative to ``max|ref|``)."""

from __future__ import annotations

import pytest
import torch

from fp4comm.attention import MLA_FP8_SLOT_BYTES, allocate_mla_cache, mla_decode, write_mla_cache
from fp4comm.reference import attention as ref

KERNEL_TOL = 1.5e-2
QUANT_TOL = {"fp8": 6e-2, "bf16": 2e-2}
ABS_SLACK = 2e-3
#: where the kernel tests run: the GPU when present, else CPU through the interpreter
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(T, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(T, 512, generator=g) * torch.logspace(-2, 1, 4).repeat_interleave(128)  # chunks differ
    rope = torch.randn(T, 64, generator=g)
    return lat.to(torch.bfloat16).to(device), rope.to(torch.bfloat16).to(device)


def test_layout_constants():
    assert MLA_FP8_SLOT_BYTES == 656 and MLA_FP8_SLOT_BYTES % 16 == 0
    assert allocate_mla_cache(3, 16, "fp8").shape == (3, 16, 656)
    c = allocate_mla_cache(3, 16, "bf16")
    assert c.shape == (3, 16, 576) and c.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16_in", "f32_in"])
def test_write_bit_exact(fmt, dtype):
    T, nb, bs = 13, 5, 4
    lat, rope = _inputs(T)
    lat, rope = lat.to(dtype).to(DEV), rope.to(dtype).to(DEV)
    lat[2] = 0  # all-zero latent: scales 1
    lat[3, :128] = 1e30  # huge chunk: a finite scale, codes +-448
    lat[4, 130] = float("inf")  # Inf saturates inside its chunk
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(1))[:T]
    slots[5] = -1
    slots = slots.to(DEV)
    a = allocate_mla_cache(nb, bs, fmt, device=DEV)
    a.view(torch.uint8).random_(0, 120)
    b = a.clone()
    write_mla_cache(lat, rope, a, slots, fmt, impl="triton")
    write_mla_cache(lat, rope, b, slots, fmt, impl="reference")
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if fmt == "fp8":
        blk, off = slots // bs, slots % bs
        lat_deq, rope_deq = ref.mla_unpack(a[blk, off], "fp8")
        scales = a[blk, off][:, 512:528].contiguous().view(torch.float32)
        assert scales.isfinite().all() and (scales > 0).all()
        assert (scales[2] == 1).all()
        assert lat_deq.isfinite().all()
        assert torch.equal(rope_deq[0], rope[0].float().to(torch.bfloat16).float())
        ok = slots >= 0
        ok[3] = ok[4] = False
        err = (lat_deq[ok] - lat[ok].float()).abs()
        assert (err <= lat[ok].float().abs() * 2.0**-4 + scales[ok].repeat_interleave(128, 1) * 2.0**-10).all()


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("splits", [None, 2], ids=["auto", "split2"])
def test_decode_vs_reference(fmt, splits):
    bs, H = 8, 20  # 20 heads: a partial head block
    seq_lens = [1, 17, 0, 40]
    maxb = 5
    nb = len(seq_lens) * maxb + 2
    g = torch.Generator().manual_seed(2)
    bt = torch.randperm(nb, generator=g)[: len(seq_lens) * maxb].view(-1, maxb).to(torch.int32).to(DEV)
    cache = allocate_mla_cache(nb, bs, fmt, device=DEV)
    lats, ropes = [], []
    for i, L in enumerate(seq_lens):
        lat, rope = _inputs(L, seed=10 + i)
        lats.append(lat)
        ropes.append(rope)
        pos = torch.arange(L, device=DEV)
        write_mla_cache(lat.to(DEV), rope.to(DEV), cache, bt[i].long()[pos // bs] * bs + pos % bs, fmt)
    S = len(seq_lens)
    ql = (torch.randn(S, H, 512, generator=g) * 0.3).to(torch.bfloat16).to(DEV)
    qr = torch.randn(S, H, 64, generator=g).to(torch.bfloat16).to(DEV)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    scale = (512 + 64) ** -0.5
    out = mla_decode(ql, qr, cache, bt, sl, scale, fmt, impl="triton", num_kv_splits=splits)
    want = ref.mla_decode(ql, qr, cache, bt, sl, scale, fmt)
    assert not out.isnan().any()
    err = (out.float() - want).abs().max().item()
    assert err <= KERNEL_TOL * want.abs().max().item() + ABS_SLACK
    assert (out[2] == 0).all()  # empty sequence: zeros
    # end to end vs the unquantized latent
    true = torch.zeros(want.shape)
    out, ql, qr = out.cpu(), ql.cpu(), qr.cpu()
    for i, L in enumerate(seq_lens):
        if L:
            k = torch.cat([lats[i].float(), ropes[i].float()], -1)[None].expand(H, -1, -1)
            qq = torch.cat([ql[i].float(), qr[i].float()], -1)[:, None]
            allowed = torch.ones(1, L, dtype=torch.bool)
            true[i] = ref.masked_softmax_attention(qq, k, lats[i].float()[None].expand(H, -1, -1), allowed, scale)[:, 0]
    err = (out.float() - true).abs().max().item()
    assert err <= QUANT_TOL[fmt] * true.abs().max().item() + ABS_SLACK


def _valid():
    cache = allocate_mla_cache(4, 4, "fp8")
    return dict(q_latent=torch.zeros(2, 16, 512, dtype=torch.bfloat16), q_rope=torch.zeros(2, 16, 64, dtype=torch.bfloat16),
                cache=cache, block_table=torch.zeros(2, 3, dtype=torch.int32),
                seq_lens=torch.tensor([3, 0], dtype=torch.int32), softmax_scale=0.1, kv_format="fp8")


BAD = {
    "q_dtype": (TypeError, "q_latent", dict(q_latent=torch.zeros(2, 16, 512))),
    "q_width": (ValueError, "q_latent", dict(q_latent=torch.zeros(2, 16, 576, dtype=torch.bfloat16))),
    "rope_shape": (ValueError, "q_rope", dict(q_rope=torch.zeros(2, 8, 64, dtype=torch.bfloat16))),
    "cache_dtype": (TypeError, "cache", dict(cache=torch.zeros(4, 4, 656, dtype=torch.int8))),
    "cache_slot": (ValueError, "cache", dict(cache=torch.zeros(4, 4, 576, dtype=torch.uint8))),
    "format": (ValueError, "kv_format", dict(kv_format="int8")),
    "bt_range": (ValueError, "block_table", dict(block_table=torch.full((2, 3), 9, dtype=torch.int32))),
    "seq_lens": (ValueError, "seq_lens", dict(seq_lens=torch.tensor([13, 0], dtype=torch.int32))),
    "scale": (ValueError, "softmax_scale", dict(softmax_scale=-1.0)),
}


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_decode_bad_inputs(name):
    exc, arg, over = BAD[name]
    a = {**_valid(), **over}
    with pytest.raises(exc, match=arg):
        mla_decode(**a)


def test_write_bad_inputs():
    cache = allocate_mla_cache(2, 4, "fp8")
    lat, rope = _inputs(3)
    with pytest.raises(ValueError, match="kv_latent"):
        write_mla_cache(lat[:, :256], rope, cache, torch.arange(3))
    with pytest.raises(ValueError, match="k_rope"):
        write_mla_cache(lat, rope[:2], cache, torch.arange(3))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_mla_cache(lat, rope, cache, torch.tensor([0, 1, 8]))
    with pytest.raises(TypeError, match="cache"):
        write_mla_cache(lat, rope, cache.view(torch.bfloat16), torch.arange(3), "fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_gpu_mla_write_and_long_decode(fmt):
    bs, H, S = 64, 128, 4
    seq_lens = [1, 4000, 16384, 300]
    maxb = 16384 // bs
    nb = S * maxb
    bt = torch.randperm(nb, device="cuda")[: S * maxb].view(S, maxb).to(torch.int32)
    cache = allocate_mla_cache(nb, bs, fmt, device="cuda")
    ref_cache = cache.clone()
    for i, L in enumerate(seq_lens):
        lat, rope = _inputs(L, seed=i, device="cuda")
        pos = torch.arange(L, device="cuda")
        slots = bt[i].long()[pos // bs] * bs + pos % bs
        write_mla_cache(lat, rope, cache, slots, fmt)
        write_mla_cache(lat, rope, ref_cache, slots, fmt, impl="reference")
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    ql = (torch.randn(S, H, 512, device="cuda") * 0.3).to(torch.bfloat16)
    qr = torch.randn(S, H, 64, device="cuda").to(torch.bfloat16)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    out = mla_decode(ql, qr, cache, bt, sl, 576 ** -0.5, fmt)
    want = ref.mla_decode(ql, qr, cache, bt, sl, 576 ** -0.5, fmt)
    assert (out.float() - want).abs().max().item() <= KERNEL_TOL * want.abs().max().item() + ABS_SLACK
