"""Large torch tensors from a recycling allocator for the length of a block of code (``csrc/recycling.cpp``).

It lives with the kernels because it is compiled into the same native extension; :mod:`sparseforge.memory` holds
the process-wide glibc settings it falls back on.
"""

from __future__ import annotations

import contextlib

from ..memory import LARGE_ALLOCATION, map_large_allocations
from .build import native


@contextlib.contextmanager
def recycled_large_allocations(min_bytes: int = LARGE_ALLOCATION):
    """Within the block, torch tensors of ``min_bytes`` or more come from their own memory maps, and a freed one is
    kept for the next request of about the same size (``csrc/recycling.cpp``).

    Layer-sequential pruning asks for the same few large sizes thousands of times. With glibc's heap, interleaved
    batches fragment it (the default model's streamed Wanda job: process peak 1338 MiB against 947); with a memory
    map per request (:func:`map_large_allocations` alone) every byte is faulted in and zeroed again (18 million
    page faults, about a quarter of the time). Kept blocks never take the mapped total above the peak of live
    memory. Where the native extension is not built, only :func:`map_large_allocations` applies. Yields the
    counters ``{"reused", "mapped"}`` (filled in when the block ends), or None without it.
    """
    ops = native()
    if ops is None or not ops.recycle_large_allocations(min_bytes):
        map_large_allocations(min_bytes)
        yield None
        return
    counters: dict = {}
    try:
        yield counters
    finally:
        reused, mapped, _, _ = ops.recycling_stats()
        ops.stop_recycling()
        counters.update(reused=reused, mapped=mapped)
