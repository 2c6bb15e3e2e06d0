"""Flag helpers for peer-memory kernels: release stores / acquire loads at *system* scope,
a bounded spin that reports instead of hanging, and the "last program to arrive" pattern.

Memory-model contract (PTX, relied on by every kernel in ``nvlink.py``):

* a program's data stores (to local or peer memory) are ordered before its flag by
  ``tl.debug_barrier()`` (CTA barrier) followed by ONE release atomic at ``scope="sys"``
  (a scalar atomic runs once per program); the receiver's acquire atomic at ``scope="sys"``
  that reads the flag then sees every one of those stores;
* several programs hand over through :func:`arrive_last`: each does an ``acq_rel``
  system-scope add on a counter after its stores; the program that brings the counter to
  ``num_programs`` has acquired all of them and publishes the flags. It also resets the
  counter (nobody else touches it any more in this launch), so counters never drift.

Flags are never reset: senders write a monotonically increasing sequence number (epoch)
and receivers wait for ``flag >= epoch``. Triton's default atomic scope is ``gpu``, which
is wrong across GPUs; every cross-GPU atomic here says ``scope="sys"``.
"""

import triton
import triton.language as tl


@triton.jit
def flag_store_release(ptr, value):
    """Publish ``value`` at ``ptr`` (local or peer) with release semantics, system scope."""
    tl.atomic_xchg(ptr, value, sem="release", scope="sys")


@triton.jit
def flag_load_acquire(ptr):
    """Read the flag at ``ptr`` with acquire semantics, system scope (an atomic add of 0)."""
    return tl.atomic_add(ptr, 0, sem="acquire", scope="sys")


@triton.jit
def wait_flag_geq(ptr, target, max_spins):
    """Spin until ``*ptr >= target`` or ``max_spins`` extra reads were made.

    Returns ``(value, ok)``: the last value read (acquire, system scope) and whether it
    reached ``target``. Never hangs; the caller records a timeout status when not ``ok``.
    """
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
def arrive_last(counter_ptr, num_programs):
    """Call once per program after its stores. True in exactly one program, the last to
    arrive, which has then acquired every other program's stores; it resets the counter."""
    tl.debug_barrier()
    old = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="sys")
    last = old == num_programs - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last
