"""Write one safetensors file from tensors that already sit in other safetensors files, copying bytes.

Streamed pruning finishes with every block's encoded tensors in its own file; the export is one
``model.sparseforge.safetensors`` like the in-memory path writes. Loading them all to call ``save_file`` would
need the whole model in memory, so this writes the same file by copying byte ranges: the header that
``safetensors.torch.save_file`` would write for the union of the parts (same tensor order, offsets and padding:
tests compare the bytes), then each tensor's bytes in that order, a few MiB at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .integrity import safetensors_data_start, safetensors_header

# safetensors lays tensors out by dtype, in descending order of its Rust ``Dtype`` enum, then by name
_DTYPE_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
                "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
_CHUNK = 1 << 24
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}



def write_tensor_file(path: Path, name: str, tensor: torch.Tensor) -> None:
    """A safetensors file holding one tensor, written from the tensor's own memory (``save_file`` first builds the
    whole file in memory: a second copy of an 8B model's 1 GB embedding)."""
    tensor = tensor.detach().contiguous().cpu()
    header = {name: {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                     "data_offsets": [0, tensor.nbytes]}}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with Path(path).open("wb") as sink:
        sink.write(struct.pack("<Q", len(encoded)) + encoded)
        if tensor.nbytes:
            sink.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def concatenate_safetensors(parts: list[Path], out: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``out`` holding every tensor of ``parts`` (names must be unique across them)."""
    entries = {}  # name -> (part, dtype, shape, start, stop)
    for part in parts:
        for name, info in safetensors_header(part).items():
            if name in entries:
                raise ValueError(f"tensor {name} is in both {entries[name][0]} and {part}")
            entries[name] = (part, info["dtype"], info["shape"], *info["data_offsets"])
    order = sorted(entries, key=lambda n: (-_DTYPE_ORDER.index(entries[n][1]), n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        _, dtype, shape, start, stop = entries[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + stop - start]}
        offset += stop - start
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    starts = {part: safetensors_data_start(part) for part in parts}
    with out.open("wb") as sink:
        sink.write(struct.pack("<Q", len(encoded)) + encoded)
        handles = {}
        try:
            for name in order:
                part, _, _, start, stop = entries[name]
                source = handles.get(part) or handles.setdefault(part, part.open("rb"))
                source.seek(starts[part] + start)
                remaining = stop - start
                while remaining:
                    chunk = source.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise ValueError(f"{part} ended before tensor {name} did")
                    sink.write(chunk)
                    remaining -= len(chunk)
        finally:
            for handle in handles.values():
                handle.close()
