"""Per-block checkpoints of the layer-sequential pipeline, so an interrupted run resumes where it stopped.

After block ``i`` is pruned the checkpoint holds: the block's new weights and masks (``block_0003.safetensors``
for block 3), the inputs of block ``i + 1`` (``hidden_0004.safetensors``) and ``state.json`` naming the next
block. Each file is written under a temporary name and renamed, and the state is written last, so a kill at any
moment leaves a checkpoint whose state points at complete files. Every tensor file gets a SHA-256 sidecar
(``block_0003.safetensors.sha256``) written after it; on resume a block whose file no longer matches (a flipped
byte, a partial copy) is discarded and recomputed from there, with a notice, instead of being used. A checkpoint
remembers the settings that made it; a rerun with different settings is refused instead of mixing two runs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write_text
from ..errors import CorruptCheckpointError, SparseforgeError
from ..export.integrity import check_safetensors_file, sha256_of

STATE_FILE = "state.json"
FORMAT_VERSION = 1


class CheckpointMismatchError(SparseforgeError):
    pass


def _checksum_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``path`` atomically, then its SHA-256 sidecar (so a file with a sidecar is complete and checkable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    atomic_write_text(_checksum_path(path), sha256_of(path) + "\n")


def verify_tensors(path: Path) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``path`` is whole and matches its SHA-256 sidecar (files from
    before sidecars existed are checked for truncation only)."""
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint file {path} is missing")
    check_safetensors_file(path)
    sidecar = _checksum_path(path)
    if sidecar.is_file() and sidecar.read_text().strip() != sha256_of(path):
        raise CorruptCheckpointError(f"checkpoint file {path} is corrupted: its SHA-256 does not match {sidecar.name}")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        verify_tensors(path)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{exc}; delete the checkpoint directory {path.parent} to start over") from None
    return load_file(str(path))


def remove_tensors(path: Path) -> None:
    path.unlink(missing_ok=True)
    _checksum_path(path).unlink(missing_ok=True)


class Checkpoint:
    """A checkpoint directory for one pruning run (``directory=None`` disables checkpointing)."""

    def __init__(self, directory: str | os.PathLike | None, settings: dict):
        self.directory = Path(directory) if directory is not None else None
        self.settings = json.loads(json.dumps(settings))  # normalise tuples etc. as they will read back
        self.state: dict = {"format_version": FORMAT_VERSION, "settings": self.settings, "next_block": 0}

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def resume(self) -> dict:
        """Load and check an existing state (or start a fresh one); returns the state."""
        if not self.enabled:
            return self.state
        path = self.directory / STATE_FILE
        if not path.is_file():
            return self.state
        try:
            state = json.loads(path.read_text())
            saved = state["settings"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"checkpoint state {path} is unreadable ({exc}); delete {self.directory} "
                                         "to start over") from None
        if saved != self.settings:
            diffs = [f"{k}: {saved.get(k)!r} -> {self.settings.get(k)!r}"
                     for k in sorted(set(saved) | set(self.settings)) if saved.get(k) != self.settings.get(k)]
            raise CheckpointMismatchError(
                f"checkpoint {self.directory} was made with different settings ({'; '.join(diffs)}); delete it "
                "(or pass --restart) to start over with the new settings")
        self.state = state
        return state

    def save(self, block: int, block_tensors: dict[str, torch.Tensor], next_hidden: torch.Tensor | None,
             **state: object) -> None:
        """Record that ``block`` is finished: its tensors, the next block's inputs, then the state."""
        self.state.update(state, next_block=block + 1)
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        save_tensors(block_tensors, self.directory / f"block_{block:04d}.safetensors")
        if next_hidden is not None:
            save_tensors({"hidden": next_hidden}, self.directory / f"hidden_{block + 1:04d}.safetensors")
        atomic_write_text(self.directory / STATE_FILE, json.dumps(self.state, indent=1))
        remove_tensors(self.directory / f"hidden_{block:04d}.safetensors")

    def save_state(self, **state: object) -> None:
        """Record run-level results (e.g. OWL's per-block sparsities) before any block is finished."""
        self.state.update(state)
        if self.enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.directory / STATE_FILE, json.dumps(self.state, indent=1))

    def first_damaged(self, upto: int) -> int | None:
        """The first of blocks ``0..upto-1`` whose checkpoint file is missing or corrupted, or None."""
        for block in range(upto):
            try:
                verify_tensors(self.directory / f"block_{block:04d}.safetensors")
            except CorruptCheckpointError:
                return block
        return None

    def hidden_intact(self, block: int) -> bool:
        try:
            verify_tensors(self.directory / f"hidden_{block:04d}.safetensors")
        except CorruptCheckpointError:
            return False
        return True

    def block_tensors(self, block: int) -> dict[str, torch.Tensor]:
        return load_tensors(self.directory / f"block_{block:04d}.safetensors")

    def hidden(self, block: int) -> torch.Tensor:
        return load_tensors(self.directory / f"hidden_{block:04d}.safetensors")["hidden"]

    def remove(self) -> None:
        if self.enabled:
            shutil.rmtree(self.directory, ignore_errors=True)
