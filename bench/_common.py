"""Shared by benchmark scripts: set-up printing (every result says how it was measured), result caching, tables,
and the machine's memory-copy bandwidth (the physical limit that speed is compared with)."""

from __future__ import annotations

import json
import os
import subprocess
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers

from sparseforge.kernels.pages import huge_page_copy

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def print_setup(**settings) -> dict:
    setup = {**settings, "threads": torch.get_num_threads(), "torch": torch.__version__,
             "python": sys.version.split()[0], "machine": platform.machine(), "processor": platform.processor()}
    print("setup: " + json.dumps(setup))
    return setup


def cached_results(out: str | Path) -> tuple[dict, Callable[[], None]]:
    """``out/results.json`` as it stands (cells finished by an earlier, interrupted run) and a function that saves
    it, so a long benchmark resumes where it stopped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    return results, lambda: path.write_text(json.dumps(results, indent=1))


def run_cell(results: dict, save: Callable[[], None], key: str, cmd: list[str]) -> dict:
    """The cached result of one benchmark cell, or run ``cmd`` (a worker printing one JSON line last), cache and
    print it. Each cell in its own process: its peak memory and timings are its own."""
    if key in results["cells"]:
        return results["cells"][key]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(f"worker failed for {key}:\n{proc.stderr[-3000:]}")
    results["cells"][key] = json.loads(proc.stdout.strip().splitlines()[-1])
    save()
    print(json.dumps(results["cells"][key]), flush=True)
    return results["cells"][key]


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


HALF_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # the runtime's 16-bit weight types, by short name


def half_name(dtype: torch.dtype) -> str:
    """"fp16" or "bf16": how benchmark variants name a 16-bit weight type."""
    return next(name for name, half in HALF_TYPES.items() if half == dtype)


def last_level_cache_mib() -> int:
    """Size of the largest CPU cache in MiB (sysfs; 32 if unreadable): 32 MiB on a 2-core EPYC slice, 480 MiB on
    the Xeon some of our machines are, which a 256 MiB working set would fit in."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 / 1024, "M": 1, "G": 1024}.get(text[-1:], 1 / 2**20)
        sizes.append(float(text.rstrip("KMG")) * scale)
    return int(max(sizes, default=32))


def streamed_mib() -> int:
    """Weight bytes (MiB) a kernel benchmark cycles over so that each product streams from DRAM: twice the
    last-level cache, at least 256 MiB."""
    return max(256, 2 * last_level_cache_mib())


def copy_bandwidth(rounds: int = 7, mib: int | None = None) -> float:
    """GB/s of ``dst.copy_(src)`` on a ``mib`` MiB float32 tensor on huge pages (default: as large as the last-level cache, so
    source and destination together do not fit), read + write bytes counted, median of rounds."""
    mib = mib or max(512, last_level_cache_mib())
    # on huge pages, where the runtime keeps its weights (sparseforge.kernels.pages): on 4 KiB pages the copy
    # measured 8% less here, below what our dense kernel streams
    src = huge_page_copy(torch.rand(mib * 2**20 // 4))
    dst = huge_page_copy(torch.empty(src.numel()))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9
