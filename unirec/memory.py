"""Keep freed memory in the process, so scoring and training steps do not page-fault their way through
every request or step (``server.keep_freed_memory``, ``trainer.keep_freed_memory``).

This was the in-server scoring slowdown. torch's CPU allocator hands every tensor to ``malloc``. An
activation of the tower is ``[N, 3H]`` floats: 150 kB at 100 candidates, 1.5 MB at 1000, far more for a
micro-batch. glibc serves blocks that large with a fresh ``mmap`` (above ``M_MMAP_THRESHOLD``, 128 kB to
start, raised only as such blocks are freed) and gives the top of a heap back to the kernel once more
than ``M_TRIM_THRESHOLD`` of it is free, and the scoring threads allocate from heaps of their own. So,
depending on the allocation history, each request's activations arrive on pages the kernel has to fault in
and zero: 700 to 1,600 minor faults per request at 1000 candidates on the reference machine, about 4,200
per merged forward of 16 requests of 100 candidates, a few milliseconds each time, where a loop in the main
thread of a fresh process happened not to pay them. Raising both thresholds keeps freed blocks for reuse:
zero faults per request after warm-up, and the process holds on to its peak working set. A training step
on CPU churns through blocks of megabytes the same way (the MovieLens recipe: 5,000-9,000 faults per step,
200-300 with the thresholds raised).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("unirec.memory")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Blocks below this come from the (reused) heap rather than a fresh mapping; glibc's largest allowed."""
TRIM_THRESHOLD = 1 << 30
"""Free memory a heap may keep before glibc hands its top back to the kernel."""


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where there is no glibc ``mallopt``
    (musl, macOS) or it refuses a value, which leaves the allocator as it was."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the thresholds; large blocks may page-fault on every use")
    return ok
