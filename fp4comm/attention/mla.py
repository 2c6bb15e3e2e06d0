"""MLA (multi-head latent attention) cache: an FP8 latent with real scales, and decode over it.

Cache ``[num_blocks, block_size, slot]``, one slot a token:

========  =======================================================  =======================
format    slot layout                                              dtype / slot size
========  =======================================================  =======================
``fp8``   bytes 0..511: 512 E4M3 latent values;                    ``uint8``, 656 bytes
          bytes 512..527: 4 FP32 decode scales (one per 128        (16-byte multiple, so
          latent values, ``amax / 448``, zero-safe: 1);            slots stay aligned)
          bytes 528..655: 64 BF16 RoPE values
``bf16``  512 BF16 latent values then 64 BF16 RoPE values          ``bfloat16``, 576
========  =======================================================  =======================

Unlike a bare clamp of the latent to +-448 (what FP8 MLA caches without a scale do), the
per-128 scale keeps the full E4M3 precision at any magnitude. Decode reads the latent as
both key (with the rope part) and value, and returns the attention output in latent space.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_choice, check_positive_int, check_same_device, check_tensor
from .._runtime import cdiv, triton_interpreting, use_triton
from ..reference import attention as ref
from ._common import check_slot_mapping, dummy
from .paged import _num_sms, check_block_table, combine_splits, select_num_kv_splits

MLA_FORMATS = ("fp8", "bf16")


def allocate_mla_cache(
    num_blocks: int, block_size: int, kv_format: str = "fp8", *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Zero-filled MLA cache: ``[num_blocks, block_size, 656]`` ``uint8`` (fp8) or
    ``[num_blocks, block_size, 576]`` ``bfloat16`` (bf16)."""
    check_choice("kv_format", kv_format, MLA_FORMATS)
    check_positive_int("num_blocks", num_blocks)
    check_positive_int("block_size", block_size)
    dtype = torch.uint8 if kv_format == "fp8" else torch.bfloat16
    return torch.zeros(num_blocks, block_size, ref.mla_slot_size(kv_format), dtype=dtype, device=device)


def _check_mla_cache(cache: object, kv_format: str, device: torch.device) -> torch.Tensor:
    check_choice("kv_format", kv_format, MLA_FORMATS)
    dtype = torch.uint8 if kv_format == "fp8" else torch.bfloat16
    check_tensor("cache", cache, dtype=dtype, shape=(None, None, ref.mla_slot_size(kv_format)), device=device)
    if cache.stride(-1) != 1 or cache.stride(1) != cache.shape[2] or cache.stride(0) % cache.shape[2]:
        raise ValueError("cache: slots must be contiguous rows (allocate with allocate_mla_cache)")
    if kv_format == "fp8" and cache.data_ptr() % 16:
        raise ValueError("cache: must be 16-byte aligned")
    return cache


def _typed_views(cache: torch.Tensor, kv_format: str):
    """The cache storage as (fp8, fp32, bf16) tensors for the kernels (one storage, three
    element types; the kernels index each with its own element strides)."""
    if kv_format == "fp8":
        return cache.view(torch.float8_e4m3fn), cache.view(torch.float32), cache.view(torch.bfloat16)
    return cache, dummy(cache.device).view(1, 1, 1), cache


def write_mla_cache(
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_format: str = "fp8",
    *,
    check_indices: bool = True,
    impl: str = "auto",
) -> None:
    """Store each token's latent and rope part into its cache slot, in place.

    Args:
        kv_latent: ``[T, 512]`` ``bfloat16``/``float16``/``float32``, last dim contiguous.
        k_rope: ``[T, 64]`` same dtypes (stored as BF16).
        cache: from :func:`allocate_mla_cache` with the same ``kv_format``.
        slot_mapping: ``[T]`` ``int32``/``int64``, ``< num_blocks * block_size``; negative = skip.
        kv_format: ``"fp8"`` (E4M3 latent, one FP32 decode scale ``amax / 448`` per 128 values,
            saturating) or ``"bf16"``.
        check_indices: check ``slot_mapping`` against the cache size (a device sync).
    """
    floats = (torch.bfloat16, torch.float16, torch.float32)
    check_tensor("kv_latent", kv_latent, dtype=floats, ndim=2)
    dev = kv_latent.device
    T = kv_latent.shape[0]
    check_tensor("kv_latent", kv_latent, shape=(T, ref.MLA_LATENT))
    check_tensor("k_rope", k_rope, dtype=floats, shape=(T, ref.MLA_ROPE), device=dev)
    for name, x in (("kv_latent", kv_latent), ("k_rope", k_rope)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim must be contiguous")
    _check_mla_cache(cache, kv_format, dev)
    check_slot_mapping(slot_mapping, T, cache.shape[0] * cache.shape[1], dev, check_range=check_indices)
    check_same_device(kv_latent=kv_latent, k_rope=k_rope, cache=cache, slot_mapping=slot_mapping)
    if T == 0:
        return
    if not use_triton(dev, impl):
        ref.write_mla_cache(kv_latent, k_rope, cache, slot_mapping, kv_format)
        return
    from fp4comm.kernels import kv_cache as _k

    c8, c32, c16 = _typed_views(cache, kv_format)
    fp8 = kv_format == "fp8"
    _k.write_mla_cache_kernel[(T,)](
        kv_latent, k_rope, slot_mapping, c8, c32, c16, cache.shape[1],
        kv_latent.stride(0), k_rope.stride(0),
        c8.stride(0), c8.stride(1), c32.stride(0), c32.stride(1), c16.stride(0), c16.stride(1),
        IS_FP8=fp8, LATENT=ref.MLA_LATENT, ROPE=ref.MLA_ROPE, GROUP=ref.MLA_GROUP,
        SCALE_OFF32=ref.MLA_FP8_SCALE_OFFSET // 4 if fp8 else 0,
        ROPE_OFF16=ref.MLA_FP8_ROPE_OFFSET // 2 if fp8 else ref.MLA_LATENT,
        INTERPRET=triton_interpreting() and dev.type == "cpu", num_warps=4,
    )


def mla_tiles(num_heads: int) -> tuple[int, int, int]:
    """``(BLOCK_H, BLOCK_N, num_warps)`` of MLA decode.

    All heads share one latent "KV head", so a program takes 16 heads (the smallest M of
    ``tl.dot``) and every latent tile it reads serves all of them; more heads -> more
    programs over the same keys (L2 hits). 32 keys a step: the 4 latent chunks (fp8, 16 KB)
    plus 4 FP32 accumulators of 16 x 128 stay in registers with 8 warps.
    """
    return 16, 32, 8


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_format: str = "fp8",
    *,
    num_kv_splits: int | None = None,
    check_indices: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """MLA decode: one query per sequence (its last position) over the latent cache.

    Args:
        q_latent: ``[num_seqs, num_heads, 512]`` ``bfloat16`` (queries absorbed into latent space).
        q_rope: ``[num_seqs, num_heads, 64]`` ``bfloat16``.
        cache: written by :func:`write_mla_cache` in ``kv_format``.
        block_table: ``[num_seqs, max_blocks]`` ``int32``.
        seq_lens: ``[num_seqs]`` ``int32`` (0 = empty sequence -> zeros).
        softmax_scale: scales ``q_latent . latent + q_rope . rope``.
        num_kv_splits: force the split-KV factor (power of two); ``None`` = heuristic.
        check_indices: validate ``seq_lens`` and the used ``block_table`` entries (syncs).

    Returns:
        ``[num_seqs, num_heads, 512]`` ``bfloat16``: ``softmax(scores) @ latent`` (dequantized).
    """
    check_tensor("q_latent", q_latent, dtype=torch.bfloat16, ndim=3)
    dev = q_latent.device
    S, H, _ = q_latent.shape
    check_tensor("q_latent", q_latent, shape=(S, H, ref.MLA_LATENT))
    check_tensor("q_rope", q_rope, dtype=torch.bfloat16, shape=(S, H, ref.MLA_ROPE), device=dev)
    for name, x in (("q_latent", q_latent), ("q_rope", q_rope)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim must be contiguous")
    _check_mla_cache(cache, kv_format, dev)
    nb, bs, _ = cache.shape
    check_tensor("block_table", block_table, dtype=torch.int32, shape=(S, None), device=dev)
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, shape=(S,), device=dev)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not (
        math.isfinite(softmax_scale) and softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale: must be a finite number > 0, got {softmax_scale!r}")
    if num_kv_splits is not None:
        check_positive_int("num_kv_splits", num_kv_splits)
        if num_kv_splits & (num_kv_splits - 1):
            raise ValueError(f"num_kv_splits: must be a power of two, got {num_kv_splits}")
    check_same_device(q_latent=q_latent, q_rope=q_rope, cache=cache, block_table=block_table, seq_lens=seq_lens)
    if check_indices and S:
        if int(seq_lens.min()) < 0 or int(seq_lens.max()) > block_table.shape[1] * bs:
            raise ValueError(f"seq_lens: entries must be in [0, max_blocks * block_size = {block_table.shape[1] * bs}]")
        check_block_table(block_table, seq_lens, nb, bs)
    out = torch.empty(S, H, ref.MLA_LATENT, dtype=torch.bfloat16, device=dev)
    if S == 0 or H == 0:
        return out
    if not use_triton(dev, impl):
        return out.copy_(ref.mla_decode(q_latent, q_rope, cache, block_table, seq_lens, float(softmax_scale),
                                        kv_format))

    from fp4comm.kernels import attention as _k

    BLOCK_H, BLOCK_N, num_warps = mla_tiles(H)
    head_blocks = cdiv(H, BLOCK_H)
    if num_kv_splits is None:
        num_kv_splits = select_num_kv_splits(S * head_blocks, block_table.shape[1] * bs, _num_sms(dev))
    if num_kv_splits > 1:
        ws_o = torch.empty(num_kv_splits, S, H, ref.MLA_LATENT, dtype=torch.float32, device=dev)
        ws_lse = torch.empty(num_kv_splits, S, H, dtype=torch.float32, device=dev)
    else:
        ws_o, ws_lse = dummy(dev).view(1, 1, 1, 1), dummy(dev).view(1, 1, 1)
    c8, c32, c16 = _typed_views(cache, kv_format)
    fp8 = kv_format == "fp8"
    exact = triton_interpreting() and dev.type == "cpu"
    _k.mla_decode_kernel[(S, head_blocks, num_kv_splits)](
        q_latent, q_rope, c8, c32, c16, out, ws_o, ws_lse,
        block_table, seq_lens, float(softmax_scale) * math.log2(math.e), H, bs,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        c8.stride(0), c8.stride(1), c32.stride(0), c32.stride(1), c16.stride(0), c16.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1),
        ws_o.stride(0), ws_o.stride(1), ws_o.stride(2), ws_lse.stride(0), ws_lse.stride(1),
        IS_FP8=fp8, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, NUM_SPLITS=num_kv_splits,
        GROUP=ref.MLA_GROUP, ROPE=ref.MLA_ROPE,
        SCALE_OFF32=ref.MLA_FP8_SCALE_OFFSET // 4 if fp8 else 0,
        ROPE_OFF16=ref.MLA_FP8_ROPE_OFFSET // 2 if fp8 else ref.MLA_LATENT,
        INTERPRET=exact, num_warps=num_warps,
    )
    if num_kv_splits > 1:
        combine_splits(ws_o, ws_lse, out, exact)
    return out
