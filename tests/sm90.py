"""Compile Triton kernels for sm_90 (Hopper) on a machine without a GPU.

The interpreter accepts code the GPU compiler rejects (constexpr scoping, pointer casts,
loop-carried types) and never runs GPU-only paths (inline PTX, hardware conversions), so
CPU-only CI compiles every kernel variant with Triton's bundled ptxas.

:func:`compile_calls` runs ``body`` in a fresh Python process without ``TRITON_INTERPRET``
in which every kernel launch is compiled for ``GPUTarget("cuda", 90, 32)`` instead of run:
arguments are specialised as the JIT does (16-byte divisibility, integers equal to 1 become
constants) and identical variants are compiled once. In ``body``:

* ``force_triton(*modules)`` makes those host modules take their Triton path for the CPU
  tensors the body passes (their ``use_triton`` returns True);
* ``KERNELS`` lists each compiled variant as ``(name, signature, constants, ptx)``, for
  assertions on the generated code.

It returns the names of the compiled kernels, one per variant, in order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_PRELUDE = r'''
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
       torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
KERNELS, _SEEN = [], set()
def _compile_only(self, *args, grid, warmup, **kw):
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg") if k in kw}
    vals = dict(zip(self.arg_names, args)); vals.update(kw)
    for p in self.params:  # parameters left to their defaults
        if p.name not in vals and p.has_default:
            vals[p.name] = p.default
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(self.params):
        v = vals[p.name]
        if p.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1 and not p.do_not_specialize):
            sig[p.name] = "constexpr"; consts[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TY[v.dtype]
            if v.data_ptr() % 16 == 0: attrs[(i,)] = [["tt.divisibility", 16]]
        elif type(v).__name__ == "TensorDescriptor":  # host-side TMA descriptor (triton.tools.tensor_descriptor)
            sig[p.name] = f"tensordesc<{_TY[v.base.dtype]}{list(v.block_shape)}>"
        elif isinstance(v, bool): sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and not p.do_not_specialize: attrs[(i,)] = [["tt.divisibility", 16]]
        else: sig[p.name] = "fp32"
    key = (self.fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
           tuple(sorted(opts.items())))
    if key in _SEEN:
        return
    _SEEN.add(key)
    k = triton.compile(ASTSource(self, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    KERNELS.append((self.fn.__name__, sig, consts, k.asm["ptx"]))
JITFunction.run = _compile_only
def force_triton(*modules):
    for m in modules:
        m.use_triton = lambda device, impl="auto": impl != "reference"
'''


def compile_calls(body: str, timeout: float = 1500) -> list[str]:
    """Run ``body`` with kernel launches compiled for sm_90 instead of run; return the kernel
    names (one per distinct variant). Skips when Triton has no NVIDIA backend."""
    pytest.importorskip("triton.backends.nvidia")
    code = _PRELUDE + textwrap.dedent(body) + "\nprint('@@' + json.dumps([k[0] for k in KERNELS]))\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    if p.returncode != 0:
        raise AssertionError(f"sm_90 compile failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("@@")][-1]
    return json.loads(line[2:])
