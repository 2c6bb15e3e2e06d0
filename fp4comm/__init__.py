"""fp4comm: expert-parallel MoE communication with NVFP4 activations.

Public names are imported lazily so ``import fp4comm`` stays cheap and a missing
optional dependency (nvshmem4py, mpi4py) only matters when its feature is used.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# In an installed wheel ``fp4comm/kernels`` exists. From a plain source checkout (repo root
# on sys.path, nothing installed) map ``fp4comm.kernels`` to the top-level ``kernels/``.
_here = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "kernels")) and os.path.isfile(os.path.join(_root, "kernels", "common.py")):
    __path__.append(_root)  # noqa: F821 - package __path__

# public name -> module that defines it
_LAZY = {
    # formats (issue: foundation)
    "NVFP4Tensor": "fp4comm.formats",
    "FP8BlockTensor": "fp4comm.formats",
    "quantize_nvfp4": "fp4comm.quant",
    "dequantize_nvfp4": "fp4comm.quant",
    "quantize_fp8_blockwise": "fp4comm.quant",
    "dequantize_fp8_blockwise": "fp4comm.quant",
    "swizzle_scales": "fp4comm.formats",
    "unswizzle_scales": "fp4comm.formats",
    # expert parallel
    "EPBuffer": "fp4comm.ep",
    "DispatchOutput": "fp4comm.ep",
    "DispatchLayout": "fp4comm.ep",
    "EPHandle": "fp4comm.ep",
    "EPConfig": "fp4comm.ep",
    "get_dispatch_layout": "fp4comm.ep",
    "MessageLayout": "fp4comm.ep.message",
    "LowLatencyBuffer": "fp4comm.ep",
    "LowLatencyConfig": "fp4comm.ep",
    "LowLatencyDispatchOutput": "fp4comm.ep",
    "LowLatencyHandle": "fp4comm.ep",
}
_SUBMODULES = ("formats", "reference", "ep", "moe", "attention", "kernels", "quant")

__all__ = sorted([*_LAZY, *_SUBMODULES, "__version__"])


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fp4comm.{name}")
    raise AttributeError(f"module 'fp4comm' has no attribute {name!r}")


def __dir__():
    return __all__
