"""Cached Triton launches: skip the JIT's per-call binder once a specialization is compiled.

``kernel[grid](*args, **kw)`` costs ~14 us of host time for a 19-argument kernel on the
H200 host (binder, cache-key string, launch metadata, pointer checks); calling the
``CompiledKernel``'s launcher directly with integer addresses costs ~4.5 us. :func:`launch`
does the first launch of every specialization through the JIT (which compiles and checks
everything) and keeps the returned ``CompiledKernel``; later launches of the same
specialization call its launcher directly.

The cache key is a refinement of the JIT's (two calls with equal keys always get the same
compiled kernel, some calls the JIT would share get separate entries), built from what
Triton 3.6 specializes on (``native_specialize_impl``, checked against it in
``tests/test_launch_cache.py``):

* tensor: dtype, and whether ``data_ptr() % 16 == 0`` (pointer alignment);
* int: ``== 1`` (becomes a constexpr), else its type (i32 / i64 / u64 by range) and
  ``% 16 == 0`` (``do_not_specialize`` parameters are keyed the same: finer, still exact);
* float, bool, ``None``: the type (never specialized on value);
* every keyword argument (constexprs and compile options such as ``num_warps``) by value;
* the current device, ``TRITON_DEBUG`` and the instrumentation mode (JIT options read per call).

Anything else (other argument types, unhashable keywords, launch hooks installed,
``pre_run_hooks``, the interpreter, :data:`ENABLED` False) takes the plain JIT path.
Tensors are passed to the launcher as integer addresses: the direct path does not repeat
the JIT's check that a pointer is device memory (the first launch of the entry did it for
its tensors; callers pass device tensors, as the EP code validates).
Not done by the direct path: the JIT's check that global values used by the kernel have not
changed since compilation (module constants here are ``tl.constexpr`` and never change).
"""

from __future__ import annotations

import inspect

import torch

#: host-side switch (same kernels either way): False = every launch through ``kernel[grid]``
ENABLED = True

_I32_MIN, _I32_END, _I64_END = -(1 << 31), 1 << 31, 1 << 63

#: kernel -> {key: (CompiledKernel, tail args)}, or False for a kernel the direct path never
#: takes (an interpreted function); kernels are module-level singletons
_CACHE: dict = {}
_DRIVER: list = []  # [get_current_device, get_current_stream], set on first GPU launch
_KNOBS: list = []  # [triton.knobs], set on first use


def arg_key(a):
    """Specialization key of one positional argument and the value passed to the launcher,
    or ``None`` for a type the direct path does not handle."""
    t = type(a)
    if t is int:
        if a == 1:
            return 1, a
        cls = 0 if _I32_MIN <= a < _I32_END else (1 if a < _I64_END else 2)
        return (cls, a % 16 == 0), a
    if t is torch.Tensor:
        p = a.data_ptr()
        return (a.dtype, p % 16 == 0), p
    if t is float or t is bool:
        return t, a
    if a is None:
        return "none", None
    return None


def _options_key(kw: dict):
    if not _KNOBS:  # imported once: the import statement costs ~0.7 us a call even when cached
        from triton import knobs

        _KNOBS.append(knobs)
    knobs = _KNOBS[0]
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):  # a HookChain with hooks, or a bare hook
            return None
    return tuple(kw.items()), knobs.runtime.debug, knobs.compilation.instrumentation_mode


def _tail(kernel, nargs: int, kw: dict) -> tuple | None:
    """Values of the parameters after the positional ones, in signature order (keywords, then
    defaults); None if one is missing (the JIT path raises the proper error)."""
    out = []
    for p in kernel.params[nargs:]:
        if p.name in kw:
            out.append(kw[p.name])
        elif p.default is not inspect.Parameter.empty:
            out.append(p.default)
        else:
            return None
    return tuple(out)


def launch(kernel, grid: tuple, *args, **kw) -> None:
    """``kernel[grid](*args, **kw)``, through the cached ``CompiledKernel`` when this
    specialization was launched before (see the module docstring). Non-constexpr
    parameters positional, constexprs and options as keywords."""
    per = _CACHE.get(kernel)
    if per is None:
        from triton.runtime.jit import JITFunction

        per = _CACHE[kernel] = {} if isinstance(kernel, JITFunction) else False
    if per is False or not ENABLED or kernel.pre_run_hooks:
        kernel[grid](*args, **kw)
        return
    keys, vals = [], []
    for a in args:
        kv = arg_key(a)
        if kv is None:
            kernel[grid](*args, **kw)
            return
        keys.append(kv[0])
        vals.append(kv[1])
    opts = _options_key(kw)
    if opts is None:
        kernel[grid](*args, **kw)
        return
    if not _DRIVER:
        from triton.runtime.driver import driver

        try:
            _DRIVER.extend((driver.active.get_current_device, driver.active.get_current_stream))
        except RuntimeError:  # no GPU driver (e.g. compile-only test harnesses): the JIT decides
            kernel[grid](*args, **kw)
            return
    dev = _DRIVER[0]()
    key = (dev, tuple(keys), opts)
    try:
        hit = per.get(key)
    except TypeError:  # an unhashable keyword value
        kernel[grid](*args, **kw)
        return
    if hit is None:
        ck = kernel[grid](*args, **kw)
        tail = _tail(kernel, len(args), kw)
        if ck is not None and tail is not None:
            per[key] = (ck.result() if hasattr(ck, "result") else ck, tail)
        return
    ck, tail = hit
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    ck.run(grid[0], g1, g2, _DRIVER[1](dev), ck.function, ck.packed_metadata, None, None, None, *vals, *tail)


def cache_entries(kernel) -> int:
    """Specializations of ``kernel`` held by the cache (tests)."""
    return len(_CACHE.get(kernel) or ())


def clear_cache() -> None:
    """Forget every cached ``CompiledKernel`` (the next launch of each goes through the JIT)."""
    _CACHE.clear()
