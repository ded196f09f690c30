"""Checks that a checkpoint file is whole before anything is loaded from it."""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from pathlib import Path

from ..errors import CorruptCheckpointError


def safetensors_header(path: Path) -> dict:
    """The JSON header of a complete safetensors file: tensor name -> dtype, shape and byte range.

    A safetensors file is an 8-byte header length, a JSON header giving every tensor's byte range, then the data;
    a truncated download or a partial copy shows up as a file shorter than the header says, and is refused with
    :class:`CorruptCheckpointError`.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(header_len))
        header.pop("__metadata__", None)
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is not a valid safetensors file ({exc})") from None
    if 8 + header_len + end != size:
        raise CorruptCheckpointError(
            f"{path} is truncated or corrupted: expected {8 + header_len + end} bytes, found {size}"
        )
    return header


def safetensors_data_start(path: Path) -> int:
    """Offset of a safetensors file's first tensor byte (the header's byte ranges count from there)."""
    with Path(path).open("rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def check_safetensors_file(path: Path) -> None:
    safetensors_header(path)


def check_safetensors_dir(directory: Path) -> None:
    for file in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors_file(file)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest(tensors: list) -> str:
    """Content hash of tensors: the fingerprint of weights or calibration windows that checkpoints, caches and
    attachments record, so that a resume or a restore on other data or other weights is refused."""
    digest_of = hashlib.sha256()
    for tensor in tensors:
        digest_of.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest_of.hexdigest()[:16]
