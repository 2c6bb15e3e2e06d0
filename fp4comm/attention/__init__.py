"""Quantized KV cache and paged attention over the fp4comm formats (DESIGN.md section 6).

Public API:
  * :func:`write_kv_cache`, :class:`KVCache`, :func:`calibrate_kv_scales`: paged K/V cache
    writes in ``bf16``, ``fp8``, ``int8`` (static scales) and ``fp8_dynamic`` /
    ``int8_dynamic`` (per-(token, head) scales in scale caches);
  * :func:`paged_attention`: varlen prefill, decode and chunked prefill over those caches,
    GQA/MQA, FP8 queries, descales per tensor / head / (sequence, head), sliding window,
    split-KV for long-context decode;
  * :func:`write_mla_cache`, :func:`mla_decode`, :func:`allocate_mla_cache`: the MLA latent
    cache (512 FP8 values with 4 FP32 scales + 64 BF16 rope values a slot) and decode over it.

All scales are decode direction (``x ~= q * scale``). Each op takes ``impl="auto" |
"triton" | "reference"``; the plain-torch twins live in :mod:`fp4comm.reference.attention`.
"""

from ..reference.attention import KV_DTYPES, KV_FORMATS, MLA_BF16_SLOT, MLA_FP8_SLOT_BYTES
from .kv_cache import KVCache, calibrate_kv_scales, write_kv_cache, write_tiles
from .mla import MLA_FORMATS, allocate_mla_cache, mla_decode, mla_tiles, write_mla_cache
from .paged import AttentionTiles, attention_tiles, paged_attention, select_num_kv_splits

__all__ = [
    "KV_FORMATS",
    "KV_DTYPES",
    "MLA_FP8_SLOT_BYTES",
    "MLA_BF16_SLOT",
    "KVCache",
    "calibrate_kv_scales",
    "write_kv_cache",
    "write_tiles",
    "AttentionTiles",
    "attention_tiles",
    "paged_attention",
    "select_num_kv_splits",
    "MLA_FORMATS",
    "allocate_mla_cache",
    "write_mla_cache",
    "mla_decode",
    "mla_tiles",
]
