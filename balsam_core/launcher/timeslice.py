"""A short CPU time slice for the launcher's hot loop (Linux 6.12 and later).

The loop sleeps until a task exits, then needs a core for ~0.2 ms to start the next
one.  On a node whose cores all run tasks it waited on a run queue for that core
(0.22-0.27 s per 1000 short tasks on 2 cores): with the default slice (0.7-3 ms, by
the number of cores) for both, the EEVDF scheduler mostly lets the running task go on.
Any thread may ask for a shorter slice (``sched_setattr`` with ``sched_runtime``, no
privilege needed): its virtual deadline comes sooner, so it runs as soon as it wakes.
Its share of the CPU does not change (that is its nice value, which is kept), and what
it starts -- task processes, threads -- gets the default slice back
(``SCHED_FLAG_RESET_ON_FORK``).  1000 x ``true`` on 2 cores ran 5-9 % faster end to
end (``bench/README.md``).  Older kernels accept the call and ignore the runtime.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

#: The shortest slice the kernel grants (it clamps to 0.1-100 ms), in nanoseconds.
SLICE_NS = 100_000
#: Linux's ``sched_setattr`` and ``sched_getattr`` system call numbers, by machine.
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275), "ppc64le": (355, 356)}
_CALLS = _SYSCALLS.get(os.uname().machine) if sys.platform == "linux" else None
#: ``struct sched_attr`` up to ``sched_period`` (``SCHED_ATTR_SIZE_VER0``): size,
#: policy, flags, nice, priority, runtime, deadline, period.
_ATTR = struct.Struct("IIQiIQQQ")
_RESET_ON_FORK = 0x01
_LIBC = ctypes.CDLL(None, use_errno=True)


@contextmanager
def short_time_slice() -> Iterator[None]:
    """While in the block, the calling thread has the shortest time slice; then the
    default one again (its reset-on-fork flag stays: clearing it needs privilege, and it
    only resets real-time policies and negative nice values).  A no-op where that cannot
    be done (not Linux on a known machine, a policy other than ``SCHED_OTHER``)."""
    before = _get()
    changed = False
    if before is not None:
        _, policy, flags, nice, *_ = before
        if policy == os.SCHED_OTHER:
            changed = _set(policy, flags | _RESET_ON_FORK, nice, SLICE_NS)
    try:
        yield
    finally:
        if changed:
            _set(policy, flags | _RESET_ON_FORK, nice, 0)  # runtime 0: the default slice


def _syscall(number: int, *args: object) -> bool:
    if _LIBC.syscall(number, *args) == 0:
        return True
    log.debug("sched_setattr/getattr failed: %s", os.strerror(ctypes.get_errno()))
    return False


def _get() -> tuple[int, ...] | None:
    """The calling thread's ``struct sched_attr`` (its first fields), or None."""
    buffer = ctypes.create_string_buffer(_ATTR.size)
    if _CALLS is None or not _syscall(_CALLS[1], 0, buffer, _ATTR.size, 0):
        return None
    return _ATTR.unpack(buffer.raw)


def _set(policy: int, flags: int, nice: int, runtime_ns: int) -> bool:
    """Set the calling thread's policy, flags, nice value and slice (0: the default)."""
    attr = _ATTR.pack(_ATTR.size, policy, flags, nice, 0, runtime_ns, 0, 0)
    return _CALLS is not None and _syscall(_CALLS[0], 0, ctypes.create_string_buffer(attr), 0)
