"""Which implementation runs an op: the Triton kernel or the plain-torch reference.

Triton kernels run on CUDA tensors, and on CPU tensors when Triton's interpreter
is active (``TRITON_INTERPRET=1`` set before ``triton`` is imported, as the test
suite does).  Elsewhere on CPU the plain-torch reference runs.  Every public op
takes ``impl="auto" | "triton" | "reference"`` to force one of them.
"""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "reference")


def triton_interpreting() -> bool:
    """True when Triton kernels were compiled in interpreter mode (CPU tensors work)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(device: torch.device, impl: str = "auto") -> bool:
    """Decide whether the Triton kernel should run for tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl: must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "reference":
        return False
    ok = device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    if impl == "triton" and not ok:
        raise ValueError(
            f"impl: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors (got {device})"
        )
    return ok


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (``n >= 1``): tile sizes, ``tl.arange`` extents."""
    return 1 << max(0, (int(n) - 1).bit_length())


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b
