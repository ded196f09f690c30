"""Give freed heap memory back to the operating system between pipeline steps.

Activations of one calibration batch are tens of MB: below glibc's (self-raising) mmap threshold, so after they
are freed glibc keeps the pages in its heap, and the process's resident memory creeps up block after block even
though nothing is alive. ``malloc_trim`` returns those pages. Elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
