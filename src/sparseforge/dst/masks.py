"""Which weights a sparse network trains, and the random masks it starts from.

Targets are the weights of every ``nn.Linear`` and ``nn.Conv*d`` (biases and norms stay dense, as in RigL and the
continual-DST study). Densities per layer come from an allocation of the sparsity core: ``uniform`` (every layer
at the target) or ``erk``. Unlike the reference code, which keeps each weight with probability ``d`` (so counts
only match in expectation), a mask here has exactly ``round(d * n)`` active weights: the count a topology update
must then preserve is a property that can be tested.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SparseTrainingError
from ..sparsity.allocation import erk_densities

SPARSE_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
MASK_INITS = ("uniform", "erk")


def check_density(density: float) -> float:
    if not isinstance(density, (int, float)) or math.isnan(density) or not 0 < density <= 1:
        raise SparseTrainingError(f"density must be in (0, 1], got {density}")
    return float(density)


def sparse_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose ``weight`` is made sparse, by qualified name, in module order."""
    targets = {name: module for name, module in model.named_modules() if isinstance(module, SPARSE_LAYER_TYPES)}
    if not targets:
        raise SparseTrainingError(f"{type(model).__name__} has no linear or convolution layers to make sparse")
    return targets


def layer_densities(shapes: dict[str, tuple[int, ...]], density: float, init: str) -> dict[str, float]:
    check_density(density)
    if init == "uniform":
        return {name: density for name in shapes}
    if init == "erk":
        return erk_densities(shapes, density)
    raise SparseTrainingError(f"unknown mask initialisation '{init}'; available: {', '.join(MASK_INITS)}")


def active_count(numel: int, density: float) -> int:
    return max(1, min(numel, round(density * numel)))


def random_mask(shape: tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor:
    """A mask with exactly ``active_count`` active positions, chosen uniformly at random."""
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:active_count(numel, density)]] = True
    return mask.reshape(shape)


def random_masks(targets: dict[str, nn.Module], density: float, init: str,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
    densities = layer_densities(shapes, density, init)
    return {name: random_mask(shapes[name], densities[name], generator) for name in targets}
