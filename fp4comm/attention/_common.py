"""Validation and small helpers shared by the attention host modules."""

from __future__ import annotations

import torch

from .._checks import check_choice, check_tensor
from .._runtime import next_pow2  # noqa: F401  (re-exported: paged, kv_cache)
from ..reference.attention import KV_DTYPES, KV_FORMATS, MIN_SCALE

FLOAT_INPUTS = (torch.bfloat16, torch.float16, torch.float32)
FORMAT_CODE = {"bf16": 0, "fp8": 1, "int8": 2}


def check_format(kv_format: str) -> None:
    check_choice("kv_format", kv_format, KV_FORMATS)


def check_kv_cache(name: str, cache: object, kv_format: str, device: torch.device | None = None) -> torch.Tensor:
    """``[num_blocks, block_size, num_kv_heads, head_dim]`` in the dtype of ``kv_format``,
    last dim contiguous."""
    check_tensor(name, cache, dtype=KV_DTYPES[kv_format], ndim=4, device=device)
    if cache.stride(-1) != 1:
        raise ValueError(f"{name}: the last (head_dim) dim must be contiguous, got strides {tuple(cache.stride())}")
    if cache.shape[1] <= 0 or cache.shape[0] <= 0:
        raise ValueError(f"{name}: num_blocks and block_size must be > 0, got shape {list(cache.shape)}")
    return cache


def check_scale_cache(name: str, sc: object, k_cache: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, block_size, num_kv_heads]`` FP32 matching ``k_cache``."""
    if sc is None:
        raise ValueError(f"{name}: required for dynamic kv formats ([num_blocks, block_size, num_kv_heads] float32)")
    nb, bs, h, _ = k_cache.shape
    return check_tensor(name, sc, dtype=torch.float32, shape=(nb, bs, h), device=k_cache.device)


def check_scale_caches(
    kv_format: str, dynamic: bool, k_scale_cache: object, v_scale_cache: object, k_cache: torch.Tensor
) -> None:
    """Dynamic formats need both scale caches (:func:`check_scale_cache`); static ones take none."""
    if dynamic:
        check_scale_cache("k_scale_cache", k_scale_cache, k_cache)
        check_scale_cache("v_scale_cache", v_scale_cache, k_cache)
        return
    for name, s in (("k_scale_cache", k_scale_cache), ("v_scale_cache", v_scale_cache)):
        if s is not None:
            raise ValueError(f"{name}: only used by dynamic kv formats, got kv_format={kv_format!r}")


def check_static_scale(
    name: str, scale: object, num_kv_heads: int, device: torch.device, *, check_values: bool = True
) -> torch.Tensor:
    """A decode-direction scale per tensor (0-dim or ``[1]``) or per KV head ``[Hkv]``,
    float32, finite and >= ``2^-126`` (the smallest normal FP32: quantization multiplies by
    ``1 / scale``, which must be finite). Returns a 1-dim FP32 tensor (``[1]`` or ``[Hkv]``)."""
    if scale is None:
        raise ValueError(f"{name}: required for static fp8/int8 kv formats (decode-direction scale, x ~= q * scale)")
    check_tensor(name, scale, dtype=torch.float32, device=device)
    if not (scale.dim() == 0 or (scale.dim() == 1 and scale.shape[0] in (1, num_kv_heads))):
        raise ValueError(f"{name}: expected a 0-dim, [1] or [num_kv_heads={num_kv_heads}] tensor, got {list(scale.shape)}")
    if check_values and not bool(((scale >= MIN_SCALE) & scale.isfinite()).all()):
        raise ValueError(f"{name}: scales must be finite and >= 2^-126 (1.18e-38), got min {float(scale.min()):.3g}")
    return scale.reshape(-1)


def check_slot_mapping(
    slot_mapping: object, num_tokens: int, num_slots: int, device: torch.device, *, check_range: bool = True
) -> torch.Tensor:
    check_tensor("slot_mapping", slot_mapping, dtype=(torch.int32, torch.int64), shape=(num_tokens,), device=device)
    if check_range and num_tokens and int(slot_mapping.max()) >= num_slots:
        raise ValueError(
            f"slot_mapping: entries must be < num_blocks * block_size = {num_slots} (negative = skip), "
            f"got max {int(slot_mapping.max())}"
        )
    return slot_mapping


_ONES: dict[tuple[str, int | None], torch.Tensor] = {}


def dummy(device: torch.device) -> torch.Tensor:
    """A 1-element FP32 ``1.0``: the value of an absent descale, and the placeholder for
    pointer arguments a kernel variant never reads. Kept per device (never written), so hot
    paths launch no fill kernel for it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    t = _ONES.get(key)
    if t is None:
        t = _ONES[key] = torch.ones(1, dtype=torch.float32, device=device)
    return t


