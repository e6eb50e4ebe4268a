"""glibc's malloc told to keep freed memory for reuse while a prune runs (the default memory policy on a CPU).

glibc maps every block larger than its mmap threshold (at most 32 MB) afresh and unmaps it when freed, and hands the
top of its heap back to the system beyond a trim threshold; the next tensor of that size is then faulted in and
zeroed page by page. A prune allocates the layer outputs of the whole calibration set layer after layer, so on
ResNet-50 at 224² (outputs of 32 images: 100 MB) a third of its forward time went to that. While a prune runs, no
block is mapped on its own (M_MMAP_MAX 0) and the heap's top is not trimmed below 2 GB; afterwards the thresholds are
set to where glibc's own dynamic rule ends for such a process (mmap above 32 MB, trim above 64 MB) and the unused
heap is handed back (malloc_trim). Measured on this project's 2-core CPU (benchmarks/heap_reuse.py, ResNet-50 at
224², 256 random images, SparseGPT 2:4 as published, fresh processes alternating): 43.9 / 43.5 → 35.6 / 35.9 s
(forward 18.7 → 11.9 s), peak RSS 2.8 → 3.2 GB. Low-memory prunes leave glibc alone (there the memory matters more
than the time), as do prunes on a GPU; elsewhere than glibc (macOS, musl, Windows) nothing changes.
"""
from __future__ import annotations

import contextlib
import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
_KEEP_TOP = 2**31 - 1  # bytes of free heap top kept (mallopt takes an int)
_AFTER = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20}  # glibc's default cap
_depth = [0]  # nested prunes (a prune inside a prune's allocation step) restore once, at the outermost exit


def _glibc():
    """The process's C library if it is glibc (whose mallopt parameters these are), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim  # noqa: B018 (presence checks)
    except (OSError, AttributeError, TypeError):  # TypeError: Windows' CDLL takes no None
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """Within the block, freed memory stays in glibc's heap for the next allocation (see the module's docstring).
    Yields whether that is in effect (False when not enabled or not glibc)."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    if _depth[0] == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TOP)
    _depth[0] += 1
    try:
        yield True
    finally:
        _depth[0] -= 1
        if _depth[0] == 0:
            for param, value in _AFTER.items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)
