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
