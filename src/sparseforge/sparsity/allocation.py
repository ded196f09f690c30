"""Allocations: how a model-wide target sparsity is spread over blocks and layers. Registered by name.

``uniform`` gives every layer the target. ``owl`` (Yin et al., 2024) gives blocks with more outlier features
(weights whose Wanda score exceeds ``m`` times the block's mean) less sparsity, mapped linearly onto a spread of
``2 * lambda`` with the mean held at the target. As in the reference code, the spread is centred on the mean, not
on the middle of the range, so a block can land up to ``2 * lambda`` from the target when the ratios are skewed
(the paper's "target +- lambda" holds only for symmetric ratios). OWL needs calibration statistics, so the
pipeline measures the per-block outlier ratios and this module only does the arithmetic.
"""

from __future__ import annotations

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
