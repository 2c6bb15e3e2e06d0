"""Test-only oracles, independent of ``fp4comm.reference``: brute force over every code of
a format (nearest value, ties to the even code), FP32 steps done in NumPy float32."""

from __future__ import annotations

import numpy as np


def e4m3_values() -> np.ndarray:
    """Values of the 128 non-negative E4M3 bytes 0x00..0x7F from the format's definition
    (bias 7, 3 mantissa bits, subnormals, 0x7F = NaN)."""
    out = []
    for b in range(128):
        e, m = b >> 3, b & 7
        v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        out.append(np.nan if b == 0x7F else v)
    return np.array(out, dtype=np.float64)


E4M3 = e4m3_values()
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)


def _nearest_even(table: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of ``table`` (ascending, finite) for each ``a >= 0``;
    ties go to the even index (even mantissa)."""
    d = np.abs(table[None, :] - a[:, None])
    best = np.nanmin(d, axis=1, keepdims=True)
    cand = d == best
    idx = np.argmax(cand, axis=1)  # lowest index among the tied
    tie = cand.sum(axis=1) > 1
    idx = np.where(tie & (idx % 2 == 1), idx + 1, idx)
    return idx


def e4m3_byte(v: np.ndarray) -> np.ndarray:
    """FP32 -> E4M3 byte, RNE, satfinite (>= 448 -> 0x7E), NaN -> 0x7F."""
    v = np.asarray(v, dtype=np.float32).astype(np.float64).ravel()
    a = np.minimum(np.abs(v), 448.0)
    idx = _nearest_even(E4M3[:0x7F], np.nan_to_num(a))
    idx = np.where(np.signbit(v), idx | 0x80, idx)
    return np.where(np.isnan(v), 0x7F, idx).astype(np.uint8)


def e2m1_code(v: np.ndarray) -> np.ndarray:
    """FP32 -> E2M1 code, RNE, satfinite, sign bit kept for negative zeros."""
    v = np.asarray(v, dtype=np.float32).astype(np.float64).ravel()
    idx = _nearest_even(E2M1, np.minimum(np.abs(v), 6.0))
    return np.where(np.signbit(v), idx | 8, idx).astype(np.uint8)


def nvfp4_quantize(x: np.ndarray, gs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x ``[N, H]`` float32 (finite) -> (codes [N, H] uint8, scale bytes [N, H/16], gs [N]).
    ``gs=None``: per token."""
    f32 = np.float32
    x = np.asarray(x, dtype=f32)
    N, H = x.shape
    blocks = x.reshape(N, H // 16, 16)
    vmax = np.abs(blocks).max(axis=2).astype(f32)
    if gs is None:
        amax = vmax.max(axis=1)
        with np.errstate(divide="ignore", over="ignore"):
            g = np.minimum(f32(2688.0) / np.where(amax > 0, amax, f32(1)), np.finfo(f32).max).astype(f32)
        gs = np.where(amax > 0, g, f32(1)).astype(f32)
    gs = np.broadcast_to(np.asarray(gs, dtype=f32), (N,))
    sfb = e4m3_byte((gs[:, None] * vmax) / f32(6)).reshape(N, H // 16)
    sf = E4M3[sfb & 0x7F].astype(f32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(sf != 0, np.minimum(gs[:, None] / np.where(sf != 0, sf, f32(1)), np.finfo(f32).max), f32(0))
    inv = inv.astype(f32)
    codes = e2m1_code(blocks * inv[:, :, None]).reshape(N, H)
    return codes, sfb, gs.copy()
