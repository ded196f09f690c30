"""A directory of candidate layer variants that stays within a disk budget, evicting the least recently used.

Each entry is one safetensors file, written under a temporary name and renamed, so a crash never leaves a
half-written variant. Reading an entry marks it used. When a write takes the directory over its budget, the least
recently used entries are deleted and the store says so through ``log`` (an evicted variant is recomputed from the
calibration statistics when it is needed again: slower, never wrong). A damaged entry is treated as missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..calibration.checkpoint import save_tensors

SUFFIX = ".safetensors"


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


class BudgetedStore:
    def __init__(self, root: str | os.PathLike, budget_bytes: int, log: Callable[[str], None] = print,
                 writable: bool = True):
        self.root = Path(root)
        self.budget = int(budget_bytes)
        self.log = log
        self.writable = writable
        self.evicted = 0
        self.skipped = 0
        if writable:
            self.root.mkdir(parents=True, exist_ok=True)
            used = self.used_bytes()
            if used > self.budget:
                self.log(f"variant cache {self.root} holds {_mb(used)}, over its budget of {_mb(self.budget)}")
                self._evict(keep=None)

    def _entries(self) -> list[Path]:
        return sorted(self.root.glob(f"*{SUFFIX}")) if self.root.is_dir() else []

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._entries())

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            return None
        if self.writable:
            now = time.time()
            os.utime(path, (now, now))  # mtime is the recency the eviction reads
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if not self.writable:
            return
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.budget:
            self.skipped += 1
            if self.skipped == 1:
                self.log(f"a variant of {_mb(size)} exceeds the whole cache budget of {_mb(self.budget)}: variants "
                         "are not cached and are recomputed when needed (raise --cache-budget)")
            return
        path = self.path(key)
        save_tensors(tensors, path)
        if self.used_bytes() > self.budget:
            self._evict(keep=path)

    def _evict(self, keep: Path | None) -> None:
        entries = sorted((p for p in self._entries() if p != keep), key=lambda p: (p.stat().st_mtime, p.name))
        used, freed, count = self.used_bytes(), 0, 0
        for path in entries:
            if used - freed <= self.budget:
                break
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            freed += size
            count += 1
        self.evicted += count
        if count:
            self.log(f"variant cache over its budget of {_mb(self.budget)}: evicted {count} least recently used "
                     f"variant(s), {_mb(freed)} (they are recomputed when needed; raise --cache-budget to keep all)")
