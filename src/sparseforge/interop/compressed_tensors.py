"""Reading compressed-tensors checkpoints: the legacy sparse layouts, decoded from their documented layout.

compressed-tensors (the format behind llm-compressor) dropped its sparse compressors after 0.14.0.1, but the sparse
models published in 2024-2025 are stored with them. We decode the layouts ourselves instead of depending on an old
release (which pins ``transformers<5``); the tests read fixtures that compressed-tensors 0.14.0.1 itself wrote
(``bench/interop.py --write-fixtures``). Per compressed module ``P`` (its name, without ``.weight``):

* ``sparse-bitmask``: ``P.shape`` (int64 [2]), ``P.compressed`` (the nonzero values, row-major, 1-D),
  ``P.bitmask`` (uint8 [rows, ceil(cols / 8)], ``numpy.packbits(..., axis=-1, bitorder="little")`` of the
  nonzeros), ``P.row_offsets`` (index of each row's first value);
* ``sparse-24-bitmask``: ``P.shape`` (int64 [2, 1]), ``P.compressed`` (values [rows, cols / 2]), ``P.bitmask``
  as above, marking the two kept of every four.

The mask is the bitmask (for 2:4 it can keep a weight that happens to be zero). Quantized schemes, ``marlin-24``
(a GPU tile layout) and anything else are refused with one line naming the scheme.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CorruptCheckpointError, SparseforgeError

METHOD = "compressed-tensors"
SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
READABLE_FORMATS = (*SPARSE_FORMATS, "dense", None)
CONFIG_KEYS = ("quantization_config", "compression_config")  # "compression_config": the older name


class UnsupportedCompressionError(SparseforgeError):
    """A compressed-tensors checkpoint whose scheme sparseforge cannot represent (quantized, GPU tile layouts)."""


def compression_config(config: dict) -> dict | None:
    """The compressed-tensors block of a ``config.json`` dict, or None for any other checkpoint."""
    for key in CONFIG_KEYS:
        block = config.get(key)
        if isinstance(block, dict) and (block.get("quant_method") == METHOD or "sparsity_config" in block):
            return block
    return None


def _describe_scheme(groups: dict) -> str:
    parts = []
    for name, group in groups.items():
        group = group if isinstance(group, dict) else {}
        weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
        text = f"{name}: weights {weights.get('type', '?')}{weights.get('num_bits', '?')}"
        if acts:
            text += f", activations {acts.get('type', '?')}{acts.get('num_bits', '?')}"
        parts.append(text)
    return "; ".join(parts)


def sparsity_format(block: dict, source: str) -> str | None:
    """The block's sparse format (None or "dense" for none), after refusing what cannot be represented."""
    groups = block.get("config_groups") or {}
    if groups:
        raise UnsupportedCompressionError(
            f"{source} is quantized with compressed-tensors ({_describe_scheme(groups)}, format "
            f"'{block.get('format', '?')}'); sparseforge reads unquantized checkpoints only (dense, sparse-bitmask, "
            "sparse-24-bitmask)")
    sparsity = block.get("sparsity_config") or {}
    fmt = sparsity.get("format") if isinstance(sparsity, dict) else None
    if fmt not in READABLE_FORMATS:
        raise UnsupportedCompressionError(
            f"{source} uses the compressed-tensors sparse format '{fmt}', which sparseforge does not read "
            f"(readable: {', '.join(SPARSE_FORMATS)}; marlin-24 is a GPU tile layout)")
    return fmt


def _unpack_rows(bitmask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per-row little-endian bit order: bit j of byte b of a row is column 8 * b + j."""
    rows, cols = shape
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise ValueError(f"bitmask {tuple(bitmask.shape)} {bitmask.dtype} does not fit shape {shape}")
    bits = (bitmask.reshape(rows, -1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(rows, -1)[:, :cols].bool()


def decode_module(parts: dict[str, torch.Tensor], fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) of one compressed module from its stored parts."""
    shape = tuple(int(n) for n in parts["shape"].reshape(-1).tolist())
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"recorded shape {list(shape)} is not a matrix shape")
    mask = _unpack_rows(parts["bitmask"], shape)
    values = parts["compressed"].reshape(-1)
    if values.numel() != int(mask.sum()):
        raise ValueError(f"{values.numel()} values for {int(mask.sum())} set bits")
    if fmt == "sparse-24-bitmask":
        if shape[1] % 4 or not bool((mask.reshape(-1, 4).sum(dim=1) == 2).all()):
            raise ValueError("the bitmask is not 2:4 (two of every four inputs)")
    elif "row_offsets" in parts:
        offsets = torch.cumsum(mask.sum(dim=1), 0) - mask.sum(dim=1)
        if not torch.equal(parts["row_offsets"].reshape(-1).to(torch.int64), offsets):
            raise ValueError("row_offsets disagree with the bitmask")
    weight = torch.zeros(shape, dtype=values.dtype)
    weight[mask] = values
    return weight, mask


def read_state(directory: Path, fmt: str | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dense state dict, {``P.weight``: mask}) of every safetensors file in ``directory``, sparse modules decoded."""
    raw: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        raw.update(load_file(file))
    if not raw:
        raise CorruptCheckpointError(f"{directory} holds no safetensors weights")
    masks: dict[str, torch.Tensor] = {}
    if fmt in SPARSE_FORMATS:
        for prefix in sorted(k[: -len(".bitmask")] for k in list(raw) if k.endswith(".bitmask")):
            names = [n for n in ("shape", "compressed", "bitmask", "row_offsets") if f"{prefix}.{n}" in raw]
            parts = {n: raw.pop(f"{prefix}.{n}") for n in names}
            try:
                weight, mask = decode_module(parts, fmt)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise CorruptCheckpointError(f"{directory}: {prefix} is not a valid {fmt} tensor ({exc})") from None
            raw[f"{prefix}.weight"] = weight
            masks[f"{prefix}.weight"] = mask
    return raw, masks
