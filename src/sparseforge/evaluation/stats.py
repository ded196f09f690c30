"""Static measurements of a model: sparsity per linear layer, parameter counts, bytes on disk."""

from __future__ import annotations

from pathlib import Path


import torch

from ..export.integrity import safetensors_header
from ..models.handle import LoadedModel


def layer_sparsity(handle: LoadedModel) -> list[dict]:
    """One row per prunable linear: name, block, role, shape, zeros, sparsity."""
    rows = []
    for view in handle.adapter.linears():
        weight = view.weight.detach()
        zeros = int((weight == 0).sum())
        rows.append({"name": view.name, "block": view.block, "role": view.role,
                     "shape": [view.out_features, view.in_features], "zeros": zeros,
                     "sparsity": zeros / weight.numel()})
    return rows


def sparsity_summary(handle: LoadedModel) -> dict:
    """Overall sparsity over prunable linears (the number methods target) and per layer."""
    rows = layer_sparsity(handle)
    total = sum(r["shape"][0] * r["shape"][1] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    return {"overall": zeros / total if total else 0.0, "prunable_params": total, "per_layer": rows}


def parameter_counts(handle: LoadedModel) -> dict:
    """Total and nonzero parameters, tied tensors counted once."""
    seen = set()
    total = nonzero = 0
    for param in handle.model.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        total += param.numel()
        nonzero += int(torch.count_nonzero(param.detach()))
    for module in handle.model.modules():  # weights held outside parameters (a runtime's packed layouts)
        if hasattr(module, "weight_counts"):
            held_total, held_nonzero = module.weight_counts()
            total += held_total
            nonzero += held_nonzero
    return {"total": total, "nonzero": nonzero, "sparsity": 1 - nonzero / total}


def directory_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weight_file_bytes(path: str | Path) -> int:
    """Bytes of weight files only (what sparsity can shrink; tokenizer files are the same for every format)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def pruned_weight_bytes(export_dir: str | Path, description: dict) -> int:
    """Bytes the pruned linears take in an export (all their parts: values, bitmasks, layouts)."""
    masked = description["masked"]
    header = safetensors_header(Path(export_dir) / description["weights"])
    return sum(end - start for key, info in header.items() for start, end in [info["data_offsets"]]
               if any(key == m or key.startswith(m + ".") for m in masked))
