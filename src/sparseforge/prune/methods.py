"""One-shot pruning methods, registered by name: how a group of linears sharing one input becomes sparse.

A method either scores weights and lets the pattern pick the mask (magnitude, Wanda), or solves for the mask and
new weights together (SparseGPT, the ADMM family, ALPS). Either way it receives the linears of one shared-input
group, their input statistics (``None`` for data-free methods), one target sparsity per linear and its options
(those of the option set it names in ``options``), and returns one mask per linear after zeroing (and, for
solvers, updating) the weights in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import PatternError
from ..models.adapters import LinearView
from ..sparsity.masks import apply_mask
from ..sparsity.patterns import Pattern
from . import admm, sparsegpt
from .scorers import SCORERS
from ..calibration.statistics import InputStatistics


@dataclass
class GroupResult:
    masks: dict[str, torch.Tensor]
    events: list[str] = field(default_factory=list)


PruneGroup = Callable[[list[LinearView], "InputStatistics | None", Pattern, list[float], dict], GroupResult]


@dataclass(frozen=True)
class Method:
    name: str
    prune_group: PruneGroup
    needs: frozenset[str]
    default_per_row: bool
    description: str
    options: str | None = None  # the option set it reads (``prune(..., sparsegpt={...})``), if any

    @property
    def needs_calibration(self) -> bool:
        return bool(self.needs)


def _scored(score_name: str) -> PruneGroup:
    scorer = SCORERS[score_name]

    def prune_group(views, stats, pattern, sparsities, options) -> GroupResult:
        masks = {}
        for view, sparsity in zip(views, sparsities):
            mask = pattern.mask(scorer(view, stats), sparsity)
            apply_mask(view, mask)
            masks[view.name] = mask
        return GroupResult(masks)

    return prune_group


def _sparsegpt(views, stats, pattern, sparsities, options) -> GroupResult:
    """Solve the stacked rows of all linears that share this input with one inverse-Hessian factor."""
    config = sparsegpt.SparseGPTConfig(**options)
    name = "+".join(v.name for v in views)
    key = ("sparsegpt", config.dampening)
    fresh = key not in stats.cache
    if fresh:  # one factorisation per shared input, also when its linears are pruned one at a time
        stats.cache[key] = sparsegpt.factorize(stats.hessian_matrix(), config, name)
    factor = stats.cache[key]
    stacked = torch.cat([view.weight.detach() for view in views], dim=0)
    result = sparsegpt.solve(stacked, factor, pattern, sparsities, [v.out_features for v in views], config, name)
    return GroupResult(_write_back(views, result.weight, result.mask), factor.events if fresh else [])


def _write_back(views: list[LinearView], weight: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copy the solved rows of stacked ``weight`` back into each linear; returns each linear's mask."""
    masks, start = {}, 0
    with torch.no_grad():
        for view in views:
            stop = start + view.out_features
            view.weight.copy_(weight[start:stop].to(view.weight.dtype))
            masks[view.name] = mask[start:stop]
            start = stop
    return masks


def _admm(mode: str) -> PruneGroup:
    def prune_group(views, stats, pattern, sparsities, options) -> GroupResult:
        name = "+".join(v.name for v in views)
        config = admm.ADMMConfig(**options).check(name)
        key = ("admm", config.dampening)
        if key not in stats.cache:  # one eigendecomposition per shared input
            stats.cache[key] = admm.prepare(stats.hessian_matrix(), config.dampening)
        mask = None
        if mode == "fixed":
            scorer = SCORERS[config.mask]
            mask = torch.cat([pattern.mask(scorer(view, stats), s) for view, s in zip(views, sparsities)])
        stacked = torch.cat([view.weight.detach() for view in views], dim=0)
        weight, mask, _ = admm.solve(stacked, stats.cache[key], pattern, sparsities,
                                         [v.out_features for v in views], config, mode, mask)
        return GroupResult(_write_back(views, weight, mask))

    return prune_group


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", _scored("magnitude"), frozenset(), False, "smallest |W| removed; no data"),
    "wanda": Method("wanda", _scored("wanda"), frozenset({"norms"}), True,
                    "|W| * ||X|| compared within each output row; no weight update"),
    "sparsegpt": Method("sparsegpt", _sparsegpt, frozenset({"hessian"}), False,
                        "OBS pruning with inverse-Hessian weight compensation", "sparsegpt"),
    "admm": Method("admm", _admm("fixed"), frozenset({"hessian"}), True,
                   "a scorer's mask (Wanda by default), then an ADMM weight update and PCG polish", "admm"),
    "admm-gradual": Method("admm-gradual", _admm("gradual"), frozenset({"hessian"}), True,
                           "ADMM choosing the mask as sparsity ramps up (Boža 2024), then PCG polish", "admm"),
    "alps": Method("alps", _admm("alps"), frozenset({"hessian"}), False,
                   "ADMM with projection on the target and an adaptive penalty (ALPS), then PCG polish", "admm"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PatternError(f"unknown pruning method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
