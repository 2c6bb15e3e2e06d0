"""Flag helpers for peer-memory kernels: release stores / acquire loads at *system* scope,
a bounded wait that reports instead of hanging, and the "last program to arrive" pattern.

Memory-model contract (PTX, relied on by every kernel in ``nvlink.py``):

* a program's data stores (to local or peer memory) are ordered before its flag by a
  ``fence.acq_rel.sys`` in every thread (GPU only), ``tl.debug_barrier()`` (CTA barrier),
  then a release store at system scope (:func:`flag_store_release`); or, for many flags a
  program (the low-latency dispatch's per-expert flags), the barrier first, then one fence
  a thread and relaxed system-scope stores (:func:`flag_store_release` with ``RELAXED``,
  which runs the barrier and the fence itself: a release pattern); the receiver's acquire
  at system scope that reads the flag then sees every one of those stores;
* no atomic ever targets peer memory: flags are written with ``st.release.sys`` and only
  their owner reads them (atomics stay on local counters and status words);
* several programs hand over through :func:`arrive_last`: each does an ``acq_rel``
  system-scope add on a counter after its stores; the program that brings the counter to
  ``num_programs`` has acquired all of them and publishes the flags. It also resets the
  counter (nobody else touches it any more in this launch), so counters never drift.

Flags are never reset: senders write a monotonically increasing sequence number (epoch)
and receivers wait for ``flag >= epoch``. Triton's default atomic scope is ``gpu``, which
is wrong across GPUs; every cross-GPU atomic here says ``scope="sys"``.

Waits are bounded. On GPUs (``GPU=True``) by time: ``%globaltimer`` nanoseconds since
:func:`spin_start`, every thread polls with ``ld.acquire.sys`` (no atomics, no CTA
barrier inside the loop), then one acquire atomic gives the program a uniform value. Under
``TRITON_INTERPRET=1`` (``GPU=False``: no inline PTX there) by a number of reads.
"""

import triton
import triton.language as tl


@triton.jit
def globaltimer():
    """GPU global timer in nanoseconds (int64). GPU only."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def spin_start(GPU: tl.constexpr):
    """Start time of a bounded wait (0 under the interpreter, where waits count reads)."""
    if GPU:
        t0 = globaltimer()
    else:
        t0 = tl.full([], 0, tl.int64)
    return t0


@triton.jit
def fence_sys(GPU: tl.constexpr, GPU_SCOPE: tl.constexpr = False):
    """``fence.acq_rel.sys`` in every thread (GPU only; a no-op under the interpreter, which
    is sequentially consistent); ``GPU_SCOPE``: ``fence.acq_rel.gpu`` instead, for programs
    of one GPU."""
    if GPU:
        if GPU_SCOPE:
            fence: tl.constexpr = "fence.acq_rel.gpu; mov.u32 $0, 0;"
        else:
            fence: tl.constexpr = "fence.acq_rel.sys; mov.u32 $0, 0;"
        tl.inline_asm_elementwise(fence, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _ld_acquire_sys(ptr):
    """``ld.acquire.sys`` of an int64 (every thread; GPU only)."""
    return tl.inline_asm_elementwise(
        "ld.acquire.sys.global.b64 $0, [$1];", "=l,l", [ptr], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def flag_store_release(ptr, value, mask, sink, GPU: tl.constexpr, RELAXED: tl.constexpr = False):
    """Publish int64 ``value`` at ``ptr`` (local or peer; scalars or tensors) where ``mask``,
    release semantics at system scope.

    GPU: a plain ``st.release.sys`` per element (every thread holding the element stores
    the same value), never an atomic on peer memory; masked-off elements store into
    ``sink`` (a local scratch int64) instead, as inline PTX cannot be masked. The caller
    puts :func:`fence_sys` and ``tl.debug_barrier()`` before it so that the stores of the
    whole program are ordered before the flag. Interpreter: a masked atomic exchange.

    ``RELAXED``: for many flags a program, the whole release pattern here, no fence or
    barrier before it in the caller: ``tl.debug_barrier()``, then :func:`fence_sys` (the
    barrier first, so that every thread's fence comes after all the program's stores), then
    ``st.relaxed.sys`` stores. One fence a thread then covers all its flags, where
    ``st.release.sys`` fences per flag."""
    if RELAXED:
        tl.debug_barrier()
        fence_sys(GPU)
    if GPU:
        if RELAXED:
            st: tl.constexpr = "st.relaxed.sys.global.b64 [$1], $2;\n\tmov.u32 $0, 0;"
        else:
            st: tl.constexpr = "st.release.sys.global.b64 [$1], $2;\n\tmov.u32 $0, 0;"
        addr = tl.where(mask, ptr, sink)
        tl.inline_asm_elementwise(st, "=r,l,l", [addr, value.to(tl.int64)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.atomic_xchg(ptr, value.to(tl.int64), mask=mask, sem="release", scope="sys")


@triton.jit
def flag_load_acquire(ptr):
    """Read the flag at ``ptr`` with acquire semantics, system scope (an atomic add of 0:
    one thread reads, the program gets one value)."""
    return tl.atomic_add(ptr, 0, sem="acquire", scope="sys")


@triton.jit
def wait_flag_geq(ptr, target, max_spins, t0, timeout_us, GPU: tl.constexpr):
    """Wait until ``*ptr >= target`` (int64 flag).

    GPU: until ``timeout_us`` microseconds have passed since ``t0`` (:func:`spin_start`;
    several waits of one program share one deadline). Interpreter: at most ``max_spins``
    extra reads. Returns ``(value, ok)``: the last value read (acquire, system scope, the
    same in every thread of the program) and whether it reached ``target``. Never hangs;
    the caller records a timeout status when not ``ok``.
    """
    if GPU:
        limit = timeout_us.to(tl.int64) * 1000
        v = _ld_acquire_sys(ptr)
        now = t0
        while (v < target) & (now - t0 < limit):
            v = _ld_acquire_sys(ptr)
            now = globaltimer()
        v = flag_load_acquire(ptr)
    else:
        v = flag_load_acquire(ptr)
        i = 0
        while (v < target) & (i < max_spins):
            v = flag_load_acquire(ptr)
            i += 1
    return v, v >= target


@triton.jit
def report_timeout(status_ptr, code):
    """Record a timeout: ``status[0] = code`` (``1 + peer``) unless an earlier one is there.
    The host reads it after the kernel and raises ``TimeoutError`` naming the peer."""
    tl.atomic_cas(status_ptr, 0, code, sem="relaxed", scope="gpu")


@triton.jit
def arrive_last(counter_ptr, num_programs, GPU: tl.constexpr, GPU_SCOPE: tl.constexpr = False):
    """Call once per program after its stores. True in exactly one program, the last to
    arrive, which has then acquired every other program's stores; it resets the counter.
    ``GPU_SCOPE``: fence and add at GPU scope, for stores read on the same GPU only."""
    fence_sys(GPU, GPU_SCOPE)
    tl.debug_barrier()
    old = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu" if GPU_SCOPE else "sys")
    last = old == num_programs - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last
