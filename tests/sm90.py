"""Compile Triton kernels for sm_90 (Hopper) on a machine without a GPU.

The interpreter accepts code the GPU compiler rejects, so CPU-only CI compiles the kernels
with Triton's bundled ptxas. :func:`compile_calls` runs ``body`` in a fresh Python process
without ``TRITON_INTERPRET`` in which every kernel launch is intercepted and compiled for
``GPUTarget("cuda", 90, 32)`` instead of run (arguments specialised like the JIT does:
16-byte divisibility, ``== 1`` integers). ``body`` launches kernels through the public APIs
with CPU tensors (``fp4comm._runtime.use_triton`` is forced on); the names of the compiled
kernels are returned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_PRELUDE = r'''
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
import fp4comm._runtime as _rt
TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
      torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
COMPILED = []
def _compile_only(self, *args, grid, warmup, **kw):
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kw}
    vals = dict(zip(self.arg_names, args)); vals.update(kw)
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(self.params):
        v = vals[p.name]
        if p.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[p.name] = "constexpr"; consts[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TY[v.dtype]
            if v.data_ptr() % 16 == 0: attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool): sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0: attrs[(i,)] = [["tt.divisibility", 16]]
        else: sig[p.name] = "fp32"
    triton.compile(ASTSource(self, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    COMPILED.append(self.fn.__name__)
JITFunction.run = _compile_only
_rt.use_triton = lambda device, impl="auto": impl != "reference"
'''


def compile_calls(body: str, timeout: float = 600) -> list[str]:
    """Run ``body`` with kernel launches compiled for sm_90 instead of run; return the kernel names."""
    code = _PRELUDE + textwrap.dedent(body) + "\nprint('@@' + json.dumps(COMPILED))\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    if p.returncode != 0:
        raise AssertionError(f"sm_90 compile failed:\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("@@")][-1]
    return json.loads(line[2:])
