"""Names of floating-point dtypes accepted on the command line and in recipes."""

from __future__ import annotations

import torch

from .errors import SparseforgeError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if name is None or name == "auto":
        return default
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise SparseforgeError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
