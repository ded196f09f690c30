"""A Hugging Face safetensors checkpoint read lazily, one tensor at a time.

Streamed pruning never loads a model whole: each tensor is read from the checkpoint's files (memory-mapped by
safetensors) when the block that owns it is needed. Everything about the files is checked before the first block
is touched: every shard is whole (a download cut in the middle is caught here, not at block 20 of 32), and the
fingerprint (names, sizes and headers of the files) identifies the checkpoint for resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CorruptCheckpointError, ModelNotFoundError, SparseforgeError
from ..export.integrity import safetensors_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightSource:
    """Tensor name -> file of a local checkpoint directory (one ``model.safetensors`` or an indexed set of shards)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise ModelNotFoundError(f"{self.directory} is not a model directory (no config.json)")
        self.files = self._files()
        headers: dict[Path, dict] = {path: safetensors_header(path) for path in self.files}  # whole, or refused
        self.location: dict[str, Path] = {name: path for path, header in headers.items() for name in header}
        self.shapes: dict[str, list[int]] = {name: info["shape"] for header in headers.values()
                                             for name, info in header.items()}
        self.bytes = sum(path.stat().st_size for path in self.files)
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(f"{path.name}:{path.stat().st_size}:".encode())
            digest.update(json.dumps(headers[path], sort_keys=True).encode())
        self.fingerprint = digest.hexdigest()[:16]
        self._open: dict[Path, object] = {}

    def _files(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CorruptCheckpointError(f"{index} is unreadable ({exc})") from None
            missing = [n for n in names if not (self.directory / n).is_file()]
            if missing:
                raise CorruptCheckpointError(f"{self.directory} lacks the shard(s) its index names: {', '.join(missing)}")
            return [self.directory / n for n in names]
        if (self.directory / SINGLE_FILE).is_file():
            return [self.directory / SINGLE_FILE]
        raise SparseforgeError(f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}: streamed pruning reads "
                               "safetensors checkpoints (convert others with `sparseforge export --format dense`)")

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def numel(self, name: str) -> int:
        """Elements of one tensor, from the header (nothing is read)."""
        return math.prod(self.shapes[name])

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read now (safetensors copies it out of the memory map), in ``dtype``."""
        path = self.location.get(name)
        if path is None:
            raise CorruptCheckpointError(f"{self.directory} has no tensor '{name}', which the model's config implies")
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        tensor = self._open[path].get_tensor(name)
        return tensor.to(dtype) if dtype is not None else tensor
