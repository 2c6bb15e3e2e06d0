"""Plain-torch reference of the KV-cache and attention ops: the executable spec.

No Triton, no pytest; only torch and :mod:`fp4comm.formats`. Inputs are assumed valid
(the host API in :mod:`fp4comm.attention` validates before calling either implementation).

Scales are **decode direction** everywhere: ``x ~= q * scale`` (``q`` the stored code).

Quantization recipe (what the Triton kernels reproduce bit for bit):
  * all arithmetic in FP32, IEEE round-to-nearest; a value is scaled by the reciprocal of
    its scale, ``v = x * inv`` with ``inv = 1 / scale`` (one IEEE division a head or row,
    as the FP8 block format and vLLM's FP8 quantization do; scales are >= ``2^-126`` so
    ``inv`` is finite). ``v`` differs from the quotient ``x / scale`` by at most one FP32
    rounding, so a code can differ from that of a true division only when ``x / scale``
    lies within about ``2^-24`` (relative) of a rounding boundary of the 8-bit grid;
  * ``fp8``: ``e4m3_rne_satfinite(v)``: clamp to +-448 *before* the cast (so
    overflow saturates and never becomes NaN), round to nearest even (subnormals included),
    a negative value that rounds to zero keeps its sign (byte 0x80); NaN stays NaN (0x7F);
  * ``int8``: ``round_half_even(clamp(v, -127, 127))``: **symmetric** range, -128 is
    never written (negation stays exact, the grid is symmetric around 0); NaN stores 0;
  * dynamic formats (``*_dynamic``): one scale per (token, KV head):
    ``scale = amax / QMAX`` where ``amax`` is the max of the *finite* ``|x|`` of that head
    (``QMAX`` = 448 for fp8, 127 for int8); a head whose scale is below the smallest
    normal FP32, ``2^-126`` (all zeros, or an ``amax`` under ``QMAX * 2^-126``, about
    5e-36 for fp8) stores scale 1 (and so zero codes), never 0, a subnormal or Inf.
    Non-finite elements then saturate like any value over the range.
  * ``bf16``: ``x.to(bfloat16)`` (round to nearest even).

Attention masking: the ``q_len`` queries of sequence ``i`` are the *last* ``q_len``
positions of a sequence of ``seq_lens[i]`` tokens: query ``j`` sits at position
``p = seq_lens[i] - q_len + j``. With ``causal`` it attends to keys ``k <= p``; with a
``sliding_window`` ``w`` also only to ``k > p - w`` (``w`` keys including itself). Without
``causal`` it attends to all ``seq_lens[i]`` keys (window still applied on the left).
A query with no key to attend (``p < 0``, e.g. padded decode rows with ``seq_lens == 0``)
returns zeros.
"""

from __future__ import annotations

import torch

from ..formats import E4M3_MAX, e4m3_rne_satfinite, ieee_div

#: Smallest scale a quantized cache uses: the smallest normal FP32, so ``1 / scale`` is finite.
MIN_SCALE = 2.0**-126

#: Largest code magnitude of each quantized cache element type.
INT8_MAX = 127.0
QMAX = {"fp8": E4M3_MAX, "int8": INT8_MAX}
#: Every cache format and its element dtype.
KV_FORMATS = ("bf16", "fp8", "int8", "fp8_dynamic", "int8_dynamic")
KV_DTYPES = {
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "int8": torch.int8,
    "fp8_dynamic": torch.float8_e4m3fn,
    "int8_dynamic": torch.int8,
}

# MLA latent cache (DeepSeek-V2/V3 shapes) -------------------------------------------------
MLA_LATENT = 512
MLA_ROPE = 64
MLA_GROUP = 128  # latent values per FP32 scale
MLA_NUM_SCALES = MLA_LATENT // MLA_GROUP
#: fp8 slot: [512 B E4M3 latent | 16 B = 4 FP32 scales | 128 B = 64 BF16 rope] = 656 B.
MLA_FP8_SCALE_OFFSET = MLA_LATENT  # byte offset of the scales
MLA_FP8_ROPE_OFFSET = MLA_LATENT + 4 * MLA_NUM_SCALES  # byte offset of the rope part (528)
MLA_FP8_SLOT_BYTES = MLA_FP8_ROPE_OFFSET + 2 * MLA_ROPE  # 656
#: bf16 slot: [512 BF16 latent | 64 BF16 rope] = 576 elements.
MLA_BF16_SLOT = MLA_LATENT + MLA_ROPE


def base_format(kv_format: str) -> str:
    """``"fp8_dynamic"`` -> ``"fp8"``, ``"int8_dynamic"`` -> ``"int8"``, others unchanged."""
    return kv_format.removesuffix("_dynamic")


def is_dynamic(kv_format: str) -> bool:
    return kv_format.endswith("_dynamic")


# ----------------------------------------------------------------------------- quantization
def quantize_values(x: torch.Tensor, scale: torch.Tensor | float, kv_format: str) -> torch.Tensor:
    """Quantize ``x`` (any float dtype) with decode-direction ``scale`` (broadcastable).

    Returns the cache dtype of ``kv_format`` (see the module docstring for the recipe).
    """
    fmt = base_format(kv_format)
    if fmt == "bf16":
        return x.to(torch.bfloat16)
    v = x.float() * ieee_div(1.0, torch.as_tensor(scale, dtype=torch.float32, device=x.device))
    if fmt == "fp8":
        return e4m3_rne_satfinite(v)
    v = torch.where(v.isnan(), torch.zeros_like(v), v).clamp(-INT8_MAX, INT8_MAX)
    return torch.round(v).to(torch.int8)  # torch.round: half to even


def dynamic_scale(x: torch.Tensor, kv_format: str, dim: int = -1) -> torch.Tensor:
    """Decode-direction scale over ``dim``: ``amax(finite |x|) / QMAX``; below ``2^-126``
    (zero or subnormal) -> 1 (zero-safe, and its reciprocal finite)."""
    a = x.float().abs()
    a = torch.where(a.isfinite(), a, torch.zeros_like(a))
    amax = a.amax(dim=dim)
    s = ieee_div(amax, QMAX[base_format(kv_format)])
    return torch.where(s < MIN_SCALE, torch.ones_like(s), s)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """``q.float() * scale`` (decode direction); ``scale=None`` means 1."""
    out = q.float()
    return out if scale is None else out * torch.as_tensor(scale, dtype=torch.float32, device=q.device)


# ----------------------------------------------------------------------------- cache writes
def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_format: str,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
) -> None:
    """Write ``k, v [T, Hkv, D]`` into the paged caches ``[num_blocks, block_size, Hkv, D]``.

    ``slot = slot_mapping[t]`` (negative = skip) addresses block ``slot // block_size``,
    row ``slot % block_size``. Static formats use ``k_scale``/``v_scale`` (0-dim, ``[1]``
    or ``[Hkv]`` FP32, decode direction); dynamic formats compute one scale per (token,
    head) and store it in ``k_scale_cache``/``v_scale_cache [num_blocks, block_size, Hkv]``.
    """
    block_size = k_cache.shape[1]
    sel = (slot_mapping >= 0).nonzero().flatten()
    slots = slot_mapping[sel].long()
    blk, off = slots // block_size, slots % block_size
    for x, cache, scale, scache in ((k, k_cache, k_scale, k_scale_cache), (v, v_cache, v_scale, v_scale_cache)):
        xs = x[sel]
        if is_dynamic(kv_format):
            s = dynamic_scale(xs, kv_format)  # [n, Hkv]
            cache[blk, off] = quantize_values(xs, s[..., None], kv_format)
            scache[blk, off] = s
        elif kv_format == "bf16":
            cache[blk, off] = xs.to(torch.bfloat16)
        else:
            s = scale.float().reshape(-1)
            s = s.view(1, -1, 1) if s.numel() > 1 else s.reshape(())
            cache[blk, off] = quantize_values(xs, s, kv_format)


def gather_kv(
    cache: torch.Tensor,
    block_table_row: torch.Tensor,
    seq_len: int,
    scale_cache: torch.Tensor | None = None,
    descale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantized ``[seq_len, Hkv, D]`` FP32 keys (or values) of one sequence.

    ``descale``: ``[Hkv]`` FP32 (already selected for this sequence) or ``None``.
    """
    block_size = cache.shape[1]
    pos = torch.arange(seq_len, device=cache.device)
    blk = block_table_row.long()[pos // block_size]
    off = pos % block_size
    x = cache[blk, off].float()  # [L, Hkv, D]
    if scale_cache is not None:
        x = x * scale_cache[blk, off].float()[..., None]
    if descale is not None:
        x = x * descale.float().view(1, -1, 1)
    return x


def descale_row(descale: torch.Tensor | None, seq: int, num_kv_heads: int, device) -> torch.Tensor:
    """``[Hkv]`` FP32 descale of sequence ``seq`` from a 0-dim / ``[1]`` / ``[Hkv]`` /
    ``[num_seqs, Hkv]`` tensor (``None`` = 1)."""
    if descale is None:
        return torch.ones(num_kv_heads, dtype=torch.float32, device=device)
    d = descale.float()
    if d.dim() == 2:
        return d[seq]
    if d.numel() == 1:
        return d.reshape(1).expand(num_kv_heads)
    return d


# ----------------------------------------------------------------------------- attention
def masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """FP32 attention of ``q [H, M, D]`` over ``k, v [H, N, Dv]`` with a ``[M, N]`` mask.

    Rows with no allowed key return zeros (not NaN); NaN in an allowed key or value gives a
    NaN row.
    """
    if k.shape[-2] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    s = torch.einsum("hmd,hnd->hmn", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(m.isinf(), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.einsum("hmn,hnd->hmd", p, v)
    # zeros only where no key is allowed (denominator 0); a NaN score or value (e.g. a NaN
    # code in the cache) makes its row NaN, never a silent zero
    return torch.where(denom == 0, torch.zeros_like(o), o / denom.clamp_min(torch.finfo(torch.float32).tiny))


def attention_mask(
    q_len: int, seq_len: int, causal: bool, sliding_window: int | None, device
) -> torch.Tensor:
    """``[q_len, seq_len]`` bool: may query ``j`` (position ``seq_len - q_len + j``) see key ``k``."""
    pos = seq_len - q_len + torch.arange(q_len, device=device)[:, None]
    key = torch.arange(seq_len, device=device)[None, :]
    allowed = (key <= pos) if causal else torch.ones(q_len, seq_len, dtype=torch.bool, device=device)
    if sliding_window is not None:
        allowed = allowed & (key > pos - sliding_window)
    return allowed


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_format: str,
    softmax_scale: float,
    causal: bool = True,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """FP32 reference of :func:`fp4comm.attention.paged_attention`; returns ``[T, Hq, D]`` FP32.

    True values: ``q * q_descale``, ``k_cache * k_descale * k_scale_cache`` (same for v);
    descales per tensor (0-dim / ``[1]``), per KV head ``[Hkv]`` or ``[num_seqs, Hkv]``.
    """
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    out = torch.zeros(T, Hq, v_cache.shape[-1], dtype=torch.float32, device=q.device)
    lens = seq_lens.tolist()
    cu = cu_seqlens_q.tolist()
    for i, L in enumerate(lens):
        qs, qe = cu[i], cu[i + 1]
        if qe == qs:
            continue
        qd = descale_row(q_descale, i, Hkv, q.device).repeat_interleave(group)
        qi = q[qs:qe].float() * qd.view(1, Hq, 1)  # [M, Hq, D]
        kd = descale_row(k_descale, i, Hkv, q.device)
        vd = descale_row(v_descale, i, Hkv, q.device)
        kk = gather_kv(k_cache, block_table[i], L, k_scale_cache, kd).repeat_interleave(group, dim=1)
        vv = gather_kv(v_cache, block_table[i], L, v_scale_cache, vd).repeat_interleave(group, dim=1)
        allowed = attention_mask(qe - qs, L, causal, sliding_window, q.device)
        o = masked_softmax_attention(qi.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), allowed, softmax_scale)
        out[qs:qe] = o.transpose(0, 1)
    return out


# ----------------------------------------------------------------------------- MLA
def mla_slot_size(kv_format: str) -> int:
    """Last dim of the MLA cache: 656 bytes (fp8, ``uint8``) or 576 BF16 elements (bf16)."""
    return MLA_FP8_SLOT_BYTES if kv_format == "fp8" else MLA_BF16_SLOT


def write_mla_cache(
    kv_latent: torch.Tensor, k_rope: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, kv_format: str
) -> None:
    """Write ``kv_latent [T, 512]`` and ``k_rope [T, 64]`` into ``cache [num_blocks, block_size, slot]``.

    fp8: ``cache`` is ``uint8`` with 656 bytes a slot: 512 E4M3 latent values, then 4 FP32
    decode scales (one per 128 latent values, ``amax / 448``, zero-safe), then 64 BF16 rope
    values. bf16: ``cache`` is ``bfloat16`` with 576 values a slot (latent then rope).
    """
    block_size = cache.shape[1]
    sel = (slot_mapping >= 0).nonzero().flatten()
    slots = slot_mapping[sel].long()
    blk, off = slots // block_size, slots % block_size
    lat = kv_latent[sel]
    rope = k_rope[sel].to(torch.bfloat16)
    if kv_format == "bf16":
        cache[blk, off] = torch.cat([lat.to(torch.bfloat16), rope], dim=-1)
        return
    g = lat.float().view(-1, MLA_NUM_SCALES, MLA_GROUP)
    s = dynamic_scale(g, "fp8")  # [n, 4]
    codes = quantize_values(g, s[..., None], "fp8").view(-1, MLA_LATENT)
    row = torch.cat([codes.view(torch.uint8), s.contiguous().view(torch.uint8), rope.contiguous().view(torch.uint8)], -1)
    cache[blk, off] = row


def mla_unpack(cache: torch.Tensor, kv_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized ``(latent [..., 512], rope [..., 64])`` FP32 of every slot of ``cache``."""
    if kv_format == "bf16":
        return cache[..., :MLA_LATENT].float(), cache[..., MLA_LATENT:].float()
    lead = cache.shape[:-1]
    codes = cache[..., :MLA_LATENT].contiguous().view(torch.float8_e4m3fn).float()
    s = cache[..., MLA_FP8_SCALE_OFFSET:MLA_FP8_ROPE_OFFSET].contiguous().view(torch.float32)
    lat = (codes.view(*lead, MLA_NUM_SCALES, MLA_GROUP) * s[..., None]).view(*lead, MLA_LATENT)
    rope = cache[..., MLA_FP8_ROPE_OFFSET:].contiguous().view(torch.bfloat16).float()
    return lat, rope


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_format: str,
) -> torch.Tensor:
    """FP32 reference of MLA decode: ``q_latent [S, H, 512]``, ``q_rope [S, H, 64]`` (one query
    per sequence, at its last position) -> ``[S, H, 512]`` FP32 (values = the latent)."""
    S, H, _ = q_latent.shape
    block_size = cache.shape[1]
    out = torch.zeros(S, H, MLA_LATENT, dtype=torch.float32, device=q_latent.device)
    for i, L in enumerate(seq_lens.tolist()):
        if L == 0:
            continue
        pos = torch.arange(L, device=cache.device)
        rows = cache[block_table[i].long()[pos // block_size], pos % block_size]
        lat, rope = mla_unpack(rows, kv_format)
        k = torch.cat([lat, rope], -1)[None]  # [1, L, 576]
        qq = torch.cat([q_latent[i].float(), q_rope[i].float()], -1)[:, None]  # [H, 1, 576]
        allowed = torch.ones(1, L, dtype=torch.bool, device=cache.device)
        o = masked_softmax_attention(qq, k.expand(H, -1, -1), lat[None].expand(H, -1, -1), allowed, softmax_scale)
        out[i] = o[:, 0]
    return out


def attention_flops(q_lens: list[int], seq_lens: list[int], num_heads: int, head_dim: int, causal: bool) -> float:
    """Matmul FLOPs of attention (``4 * D`` per attended (query, key) pair), counting only
    the pairs the mask allows."""
    total = 0
    for m, n in zip(q_lens, seq_lens):
        if causal:
            # query j sees n - m + j + 1 keys (clamped at 0)
            first = n - m + 1
            total += m * first + m * (m - 1) // 2 if first >= 1 else n * (n + 1) // 2
        else:
            total += m * n
    return 4.0 * head_dim * num_heads * total


__all__ = [
    "KV_FORMATS",
    "KV_DTYPES",
    "QMAX",
    "INT8_MAX",
    "MLA_LATENT",
    "MLA_ROPE",
    "MLA_GROUP",
    "MLA_FP8_SLOT_BYTES",
    "MLA_BF16_SLOT",
    "base_format",
    "is_dynamic",
    "quantize_values",
    "dynamic_scale",
    "dequantize_values",
    "write_kv_cache",
    "gather_kv",
    "descale_row",
    "masked_softmax_attention",
    "attention_mask",
    "paged_attention",
    "mla_slot_size",
    "write_mla_cache",
    "mla_unpack",
    "mla_decode",
    "attention_flops",
]
