"""Allocations: how a model-wide target sparsity is spread over blocks and layers. Registered by name.

``uniform`` gives every layer the target. ``owl`` (Yin et al., 2024) gives blocks with more outlier features
(weights whose Wanda score exceeds ``m`` times the block's mean) less sparsity, mapped linearly onto a spread of
``2 * lambda`` with the mean held at the target. As in the reference code, the spread is centred on the mean, not
on the middle of the range, so a block can land up to ``2 * lambda`` from the target when the ratios are skewed
(the paper's "target +- lambda" holds only for symmetric ratios). OWL needs calibration statistics, so the
pipeline measures the per-block outlier ratios and this module only does the arithmetic. ``erk_densities`` serves
sparse training, where layers of any shape (convolutions included) get a density each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PatternError


@dataclass(frozen=True)
class Allocation:
    name: str
    needs_calibration: bool
    description: str


ALLOCATIONS: dict[str, Allocation] = {
    "uniform": Allocation("uniform", False, "every layer gets the target sparsity"),
    "owl": Allocation("owl", True, "outlier-weighted: blocks with more Wanda outliers are pruned less"),
}


def get_allocation(name: str) -> Allocation:
    if name not in ALLOCATIONS:
        raise PatternError(f"unknown allocation '{name}'; available: {', '.join(sorted(ALLOCATIONS))}")
    return ALLOCATIONS[name]


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Percentage of scores above ``m`` times the mean score, over all given matrices together (OWL's LOD)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return 100.0 * (flat > m * flat.mean()).sum().item() / flat.numel()


def owl_sparsities(outlier_ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsities spread over ``2 * lam`` whose mean is ``target`` (equal-sized blocks).

    More outliers -> lower sparsity. With all ratios equal every block gets the target. Results are clipped to
    [0, 0.99], which can only move the mean when ``target`` is within ``lam`` of the ends.
    """
    if not 0 <= lam < 1:
        raise PatternError(f"OWL lambda must be in [0, 1), got {lam}")
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = ratios.max() - ratios.min()
    if spread == 0:
        return [target] * len(outlier_ratios)
    scaled = (ratios - ratios.min()) / spread * (2 * lam)
    density = scaled - scaled.mean() + (1 - target)
    return (1 - density).clamp(0.0, 0.99).tolist()


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float, power: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (Evci et al., 2020): layer density proportional to sum(shape) / prod(shape).

    Solves the scale so the parameter-weighted mean density equals ``density``. A layer whose density would exceed
    1 is made dense and the scale is solved again for the others, largest raw density first, as RigL's and the
    continual-DST study's code do. Small layers (first conv, classifier) therefore end up denser than large ones.
    """
    if not 0 < density <= 1:
        raise PatternError(f"density must be in (0, 1], got {density}")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (sum(shape) / sizes[name]) ** power for name, shape in shapes.items()}
    total = sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse = [name for name in shapes if name not in dense]
        budget = density * total - sum(sizes[name] for name in dense)
        weighted = sum(raw[name] * sizes[name] for name in sparse)
        scale = budget / weighted if weighted > 0 else 0.0
        over = [name for name in sparse if scale * raw[name] > 1]
        if not over:
            return {name: 1.0 if name in dense else scale * raw[name] for name in shapes}
        dense.add(max(over, key=lambda name: raw[name]))
