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

from ..errors import CorruptCheckpointError, ModelNotFoundError, SparseforgeError
from ..export.integrity import safetensors_data_start, safetensors_header

INDEX_FILE = "model.safetensors.index.json"
_SAMPLE = 4096
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
SINGLE_FILE = "model.safetensors"



class WeightSource:
    """Tensor name -> file of a local checkpoint directory (one ``model.safetensors`` or an indexed set of shards)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise ModelNotFoundError(f"{self.directory} is not a model directory (no config.json)")
        self.files = self._files()
        self.headers = {path: safetensors_header(path) for path in self.files}  # every file whole, or refused
        self._data_start = {path: safetensors_data_start(path) for path in self.files}
        self.location: dict[str, Path] = {name: path for path, header in self.headers.items() for name in header}
        self.shapes: dict[str, list[int]] = {name: info["shape"] for header in self.headers.values()
                                             for name, info in header.items()}
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """Identifies the checkpoint without reading it all: every file's name, size and header, and 4 KiB from
        the start, middle and end of every tensor (other weights of the same architecture differ there)."""
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(f"{path.name}:{path.stat().st_size}:".encode())
            digest.update(json.dumps(self.headers[path], sort_keys=True).encode())
            with path.open("rb") as fh:
                for name in sorted(self.headers[path]):
                    start, stop = self.headers[path][name]["data_offsets"]
                    middle = max(start, (start + stop - _SAMPLE) // 2)
                    for at in sorted({start, middle, max(start, stop - _SAMPLE)}):
                        fh.seek(self._data_start[path] + at)
                        digest.update(fh.read(min(_SAMPLE, stop - at)))
        return digest.hexdigest()[:16]

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
        """One tensor, read now with plain file reads into fresh memory, in ``dtype``.

        Not through a memory map: pages of a mapped file count in the process's resident memory for as long as the
        map lives, so reading a whole checkpoint through one would make the resident size grow to the
        checkpoint's size, which is what streaming avoids."""
        path = self.location.get(name)
        if path is None:
            raise CorruptCheckpointError(f"{self.directory} has no tensor '{name}', which the model's config implies")
        info = self.headers[path][name]
        start, stop = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        if stop > start:
            with path.open("rb") as fh:
                fh.seek(self._data_start[path] + start)
                if fh.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != stop - start:
                    raise CorruptCheckpointError(f"{path} ended inside tensor '{name}'")
        return tensor.to(dtype) if dtype is not None else tensor
