"""Allocations: how a model-wide target sparsity is spread over layers. Registered by name.

Only ``uniform`` lives here for now; non-uniform allocations (OWL, ERK, searched) register the same way and
return a per-layer sparsity whose weighted mean equals the target.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import PatternError
from ..models.adapters import LinearView

Allocation = Callable[[Sequence[LinearView], float], dict[str, float]]


def uniform(layers: Sequence[LinearView], sparsity: float) -> dict[str, float]:
    return {layer.name: sparsity for layer in layers}


ALLOCATIONS: dict[str, Allocation] = {"uniform": uniform}


def get_allocation(name: str) -> Allocation:
    if name not in ALLOCATIONS:
        raise PatternError(f"unknown allocation '{name}'; available: {', '.join(sorted(ALLOCATIONS))}")
    return ALLOCATIONS[name]
