"""Paged KV-cache writes, the :class:`KVCache` allocator and static-scale calibration.

Cache layout (DESIGN.md section 6): ``k_cache``/``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` goes to slot
``slot_mapping[t]`` = block ``slot // block_size``, row ``slot % block_size`` (negative =
skip). Element dtypes: ``bf16`` -> ``torch.bfloat16``; ``fp8``/``fp8_dynamic`` ->
``torch.float8_e4m3fn``; ``int8``/``int8_dynamic`` -> ``torch.int8``.

All scales are **decode direction**: ``x ~= q * scale``. Static formats take one scale per
tensor or per KV head; dynamic formats compute one per (token, KV head) and store it in
scale caches ``[num_blocks, block_size, num_kv_heads]`` FP32. The exact rounding recipe
(saturating, never wrapping; symmetric int8 in [-127, 127]; zero-safe dynamic scales) is in
:mod:`fp4comm.reference.attention`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_same_device, check_tensor
from .._runtime import cdiv, triton_interpreting, use_triton
from ..reference import attention as ref
from ._common import (
    FLOAT_INPUTS,
    FORMAT_CODE,
    check_format,
    check_kv_cache,
    check_scale_caches,
    check_slot_mapping,
    check_static_scale,
    dummy,
    next_pow2,
)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    kv_format: str,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
    check_indices: bool = True,
    impl: str = "auto",
) -> None:
    """Quantize ``k``/``v`` and store them into the paged caches, in place.

    Args:
        k, v: ``[T, num_kv_heads, head_dim]`` ``bfloat16``/``float16``/``float32``; the last dim
            contiguous (token and head strides are free, e.g. slices of a fused QKV output).
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the dtype of
            ``kv_format``; last dim contiguous.
        slot_mapping: ``[T]`` ``int32``/``int64``; slot of each token, ``< num_blocks *
            block_size``; negative entries are skipped (padding). Slots must be unique.
        kv_format: ``"bf16" | "fp8" | "int8" | "fp8_dynamic" | "int8_dynamic"``.
        k_scale, v_scale: static formats only: decode-direction FP32 scales, 0-dim / ``[1]``
            (per tensor) or ``[num_kv_heads]`` (per head); finite, >= 2^-126. Typically from
            :func:`calibrate_kv_scales`.
        k_scale_cache, v_scale_cache: dynamic formats only: ``[num_blocks, block_size,
            num_kv_heads]`` FP32, receive ``amax / QMAX`` of each (token, head); an all-zero
            head stores 1.
        check_indices: check ``slot_mapping`` against the cache size and the static scales
            for finite values >= 2^-126 (device syncs); pass ``False`` on hot paths / CUDA graphs.
        impl: ``"auto" | "triton" | "reference"``.

    Quantized values saturate (fp8 to +-448, int8 to +-127), they never wrap or become Inf.
    """
    check_format(kv_format)
    check_tensor("k", k, dtype=FLOAT_INPUTS, ndim=3)
    dev = k.device
    check_kv_cache("k_cache", k_cache, kv_format, dev)
    nb, bs, H, D = k_cache.shape
    T = k.shape[0]
    check_tensor("k", k, shape=(T, H, D))
    check_tensor("v", v, dtype=FLOAT_INPUTS, shape=(T, H, D), device=dev)
    check_kv_cache("v_cache", v_cache, kv_format, dev)
    check_tensor("v_cache", v_cache, shape=(nb, bs, H, D))
    for name, x in (("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head_dim) dim must be contiguous")
    check_slot_mapping(slot_mapping, T, nb * bs, dev, check_range=check_indices)
    dynamic = ref.is_dynamic(kv_format)
    if dynamic or kv_format == "bf16":
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is not None:
                raise ValueError(f"{name}: must be None for kv_format={kv_format!r} (no static scale)")
    else:
        k_scale = check_static_scale("k_scale", k_scale, H, dev, check_values=check_indices)
        v_scale = check_static_scale("v_scale", v_scale, H, dev, check_values=check_indices)
    check_scale_caches(kv_format, dynamic, k_scale_cache, v_scale_cache, k_cache)
    check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)

    if T == 0:
        return
    if not use_triton(dev, impl):
        ref.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, kv_format, k_scale, v_scale,
                           k_scale_cache, v_scale_cache)
        return

    from fp4comm.kernels import kv_cache as _k

    BLOCK_H, BLOCK_D, num_warps = write_tiles(H, D)
    ks = k_scale if k_scale is not None else dummy(dev)
    vs = v_scale if v_scale is not None else dummy(dev)
    ksc = k_scale_cache if k_scale_cache is not None else dummy(dev).view(1, 1, 1)
    vsc = v_scale_cache if v_scale_cache is not None else dummy(dev).view(1, 1, 1)
    grid = (T, cdiv(H, BLOCK_H))
    _k.write_kv_cache_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        ks, vs, ksc, vsc,
        H, D, bs,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        0 if ks.numel() == 1 else 1, 0 if vs.numel() == 1 else 1,
        ksc.stride(0), ksc.stride(1), ksc.stride(2),
        vsc.stride(0), vsc.stride(1), vsc.stride(2),
        FMT=FORMAT_CODE[ref.base_format(kv_format)], DYNAMIC=dynamic,
        BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, INTERPRET=triton_interpreting() and dev.type == "cpu",
        num_warps=num_warps,
    )


def write_tiles(num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_H, BLOCK_D, num_warps)`` of the cache-write kernel.

    The write streams: one program per token moves all its heads (up to 4096
    elements: 8 KB of BF16 in, 4 KB of FP8 out for K and again for V) so each program issues
    large, contiguous 16-byte accesses and the grid (one program per token) is big enough at
    prefill sizes; more heads than that are split over a second grid dim. Per-(token, head)
    dynamic scales reduce along ``BLOCK_D`` inside the tile.

    H200, 8 KV heads of 128, 16-token pages, L2 flushed by a read (% of the 4.8 TB/s peak),
    32k / 128k tokens, one warp a program (32 values a thread): bf16 68.6 / 267 us (82 /
    84%), fp8 49.8 / 192 (84 / 88%), int8 50.1 / 192 (84 / 88%), fp8_dynamic 50.9 / 195 (83 /
    87%), int8_dynamic 51.9 / 197 (82 / 86%). At 2 warps (the rule before, 16 values a thread)
    the same except the dynamic formats: 56.2-58.2 / 215-220 us (73-79%), whose per-head amax
    reduction across threads and two divisions a head were then shared by fewer values;
    4 warps 5-40% slower, 8 warps 1.3-2.1x.
    The 1-byte formats were instruction-bound, not bandwidth-bound: with an IEEE division a
    value (``div.rn``: a range check and a branch around a slow path each; 1104 sm_90
    instructions for fp8 vs 544 for the bf16 copy) fp8 took 68.5 / 252.9 us (61 / 66%), int8
    70.1 / 260.4, the dynamic ones 79.8 / 296.8. Multiplying by the per-head reciprocal (616)
    gave fp8 49.7 / 191, int8 50.5 / 192, dynamic 61.6 / 229; then the satfinite cast alone for
    fp8 (464), one ``cvt.rni.sat.s8.f32`` for int8 (536) and the amax without a per-value
    finite filter (unless the tile holds an Inf) gave the figures above.
    Variants timed against it and dropped (none faster): loads of slot, K and V issued
    together; K and V in separate programs (1 or 2 warps); 2 tokens a program at 4 warps (fp8
    71.4 us, a tie); a persistent grid of 4 or 8 programs an SM (1.2-1.8x slower); the same
    as a software-pipelined loop (K/V loads 2-4 tokens ahead through shared memory, 4-16
    programs an SM: 4-60% slower, session 6); raw BF16 copies; streaming cache hints (commit
    f0095e5 has them); the division kept exact with a per-row reciprocal and two FMAs
    (Markstein's correction; fp8 73 us, int8 68: no gain).
    """
    BLOCK_D = next_pow2(head_dim)
    BLOCK_H = max(1, min(next_pow2(num_kv_heads), 4096 // BLOCK_D))
    num_warps = max(1, min(4, BLOCK_H * BLOCK_D // 1024))  # 32 values a thread (8 x 128: one warp)
    return BLOCK_H, BLOCK_D, num_warps


@dataclass
class KVCache:
    """A paged K/V cache of one attention layer with its format and scales.

    Attributes:
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the dtype of
            ``kv_format``.
        kv_format: one of :data:`KV_FORMATS`.
        k_scale, v_scale: static fp8/int8: decode-direction FP32 scales (0-dim or
            ``[num_kv_heads]``), else ``None``.
        k_scale_cache, v_scale_cache: dynamic formats: ``[num_blocks, block_size,
            num_kv_heads]`` FP32 (initialised to 1), else ``None``.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    kv_format: str
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_scale_cache: torch.Tensor | None = None
    v_scale_cache: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        kv_format: str = "bf16",
        *,
        device: torch.device | str = "cpu",
        k_scale: torch.Tensor | float | None = None,
        v_scale: torch.Tensor | float | None = None,
    ) -> KVCache:
        """Zero-filled caches. Static fp8/int8 formats need ``k_scale``/``v_scale`` (a float,
        a 0-dim or ``[num_kv_heads]`` tensor; decode direction)."""
        check_format(kv_format)
        for name, n in (("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            check_positive_int(name, n)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        dtype = ref.KV_DTYPES[kv_format]
        cache = cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                    kv_format)
        if ref.is_dynamic(kv_format):
            cache.k_scale_cache = torch.ones(shape[:3], dtype=torch.float32, device=device)
            cache.v_scale_cache = torch.ones(shape[:3], dtype=torch.float32, device=device)
        elif kv_format != "bf16":
            dev = torch.device(device)
            ks = torch.as_tensor(k_scale, dtype=torch.float32, device=dev) if k_scale is not None else None
            vs = torch.as_tensor(v_scale, dtype=torch.float32, device=dev) if v_scale is not None else None
            check_static_scale("k_scale", ks, num_kv_heads, dev)
            check_static_scale("v_scale", vs, num_kv_heads, dev)
            cache.k_scale, cache.v_scale = ks, vs
        elif k_scale is not None or v_scale is not None:
            raise ValueError("k_scale: must be None for kv_format='bf16'")
        return cache

    @property
    def num_blocks(self) -> int:
        return self.k_cache.shape[0]

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_cache.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    def nbytes(self) -> int:
        """Bytes of both caches plus their scale caches."""
        ts = (self.k_cache, self.v_cache, self.k_scale_cache, self.v_scale_cache)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, *, check_indices: bool = True,
              impl: str = "auto") -> None:
        """:func:`write_kv_cache` into this cache."""
        write_kv_cache(k, v, self.k_cache, self.v_cache, slot_mapping, kv_format=self.kv_format,
                       k_scale=self.k_scale, v_scale=self.v_scale, k_scale_cache=self.k_scale_cache,
                       v_scale_cache=self.v_scale_cache, check_indices=check_indices, impl=impl)

    def attend(self, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               cu_seqlens_q: torch.Tensor, *, softmax_scale: float, **kwargs) -> torch.Tensor:
        """:func:`fp4comm.attention.paged_attention` over this cache; static scales are used
        as ``k_descale``/``v_descale``. Extra keyword arguments are passed through."""
        from .paged import paged_attention

        return paged_attention(q, self.k_cache, self.v_cache, block_table, seq_lens, cu_seqlens_q,
                               kv_format=self.kv_format, softmax_scale=softmax_scale,
                               k_descale=kwargs.pop("k_descale", self.k_scale),
                               v_descale=kwargs.pop("v_descale", self.v_scale),
                               k_scale_cache=self.k_scale_cache, v_scale_cache=self.v_scale_cache, **kwargs)


def calibrate_kv_scales(
    k: torch.Tensor | Iterable[torch.Tensor],
    v: torch.Tensor | Iterable[torch.Tensor],
    kv_format: str,
    *,
    per_head: bool = True,
    margin: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static decode-direction scales from calibration activations (amax-based).

    Args:
        k, v: ``[T, num_kv_heads, head_dim]`` float tensors, or iterables of them (batches).
        kv_format: ``"fp8"`` or ``"int8"``.
        per_head: ``[num_kv_heads]`` scales (default) or one 0-dim scale per tensor.
        margin: ``>= 1``; the amax is multiplied by it, headroom for values beyond those seen.

    Returns:
        ``(k_scale, v_scale)`` FP32: ``scale = margin * amax / QMAX`` (QMAX 448 for fp8, 127
        for int8) over the finite ``|x|``; a head never seen non-zero (or whose scale would be
        below ``2^-126``) gets 1.
    """
    if kv_format not in ("fp8", "int8"):
        raise ValueError(f"kv_format: must be one of ['fp8', 'int8'] (static formats), got {kv_format!r}")
    if not isinstance(margin, (int, float)) or not margin >= 1.0:
        raise ValueError(f"margin: must be a number >= 1, got {margin!r}")
    out = []
    for name, xs in (("k", k), ("v", v)):
        batches = [xs] if isinstance(xs, torch.Tensor) else list(xs)
        if not batches:
            raise ValueError(f"{name}: no calibration tensors given")
        amax = None
        for i, x in enumerate(batches):
            check_tensor(f"{name}[{i}]" if len(batches) > 1 else name, x, dtype=FLOAT_INPUTS, ndim=3)
            a = x.float().abs()
            a = torch.where(a.isfinite(), a, torch.zeros_like(a)).amax(dim=(0, 2))
            if amax is not None and a.shape != amax.shape:
                raise ValueError(f"{name}[{i}]: num_kv_heads {a.shape[0]} differs from earlier batches ({amax.shape[0]})")
            amax = a if amax is None else torch.maximum(amax, a.to(amax.device))
        if not per_head:
            amax = amax.amax()
        s = amax * float(margin) / ref.QMAX[kv_format]
        out.append(torch.where(s >= ref.MIN_SCALE, s, torch.ones_like(s)))
    return out[0], out[1]
