"""Memory accounting: a worker's peak is its own, not its parent's."""

import subprocess
import sys

import torch

from sparseforge.memory import peak_resident_mb, resident_mb


def test_peak_of_a_child_process_excludes_the_parents_pages():
    # Linux's ru_maxrss is carried across exec: a child of a process holding 512 MiB more would report them too
    held = torch.ones(512 * 2**20 // 4)
    parent = resident_mb()
    child = subprocess.run([sys.executable, "-c", "from sparseforge.memory import peak_resident_mb; "
                            "print(peak_resident_mb())"], capture_output=True, text=True, check=True)
    assert float(child.stdout.strip()) < parent - 400
    assert peak_resident_mb() >= parent
    del held


def _native_or_skip():
    import platform
    import shutil

    import pytest

    from sparseforge.kernels.build import native

    if shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("no compiler for the native extension here")
    ops = native()
    assert ops is not None  # a compiler exists: the extension must build
    return ops


def test_recycled_allocations_reuse_blocks_and_restore_the_allocator():
    from sparseforge.kernels.recycling import recycled_large_allocations

    ops = _native_or_skip()
    mib = 2**20
    with recycled_large_allocations(min_bytes=mib) as counters:
        survivor = torch.full((3 * mib // 4,), 7.0)  # 3 MiB, alive past the scope
        for step in range(20):
            scratch = torch.full((mib,), float(step))  # 4 MiB, freed every step
            assert float(scratch.sum()) == step * mib
            del scratch
        small = torch.arange(10.0)  # below min_bytes: c10's own allocation
    assert counters["reused"] == 19 and counters["mapped"] == 2, counters
    assert ops.recycling_stats()[2:] == [0, 3 * mib]  # the scope's end returned every kept block
    assert float(survivor.sum()) == 7.0 * survivor.numel() and float(small.sum()) == 45.0
    del survivor  # freed after the scope: unmapped, nothing kept
    assert ops.recycling_stats()[2:] == [0, 0]
    after = torch.ones(mib)  # torch's previous allocator again
    assert ops.recycling_stats()[3] == 0 and float(after.sum()) == mib


def test_recycling_never_keeps_more_than_the_peak_of_live_memory():
    from sparseforge.kernels.recycling import recycled_large_allocations

    ops = _native_or_skip()
    mib = 2**20
    with recycled_large_allocations(min_bytes=mib):
        blocks = [torch.empty(2 * mib // 4) for _ in range(3)]  # 6 MiB alive
        del blocks  # 6 MiB kept, sizes no later request fits
        kept, mapped = ops.recycling_stats()[2:]
        assert kept == mapped == 6 * mib
        big = torch.empty(8 * mib // 4)  # a new peak of live memory: the kept blocks go first
        assert ops.recycling_stats()[2:] == [0, 8 * mib]
        del big
        medium = torch.empty(15 * mib // 8)  # 7.5 MiB: served by the 8 MiB block (within an eighth)
        assert ops.recycling_stats()[2:] == [0, 8 * mib]
        del medium


def test_recycled_allocations_fall_back_to_a_fixed_mmap_threshold(monkeypatch):
    from sparseforge.kernels import recycling

    calls = []
    monkeypatch.setattr(recycling, "native", lambda: None)
    monkeypatch.setattr(recycling, "map_large_allocations", lambda threshold: calls.append(threshold) or True)
    with recycling.recycled_large_allocations(min_bytes=3 << 20) as counters:
        pass
    assert counters is None and calls == [3 << 20]
