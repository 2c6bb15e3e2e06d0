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


@triton.jit
def _pack16(w_ptr, inv_ptr, se_ptr, so_ptr, soft_ptr, hw_ptr, mx_ptr, R: tl.constexpr, HW: tl.constexpr):
    r = tl.arange(0, R)
    k = r[:, None] * 4 + tl.arange(0, 4)[None, :]
    w = tl.load(w_ptr + k)
    inv = tl.load(inv_ptr + r)
    even, odd = C.unpack_pairs(w, 16, True)
    tl.store(se_ptr + k, C.e2m1_rne_bits(even * inv[:, None]))
    tl.store(so_ptr + k, C.e2m1_rne_bits(odd * inv[:, None]))
    tl.store(soft_ptr + r, C.nvfp4_pack_codes16(w, even, odd, inv, False))
    tl.store(mx_ptr + 2 * r, C.abs16x2_max(w, w, False))
    if HW:
        tl.store(hw_ptr + r, C.nvfp4_pack_codes16(w, even, odd, inv, True))
        tl.store(mx_ptr + 2 * r + 1, C.abs16x2_max(w, w, True))


def _run_ptx(asm: str, args: list[np.ndarray]) -> np.ndarray:
    """Test-only interpreter of the few PTX instructions the packing asm uses, on uint32 arrays."""
    regs = {f"${i + 1}": a.astype(np.uint64) for i, a in enumerate(args)}

    def val(tok):
        return regs[tok] if tok in regs else np.uint64(int(tok, 0))

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, rest = line.split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in src]
        if op == "mad.lo.u32":
            r = a[0] * a[1] + a[2]
        elif op == "prmt.b32":
            pool = a[0] | (a[1] << np.uint64(32))
            r = np.zeros_like(pool)
            for byte in range(4):
                idx = (int(a[2]) >> (4 * byte)) & 7
                r |= ((pool >> np.uint64(8 * idx)) & np.uint64(0xFF)) << np.uint64(8 * byte)
        elif op == "shr.b32":
            r = a[0] >> a[1]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        else:
            raise AssertionError(f"unexpected PTX op {op}")
        regs[d] = r & np.uint64(0xFFFFFFFF)
    return regs["$0"].astype(np.uint32)


def test_prmt_packing_and_u16x2_maxima_match_the_portable_code(device):
    """NVFP4_PACK16_ASM (interpreted here instruction by instruction, and run on a GPU) packs the
    same bytes as the portable nvfp4_pack_codes; the max.u16x2 maxima equal a numpy maximum."""
    R = 256
    g = torch.Generator().manual_seed(5)
    x = torch.randn(R, 8, generator=g) * torch.exp(torch.randn(R, 1, generator=g) * 3)
    x[::7] = -x[::7]
    x[3, :] = -0.0
    x[5, 2] = float("nan")
    x[6, 1] = -float("inf")
    w = x.to(torch.bfloat16).view(torch.int32).contiguous()  # [R, 4] words, even element low
    inv = torch.rand(R, generator=g) * 8
    inv[0] = 0.0
    out = {n: torch.zeros(s, dtype=torch.int32, device=device) for n, s in
           (("se", (R, 4)), ("so", (R, 4)), ("soft", R), ("hw", R), ("mx", 2 * R))}
    hw = device.type == "cuda" if isinstance(device, torch.device) else str(device).startswith("cuda")
    _pack16[(1,)](w.to(device), inv.to(device), out["se"], out["so"], out["soft"], out["hw"], out["mx"], R=R, HW=hw)
    o = {n: t.cpu().numpy().view(np.uint32) for n, t in out.items()}
    wn = w.numpy().view(np.uint32)
    emulated = _run_ptx(C.NVFP4_PACK16_ASM.value, [wn[:, j] for j in range(4)] + [o["se"][:, j] for j in range(4)]
                        + [o["so"][:, j] for j in range(4)])
    assert np.array_equal(emulated, o["soft"])
    a = wn & 0x7FFF7FFF
    want = np.maximum.reduce(a >> 16, axis=1) << 16 | np.maximum.reduce(a & 0xFFFF, axis=1)
    assert np.array_equal(o["mx"][0::2], want)
    if hw:
        assert np.array_equal(o["hw"], o["soft"]) and np.array_equal(o["mx"][1::2], want)


@triton.jit
def _dequant_codes(codes_ptr, sfb_ptr, gs_ptr, out_ptr, NB: tl.constexpr):
    """One tile a program: ``NB`` blocks of 16 codes, their scale bytes, one ``gs``."""
    p = tl.program_id(0)
    b = tl.arange(0, NB)
    o = (p * NB + b)[:, None] * 16 + tl.arange(0, 16)[None, :]
    v = C.nvfp4_dequantize_codes(tl.load(codes_ptr + o), tl.load(sfb_ptr + p * NB + b), tl.load(gs_ptr + p))
    tl.store(out_ptr + o, v)


def test_nvfp4_dequantize_codes_matches_the_division_bit_for_bit(device):
    """The two-divisions-a-block decode (fast path) gives the bits of ``e2m1 * sf / gs`` per
    element, and tiles with values it cannot scale exactly (quotients near the subnormal or
    overflow range, NaN scales, non-positive or infinite ``gs``) take the division: every
    scale byte, every code (with -0), and ``gs`` from 1e-38 to 3e38."""
    g = torch.Generator().manual_seed(11)
    NB = 16
    gs_list = [1.0, 2688 / 3.7, 0.37, 1e-30, 1e30, 3e38, 1.2e-38, 1e-3, 5e3, float("inf"), 0.0, -2.0, 1e20, 1e-20]
    tiles = []
    for gs in gs_list:
        for _ in range(3):
            tiles.append((torch.randint(0, 16, (NB, 16), generator=g), torch.randint(0, 256, (NB,), generator=g), gs))
    tiles.append((torch.arange(256).reshape(NB, 16) % 16, torch.arange(256)[:NB] + 0x30, 1.0))  # all codes, normal scales
    tiles.append((torch.arange(256).reshape(NB, 16) % 16, torch.arange(NB) + 0x70, 1.0))  # 0x7F (NaN) among them
    codes = torch.stack([t[0] for t in tiles]).int()
    sfb = torch.stack([t[1] for t in tiles]).int()
    gs = torch.tensor([t[2] for t in tiles], dtype=torch.float32)
    out = torch.empty(len(tiles), NB, 16, dtype=torch.float32, device=device)
    _dequant_codes[(len(tiles),)](codes.to(device), sfb.to(device), gs.to(device), out, NB=NB)
    e2m1 = torch.tensor(oracles.E2M1, dtype=torch.float32)
    mag = e2m1[codes & 7]
    val = torch.where((codes & 8) != 0, -mag, mag)  # -0.0 for code 8
    sf = torch.from_numpy(formats_e4m3(sfb.numpy()))
    want = (val * sf[:, :, None]) / gs[:, None, None]
    got = out.cpu()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def formats_e4m3(b: np.ndarray) -> np.ndarray:
    """E4M3 byte -> float32 value (NaN for 0x7F / 0xFF)."""
    return np.asarray(oracles.E4M3, dtype=np.float32)[b & 0x7F] * np.where(b & 0x80, -1.0, 1.0).astype(np.float32)
