"""Memory: give freed heap memory back to the operating system, and measure the peak of one piece of work.

Activations of one calibration batch are tens of MB: below glibc's (self-raising) mmap threshold, so after they
are freed glibc keeps the pages in its heap, and the process's resident memory creeps up block after block even
though nothing is alive. ``malloc_trim`` returns those pages between blocks; within a block, where the peak is
made, :func:`sparseforge.kernels.recycling.recycled_large_allocations` keeps large tensors out of the heap
altogether and reuses their pages (with :func:`map_large_allocations` as its fallback). Elsewhere (macOS, musl)
these are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading

import torch


@functools.lru_cache(maxsize=None)
def libc_function(function: str):
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


def _malloc_trim():
    return libc_function("malloc_trim")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE_ALLOCATION = 1 << 20


def map_large_allocations(threshold: int = LARGE_ALLOCATION) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own memory map, returned on free.

    glibc starts at 128 KiB but raises its threshold to the size of each mapped block freed, up to 32 MiB, so
    after the first batches every activation tensor of a pruning run is carved from the heap; a small allocation
    left above it then pins the freed pages, and the resident peak of a run depends on the order of frees (on the
    default model's SparseGPT job: 1.4-1.6 GiB, against 1.07 GiB with a fixed 128 KiB threshold). Fixing the
    threshold (which also stops its adaptation) makes resident memory what is alive. Returns whether it was set
    (False off glibc). Process-wide and permanent: the fallback of the recycling allocator
    (:mod:`sparseforge.kernels.recycling`).
    """
    mallopt = libc_function("mallopt")
    if threshold <= 0:
        return False
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, int(threshold)))


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resident_mb() -> float:
    """Current resident memory of this process in MiB (Linux /proc; elsewhere the peak so far, as a bound)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_resident_mb() -> float:
    """Peak resident memory of this process in MiB since it started its program.

    Linux's ``ru_maxrss`` is carried across ``exec``: a worker started from a parent holding 1.1 GiB reports at
    least 1.1 GiB whatever it does itself (a fork begins with the parent's pages counted). ``VmHWM`` in
    ``/proc/self/status`` is the high-water mark of this program's own address space, reset at ``exec``. Without
    /proc, ``ru_maxrss`` is the best there is.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory while a block of code runs: resident memory sampled every ``interval`` s, or CUDA's own peak.

    The process-wide peak (``ru_maxrss``) only ever grows, so it cannot tell apart two trainings run one after the
    other in one process (as a benchmark does); this measures each on its own. ``peak_mb`` includes what was
    resident when the block started (the model itself), which is what a user has to provision.
    """

    def __init__(self, device: "torch.device | None" = None, interval: float = 0.02):
        self.cuda = device is not None and device.type == "cuda"
        self.interval = interval
        self.peak_mb = 0.0
        self.start_mb = 0.0

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak_mb = max(self.peak_mb, resident_mb())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
        else:
            self.start_mb = self.peak_mb = resident_mb()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._done.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, resident_mb())


def available_bytes() -> int | None:
    """Memory the system can still give this process (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(needed: int, what: str) -> None:
    """Refuse up front a request whose working set cannot fit in the memory that is available now."""
    from .errors import SparseforgeError

    available = available_bytes()
    if available is not None and needed > available:
        raise SparseforgeError(f"{what} needs about {needed / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB "
                               "of memory is available; use fewer samples or shorter windows")
