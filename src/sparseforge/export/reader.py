#!/usr/bin/env python3
"""Read a sparseforge export without sparseforge: turn a ``bitmask``/``nm`` export into a plain Hugging Face checkpoint.

This one file depends only on ``torch`` and ``safetensors`` and imports nothing from sparseforge, so it can be
copied next to a model and run anywhere (the format it reads is specified in ``docs/formats.md``)::

    python reader.py EXPORT_DIR OUT_DIR          # OUT_DIR then loads with transformers alone
    python -m sparseforge.export.reader EXPORT_DIR OUT_DIR

sparseforge's own loader decodes with these same functions, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_FILE = "sparseforge_format.json"
READABLE_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STRUCTURE_KEY = "sparseforge_structure"


class ExportReadError(ValueError):
    """The directory is not a readable export: missing, damaged, or of a newer format version."""


# ---- the two layouts ------------------------------------------------------------------------------------------
def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of a byte stream, most significant bit of each byte first (``numpy.packbits``)."""
    bits = (packed.to(torch.uint8).reshape(-1, 1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1
    if bits.numel() < count:
        raise ExportReadError(f"a bit stream holds {bits.numel()} bits where {count} are needed")
    return bits.reshape(-1)[:count].bool()


def unpack_uint(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``count`` unsigned integers of ``bits`` bits each, read big-endian from a packed bit stream."""
    as_bits = unpack_bits(packed, count * bits).to(torch.int64).reshape(count, bits)
    return (as_bits << torch.arange(bits - 1, -1, -1)).sum(dim=1)


@lru_cache(maxsize=None)
def layout_codes(n: int, m: int) -> torch.Tensor:
    """The C(M, N) layouts of a group in rank order: rank r is the r-th N-subset of range(M) in lexicographic order
    (``itertools.combinations``); a layout's code has bit p set when position p is kept."""
    return torch.tensor([sum(1 << p for p in combo) for combo in itertools.combinations(range(m), n)])


def rank_bits(n: int, m: int) -> int:
    """Bits per stored group layout: ceil(log2 C(M, N)), at least 1 (3 for 2:4, 7 for 4:8)."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def _scatter(values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if values.numel() != int(mask.sum()):
        raise ExportReadError(f"{values.numel()} stored values for {int(mask.sum())} kept positions")
    weight = torch.zeros(mask.shape, dtype=dtype)
    weight[mask] = values.reshape(-1).to(dtype)
    return weight


def decode_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape: tuple[int, int],
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) of a ``bitmask`` tensor: one bit per weight over the row-major [out, in] matrix, and the kept
    values in that same order."""
    mask = unpack_bits(bitmask, shape[0] * shape[1]).reshape(shape)
    return _scatter(values, mask, dtype), mask


def decode_nm(values: torch.Tensor, layouts: torch.Tensor, shape: tuple[int, int], n: int, m: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) of an ``nm`` tensor: each group of M consecutive inputs keeps N, stored as the rank of its
    layout (:func:`layout_codes`) plus its N values in ascending input order."""
    if shape[1] % m:
        raise ExportReadError(f"{shape[1]} inputs are not a whole number of groups of {m}")
    groups = shape[0] * shape[1] // m
    ranks = unpack_uint(layouts, rank_bits(n, m), groups)
    codes = layout_codes(n, m)
    if bool((ranks >= len(codes)).any()):
        raise ExportReadError(f"a stored layout rank is out of range for {n}:{m}")
    mask = ((codes[ranks].reshape(-1, 1) >> torch.arange(m)) & 1).bool().reshape(shape)
    return _scatter(values, mask, dtype), mask


# ---- the manifest and the whole directory ---------------------------------------------------------------------
def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, no spaces) without its own ``manifest_sha256``."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / FORMAT_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportReadError(f"{directory} has no {FORMAT_FILE}: not a sparseforge export") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportReadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("version"), int):
        raise ExportReadError(f"{path} is not an export manifest")
    if manifest["version"] > READABLE_VERSION:
        raise ExportReadError(f"{path} has format version {manifest['version']}; this reader knows up to "
                              f"{READABLE_VERSION}")
    if "manifest_sha256" in manifest and manifest["manifest_sha256"] != manifest_digest(manifest):
        raise ExportReadError(f"{path} does not match its recorded SHA-256 (edited or damaged)")
    return manifest


def decode_tensor(parts: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one manifest entry from its stored parts into (weight, mask), both [out, in]."""
    shape = tuple(info["shape"])
    if info["encoding"] == "bitmask":
        return decode_bitmask(parts["values"], parts["bitmask"], shape, dtype)
    if info["encoding"] == "nm":
        return decode_nm(parts["values"], parts["layouts"], shape, info["n"], info["m"], dtype)
    if info["encoding"] == "dense":
        return parts[""], parts[""] != 0
    raise ExportReadError(f"unknown encoding '{info['encoding']}'")


def read_export(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(dense state dict, {weight name: mask [out, in]}, manifest) of an export, with every checksum verified."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / manifest["weights"]
    if not weights.is_file():
        raise ExportReadError(f"{weights} is missing")
    if file_sha256(weights) != manifest["sha256"][manifest["weights"]]:
        raise ExportReadError(f"{weights} does not match its recorded SHA-256 (truncated or damaged)")
    state, masks = decode_state(load_file(weights), manifest, str(weights))
    return state, masks, manifest


def decode_state(raw: dict[str, torch.Tensor], manifest: dict,
                 origin: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dense state dict, masks) from the stored tensors ``raw`` of a verified weight file (consumed)."""
    dtype = DTYPES[manifest["dtype"]]
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, info in manifest["tensors"].items():
        prefix = f"{key}."
        parts = {name[len(prefix):]: raw.pop(name) for name in list(raw) if name.startswith(prefix)}
        try:
            weight, mask = decode_tensor(parts, info, dtype)
        except KeyError as exc:
            raise ExportReadError(f"{origin}: {key} lacks its stored part {exc}") from None
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ExportReadError(f"{origin}: {key} does not decode as its manifest says ({exc})") from None
        state[key] = weight.t().contiguous() if info.get("transposed") else weight
        masks[key] = mask
    state.update(raw)
    for alias, name in manifest.get("aliases", {}).items():
        state[alias] = state[name]
    return state, masks


def to_huggingface(export_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``export_dir`` as a plain Hugging Face directory (dense ``model.safetensors``, zeros included).

    Tied weights are stored once, as transformers does. A shrunk model whose shapes its config cannot express
    (``sparseforge_structure.transformers_loadable`` false) is refused: plain transformers could not load it.
    The output is written under a temporary name and renamed when complete.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    config = json.loads((export_dir / "config.json").read_text())
    structure = config.get(_STRUCTURE_KEY)
    if isinstance(structure, dict) and not structure.get("transformers_loadable", False):
        raise ExportReadError("this shrunk model has per-block shapes its config cannot express; plain transformers "
                              "cannot load it (load it with sparseforge)")
    if out_dir.exists():
        raise ExportReadError(f"{out_dir} already exists")
    state, _, manifest = read_export(export_dir)
    for alias in manifest.get("aliases", {}):
        state.pop(alias)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        skip = {FORMAT_FILE, manifest["weights"]}
        for item in export_dir.iterdir():
            if item.is_file() and item.name not in skip:
                shutil.copy2(item, tmp / item.name)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a sparseforge bitmask/nm export into a plain dense "
                                                 "Hugging Face checkpoint (needs only torch and safetensors).")
    parser.add_argument("export_dir", help="the export directory (holds sparseforge_format.json)")
    parser.add_argument("out_dir", help="where to write the dense checkpoint (must not exist)")
    args = parser.parse_args(argv)
    try:
        out = to_huggingface(args.export_dir, args.out_dir)
    except (ExportReadError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
