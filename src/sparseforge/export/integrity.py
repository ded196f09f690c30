"""Checks that a checkpoint file is whole before anything is loaded from it."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from ..errors import CorruptCheckpointError


def check_safetensors_file(path: Path) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``path`` is a complete safetensors file.

    A safetensors file is an 8-byte header length, a JSON header giving every tensor's byte range, then the data;
    a truncated download or a partial copy shows up as a file shorter than the header says.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is not a valid safetensors file ({exc})") from None
    if 8 + header_len + end != size:
        raise CorruptCheckpointError(
            f"{path} is truncated or corrupted: expected {8 + header_len + end} bytes, found {size}"
        )


def check_safetensors_dir(directory: Path) -> None:
    for file in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors_file(file)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
