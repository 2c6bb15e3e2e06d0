"""get_dispatch_layout: counts, is_token_in_rank and per-destination row offsets against a
plain Python loop; bad input names the argument."""

import pytest
import torch

from fp4comm.ep import get_dispatch_layout
from fp4comm.reference.ep import token_rank_offsets_ref


def _loop_layout(ids, E, R):
    T, K = ids.shape
    el = E // R
    per_rank, per_expert = [0] * R, [0] * E
    in_rank = [[False] * R for _ in range(T)]
    offset = [[-1] * R for _ in range(T)]
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if e >= 0:
                per_expert[e] += 1
                in_rank[t][e // el] = True
        for r in range(R):
            if in_rank[t][r]:
                offset[t][r] = per_rank[r]
                per_rank[r] += 1
    return per_rank, per_expert, in_rank, offset


def _ids(case, T, K, E, g):
    if case == "random":
        return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    if case == "some_minus1":
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
        ids[torch.rand(T, K, generator=g) < 0.4] = -1
        return ids
    if case == "all_minus1":
        return torch.full((T, K), -1, dtype=torch.int32)
    if case == "one_expert":
        ids = torch.full((T, K), -1, dtype=torch.int64)
        ids[:, 0] = E - 1
        return ids
    if case == "duplicates":
        return torch.randint(0, 3, (T, K), generator=g, dtype=torch.int32)
    if case == "empty":
        return torch.zeros(0, K, dtype=torch.int32)
    raise ValueError(case)


CASES = ["random", "some_minus1", "all_minus1", "one_expert", "duplicates", "empty"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T,K,E,R", [(37, 4, 16, 4), (9, 2, 8, 2), (23, 8, 256, 8)], ids=["t37k4e16r4", "t9k2e8r2", "ds-v3-r8"])
def test_layout_matches_loop(case, T, K, E, R):
    g = torch.Generator().manual_seed(T * 1000 + K)
    ids = _ids(case, T, K, E, g)
    lay = get_dispatch_layout(ids, E, R)
    per_rank, per_expert, in_rank, offset = _loop_layout(ids, E, R)
    assert lay.num_tokens_per_rank.dtype == torch.int32 and lay.num_tokens_per_expert.dtype == torch.int32
    assert lay.num_tokens_per_rank.tolist() == per_rank
    assert lay.num_tokens_per_expert.tolist() == per_expert
    assert lay.is_token_in_rank.tolist() == (in_rank or [])
    assert lay.rank_offset.tolist() == (offset or [])
    assert lay.rank_offset.shape == (ids.shape[0], R)
    assert torch.equal(lay.rank_offset, token_rank_offsets_ref(ids, E, R))  # reference twin agrees
    # a token goes to each rank once, not once per expert
    assert int(lay.num_tokens_per_rank.sum()) == int(lay.is_token_in_rank.sum())


@pytest.mark.parametrize(
    "ids,E,R,match",
    [
        (torch.tensor([[0, 8]]), 8, 2, "topk_ids: values must lie in"),
        (torch.tensor([[0, -2]]), 8, 2, "topk_ids: values must lie in"),
        (torch.tensor([[0.0, 1.0]]), 8, 2, "topk_ids: dtype"),
        (torch.tensor([0, 1]), 8, 2, "topk_ids: expected 2 dims"),
        (torch.tensor([[0, 1]]), 6, 4, "num_experts: must be a multiple"),
        (torch.tensor([[0, 1]]), 8, 0, "num_ranks"),
    ],
    ids=["id_eq_E", "id_minus2", "float_ids", "1d", "E_not_multiple", "zero_ranks"],
)
def test_layout_bad_input(ids, E, R, match):
    with pytest.raises((TypeError, ValueError), match=match):
        get_dispatch_layout(ids, E, R)


def test_layout_deterministic():
    g = torch.Generator().manual_seed(0)
    ids = _ids("some_minus1", 40, 4, 16, g)
    a, b = get_dispatch_layout(ids, 16, 4), get_dispatch_layout(ids.clone(), 16, 4)
    for f in ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank", "rank_offset"):
        assert torch.equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "T,K,E,R", [(37, 4, 16, 4), (300, 8, 256, 8), (129, 3, 12, 3)], ids=["t37k4e16r4", "t300-ds-v3-r8", "t129k3r3"]
)
def test_parallel_layout_matches_serial(case, T, K, E, R):
    """``layout_meta(parallel=True)`` (chunks of 32 tokens: several programs, the last one
    scans) = the serial kernel bit for bit, an out-of-range id included; a reused scratch
    is left clean for the next call."""
    from fp4comm._runtime import next_pow2
    from fp4comm.ep.layout import layout_meta, layout_scratch

    g = torch.Generator().manual_seed(T + K)
    ids = _ids(case, T, K, E, g)
    if ids.shape[0] > 5:
        ids[5, 0] = E + 2  # range flag
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids = ids.to(dev)
    want_meta, want_off = layout_meta(ids, E, R)
    scratch = layout_scratch(T, E, R, dev)
    for _ in range(2):
        meta, off = layout_meta(ids, E, R, parallel=True, scratch=scratch)
        assert torch.equal(meta, want_meta) and torch.equal(off, want_off)
        assert not bool(scratch[: 2 + next_pow2(E)].any())
