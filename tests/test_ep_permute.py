"""Local EP steps, one process: the Triton pack / permute / combine kernels against the
plain-torch reference, bit for bit (payload bytes, scale bytes incl. swizzle padding,
global scales, weights, slot maps, BF16 sums)."""

import pytest
import torch

from fp4comm._runtime import use_triton
from fp4comm.ep.backend import RowTargets, pointer_table
from fp4comm.ep.buffer import _permute_index_params, combine_expert, combine_source, pack_rows, permute_rows
from fp4comm.ep.layout import get_dispatch_layout
from fp4comm.ep.message import MessageLayout, unpack_messages
from fp4comm.reference import ep as ref

pytestmark = pytest.mark.skipif(
    not use_triton(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="needs CUDA or TRITON_INTERPRET=1",
)


@pytest.fixture(autouse=True, params=["v1", "v2"])
def kernels(request, monkeypatch):
    """Every test runs with each kernel variant (``fp4comm.ep.buffer.KERNELS``)."""
    import fp4comm.ep.buffer as B

    monkeypatch.setattr(B, "KERNELS", request.param)
    return request.param


def _tokens(T, H, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g) * torch.logspace(-3, 3, T)[:, None]
    if T > 4:
        x[1] = 0.0  # all-zero token: gs = 1, zero codes
        x[2, 5] = float("nan")  # non-finite blocks -> NaN scale byte / codes
        x[3, H - 1] = float("inf")
        x[4, :16] = 1e-30  # subnormal-ish amax
    return x.bfloat16().to(device)


def _routing(T, K, E, seed=0, minus1=0.3, dup=False):
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    ids[torch.rand(T, K, generator=g) < minus1] = -1
    if dup and T > 3:
        ids[3, :] = ids[3, 0] if ids[3, 0] >= 0 else 1  # same expert for every k
    w = torch.rand(T, K, generator=g)
    return ids, w


PAYLOAD_CASES = [
    ("nvfp4", 64, "per_token"),
    ("nvfp4", 80, "per_token"),  # 5 scale blocks: masks, swizzle column padding
    ("nvfp4", 64, 123.5),  # static scalar
    ("nvfp4", 64, "tensor0d"),
    ("nvfp4", 64, "per_row"),
    ("fp8", 128, "per_token"),
    ("fp8", 384, "ue8m0"),
    ("bf16", 80, "per_token"),
]


def _gs_arg(gs, T, device):
    if gs == "tensor0d":
        return torch.tensor(37.25, device=device)
    if gs == "per_row":
        return torch.linspace(0.5, 900.0, T, device=device)
    return gs


@pytest.mark.parametrize("payload,H,gs", PAYLOAD_CASES, ids=lambda v: str(v))
def test_pack_matches_reference(payload, H, gs, device):
    T, K, E, R = 29, 3, 8, 4
    x = _tokens(T, H, device)
    ids, w = _routing(T, K, E, dup=True)
    ids, w = ids.to(device), w.to(device)
    msg = MessageLayout(payload, H, K)
    lay = get_dispatch_layout(ids, E, R)
    ue8m0 = gs == "ue8m0"
    gsa = "per_token" if ue8m0 else _gs_arg(gs, T, device)
    counts = lay.num_tokens_per_rank.tolist()
    # separate destination tensors with a row base, as a peer-memory backend passes them
    base = [3, 0, 5, 1]
    dests = [torch.full((c + b + 2, msg.row_bytes), 0xAB, dtype=torch.uint8, device=device) for c, b in zip(counts, base)]
    targets = RowTargets(dests, pointer_table(dests, device), torch.tensor(base, dtype=torch.int64, device=device))
    pack_rows(msg, x, ids, w, lay.rank_offset, targets, global_scale=gsa, ue8m0=ue8m0, impl="triton")
    want = ref.pack_rows_ref(msg, x.cpu(), ids.cpu(), w.cpu(), lay.rank_offset.cpu(), gsa if not isinstance(gsa, torch.Tensor) else gsa.cpu(), ue8m0)
    for r, (d, part) in enumerate(zip(dests, want.split(counts))):
        got = d[base[r] : base[r] + counts[r]].cpu()
        # payload, scales, gs, ids, weights, src index; the pad bytes are never written
        f_got, f_want = unpack_messages(msg, got), unpack_messages(msg, part)
        for name in ("payload", "scales", "global_scale", "topk_ids", "topk_weights", "src_index"):
            a, b = getattr(f_got, name), getattr(f_want, name)
            if a is None:
                assert b is None
                continue
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (r, name)
        # rows outside the block untouched
        assert bool((d[: base[r]] == 0xAB).all()) and bool((d[base[r] + counts[r] :] == 0xAB).all())


@pytest.mark.parametrize("payload,H", [("nvfp4", 64), ("nvfp4", 80), ("fp8", 256), ("bf16", 64)], ids=str)
@pytest.mark.parametrize("scale_layout", ["swizzled", "linear"])
@pytest.mark.parametrize("max_m,E", [(None, 16), (128, 16), (None, 256)], ids=["derived", "fixed128", "El128"])
@pytest.mark.parametrize("chunks", ["multi", "one"])
def test_permute_matches_reference(payload, H, scale_layout, max_m, E, chunks, kernels, device, monkeypatch):
    """Slots and layout vs the reference; N=150 rows span several chunks of the two-phase
    slot assignment (El=8: 3 chunks of 64 rows; El=128: 19 chunks of 8 rows; v2 with its
    column scan), or one chunk (the path of small dispatches: no histogram launch)."""
    import fp4comm.ep.buffer as B

    N, K, R, rank = 150, 4, 2, 1
    v2 = kernels == "v2"
    if E == 256 and (scale_layout == "linear" or payload != "nvfp4"):
        pytest.skip("one layout is enough for the many-experts chunking")
    if chunks == "one":
        if E == 256:
            pytest.skip("the single-chunk path is shared by every payload")
        monkeypatch.setattr(B, "_ONE_CHUNK_ROWS_V2", 1024)
        assert _permute_index_params(N, K, E // R, v2)[-1] == 1
    else:
        monkeypatch.setattr(B, "_ONE_CHUNK_ROWS", 0)
        assert _permute_index_params(N, K, E // R, v2)[-1] > 1
    El = E // R
    x = _tokens(N, H, device, seed=3)
    ids, w = _routing(N, K, E, seed=3, minus1=0.2, dup=True)
    if max_m == 128:
        ids[:140, 0] = rank * El + 2  # expert 2 overflows 128 slots: pairs past max_m dropped
    msg = MessageLayout(payload, H, K)
    rows = ref.pack_rows_ref(msg, x.cpu(), ids, w, torch.zeros(N, 1, dtype=torch.int32))
    ref_ids = unpack_messages(msg, rows).topk_ids
    _, counts = ref.permute_index_ref(ref_ids, rank * El, El, 1 << 30)
    mm = ref.round_max_m(counts) if max_m is None else max_m
    got = permute_rows(
        msg, rows.to(device), expert_base=rank * El, num_local_experts=El, max_m=mm,
        scale_layout=scale_layout, impl="triton",
    )  # fmt: skip
    slot_map, masked_m = ref.permute_index_ref(ref_ids, rank * El, El, mm)
    want = ref.permute_ref(msg, rows, slot_map, El, mm, scale_layout)
    assert torch.equal(got.masked_m.cpu(), masked_m) and got.masked_m.dtype == torch.int32
    assert torch.equal(got.slot_map.cpu(), slot_map)
    for e in range(El):
        n = min(int(masked_m[e]), mm)
        assert torch.equal(got.x[e, :n].cpu().view(torch.uint8), want.x[e, :n].view(torch.uint8)), e
    assert torch.equal(got.topk_weights.cpu(), want.topk_weights)
    if want.scales is None:
        assert got.scales is None
    else:
        assert got.scales.shape == want.scales.shape and got.scales.dtype == want.scales.dtype
        assert torch.equal(got.scales.cpu().view(torch.uint8), want.scales.view(torch.uint8))
    if want.global_scale is None:
        assert got.global_scale is None
    else:
        assert torch.equal(got.global_scale.cpu(), want.global_scale)


def test_permute_swizzled_quad_slots(kernels, device):
    """Rows of 520 payload words: the copy takes 4 slots a program, with v2 the slots 32
    apart of a 128-slot tile (``QUAD``: each scale column one 16-byte store); every byte
    equals the reference, padding rows and several tiles per expert included."""
    N, K, E, R, rank, H = 70, 2, 4, 2, 0, 4160
    El = E // R
    x = _tokens(N, H, device, seed=5)
    ids, w = _routing(N, K, E, seed=5, minus1=0.1)
    msg = MessageLayout("nvfp4", H, K)
    rows = ref.pack_rows_ref(msg, x.cpu(), ids, w, torch.zeros(N, 1, dtype=torch.int32))
    ref_ids = unpack_messages(msg, rows).topk_ids
    mm = 256
    got = permute_rows(msg, rows.to(device), expert_base=0, num_local_experts=El, max_m=mm, impl="triton")
    slot_map, masked_m = ref.permute_index_ref(ref_ids, 0, El, mm)
    want = ref.permute_ref(msg, rows, slot_map, El, mm, "swizzled")
    assert torch.equal(got.masked_m.cpu(), masked_m)
    assert torch.equal(got.scales.cpu().view(torch.uint8), want.scales.view(torch.uint8))
    assert torch.equal(got.global_scale.cpu(), want.global_scale)
    assert torch.equal(got.topk_weights.cpu(), want.topk_weights)
    for e in range(El):
        n = int(masked_m[e])
        assert torch.equal(got.x[e, :n].cpu(), want.x[e, :n]), e


def test_permute_no_rows(device):
    msg = MessageLayout("nvfp4", 64, 2)
    got = permute_rows(
        msg, torch.zeros(0, msg.row_bytes, dtype=torch.uint8, device=device),
        expert_base=0, num_local_experts=4, max_m=128, impl="triton",
    )  # fmt: skip
    assert got.masked_m.tolist() == [0, 0, 0, 0] and got.slot_map.shape == (0, 2)
    assert got.scales.shape == (4, 128, 4) and not bool(got.scales.view(torch.uint8).any())


@pytest.mark.parametrize(
    "wire,H", [("bf16", 64), ("bf16", 80), ("nvfp4", 80), ("fp8", 256), ("nvfp4", 2080), ("fp8", 1152)], ids=str
)
def test_combine_matches_reference(wire, H, device):
    """Both combine halves vs the reference, for every combine wire: the expert side's rows
    (BF16 partial, then per-row fp8 / nvfp4 quantization) byte for byte, stored at a row
    shift per source as a peer-memory backend passes it; the source side's FP32 sum (H=2080
    / 1152: quantized rows read by several column programs, the last one partial)."""
    from fp4comm.ep.message import CombineLayout

    R, El, max_m, K = 3, 4, 128, 4
    CRB = CombineLayout(wire, H).row_bytes
    g = torch.Generator().manual_seed(5)
    recv_counts = [7, 0, 12]
    N = sum(recv_counts)
    slot_map = torch.randint(-1, El * max_m, (N, K), generator=g, dtype=torch.int32)
    slot_map[2] = -1  # a row none of whose pairs is local
    sw = torch.randn(El * max_m, generator=g)
    eo = (torch.randn(El, max_m, H, generator=g) * 10).bfloat16()
    base = [2, 0, 5]
    starts = [0, 7, 7]
    dests = [torch.full((c + b + 1, CRB), 0xAB, dtype=torch.uint8, device=device) for c, b in zip(recv_counts, base)]
    shift = torch.tensor([b - a for a, b in zip(starts, base)], dtype=torch.int64, device=device)
    recv_end = torch.tensor([7, 7, 19], dtype=torch.int64, device=device)
    t = RowTargets([d[b : b + c] for d, b, c in zip(dests, base, recv_counts)], pointer_table(dests, device), shift)
    combine_expert(eo.to(device), slot_map.to(device), sw.to(device), t, recv_end, wire=wire, impl="triton")
    want = ref.encode_combine_rows_ref(ref.combine_expert_ref(eo, slot_map, sw), wire)
    got = torch.cat([d[b : b + c].cpu() for d, b, c in zip(dests, base, recv_counts)])
    if wire == "bf16":
        assert torch.equal(got, want)
    else:  # padding bytes between sections are not part of the contract
        gd, wd = ref.decode_combine_rows_ref(got, H, wire), ref.decode_combine_rows_ref(want, H, wire)
        assert torch.equal(gd.view(torch.int32), wd.view(torch.int32))
        lay = CombineLayout(wire, H)
        assert torch.equal(got[:, : lay.payload_bytes], want[:, : lay.payload_bytes])
        assert torch.equal(got[:, lay.scale_offset : lay.scale_offset + lay.scale_bytes],
                           want[:, lay.scale_offset : lay.scale_offset + lay.scale_bytes])  # fmt: skip
    for d, b, c in zip(dests, base, recv_counts):  # rows outside each block untouched
        assert bool((d[:b] == 0xAB).all()) and bool((d[b + c :] == 0xAB).all())

    # source side: T tokens, rows back from R ranks, a token sent nowhere -> zeros
    T = 11
    rank_offset = torch.full((T, R), -1, dtype=torch.int32)
    sent = torch.rand(T, R, generator=g) < 0.6
    sent[4] = False
    for r in range(R):
        rank_offset[sent[:, r], r] = torch.arange(int(sent[:, r].sum()), dtype=torch.int32)
    parts = [ref.encode_combine_rows_ref((torch.randn(int(sent[:, r].sum()), H, generator=g) * 3).bfloat16(), wire)
             for r in range(R)]  # fmt: skip
    y = combine_source([p.to(device) for p in parts], rank_offset.to(device), H, wire=wire, impl="triton")
    want = ref.combine_source_ref(parts, rank_offset, H, wire)
    assert torch.equal(y.cpu().view(torch.int16), want.view(torch.int16))
    assert not bool(y[4].float().any())
