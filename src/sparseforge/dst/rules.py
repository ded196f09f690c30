"""The two halves of a topology update: which active weights die, which inactive positions grow. Registered by name.

Drop rules (``DROP_RULES``) return exactly ``n`` positions among the active ones:

* ``magnitude``: the ``n`` smallest |w| (RigL, SNFS and the study's default);
* ``set``: half from the smallest positive weights and half from the negative weights closest to zero, as SET
  removes "the smallest positive and the largest negative" weights; one side short of weights is made up from the
  other, so the count stays exact.

Growth rules (``GROWTH_RULES``) score every position; the ``n`` best inactive ones grow (ties broken at random):

* ``random``: uniform among inactive positions (SET). The reference code activates each with probability
  n / n_inactive, so its count drifts; here it is exact.
* ``unfired``: uniform among positions never active so far in this run, then uniform among the rest if too few
  remain (the study's "random_unfired").
* ``gradient``: largest |dL/dw| of the current mini-batch at the inactive positions (RigL).
* ``momentum``: largest |m / (sqrt(v) + 1e-8)| of Adam-style moments of the dense gradient (SNFS). The engine keeps
  these moments itself, because the optimizer only ever sees the masked gradient (zero at inactive positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SparseTrainingError


@dataclass
class LayerState:
    """What a rule may look at for one layer: the effective weight and mask, and the gradient statistics."""

    weight: torch.Tensor
    mask: torch.Tensor
    fired: torch.Tensor
    dense_grad: torch.Tensor | None = None
    grad_mean: torch.Tensor | None = None
    grad_sq_mean: torch.Tensor | None = None


def top_positions(scores: torch.Tensor, allowed: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of the ``n`` highest-scoring allowed positions; equal scores are ordered at random."""
    flat = scores.reshape(-1).double().masked_fill(~allowed.reshape(-1), float("-inf"))
    shuffle = torch.randperm(flat.numel(), generator=generator)
    order = shuffle[torch.argsort(flat[shuffle], descending=True, stable=True)][:n]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    return chosen.reshape(scores.shape)


def drop_magnitude(state: LayerState, n: int, generator: torch.Generator) -> torch.Tensor:
    return top_positions(-state.weight.abs(), state.mask, n, generator)


def drop_set(state: LayerState, n: int, generator: torch.Generator) -> torch.Tensor:
    positive = state.mask & (state.weight >= 0)
    negative = state.mask & (state.weight < 0)
    from_negative = min(n // 2, int(negative.sum()))
    from_positive = min(n - from_negative, int(positive.sum()))
    from_negative = n - from_positive
    return (top_positions(-state.weight, positive, from_positive, generator)
            | top_positions(state.weight, negative, from_negative, generator))


def _required(tensor: torch.Tensor | None, rule: str) -> torch.Tensor:
    if tensor is None:
        raise SparseTrainingError(f"'{rule}' growth needs the gradient of a backward pass before the update")
    return tensor


def grow_random(state: LayerState, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(state.mask.shape, generator=generator)


def grow_unfired(state: LayerState, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(state.mask.shape, generator=generator) + (~state.fired).double()


def grow_gradient(state: LayerState, generator: torch.Generator) -> torch.Tensor:
    return _required(state.dense_grad, "gradient").abs()


def grow_momentum(state: LayerState, generator: torch.Generator) -> torch.Tensor:
    mean = _required(state.grad_mean, "momentum")
    return (mean / (_required(state.grad_sq_mean, "momentum").sqrt() + 1e-8)).abs()


DROP_RULES: dict[str, Callable[[LayerState, int, torch.Generator], torch.Tensor]] = {
    "magnitude": drop_magnitude, "set": drop_set}
GROWTH_RULES: dict[str, Callable[[LayerState, torch.Generator], torch.Tensor]] = {
    "random": grow_random, "unfired": grow_unfired, "gradient": grow_gradient, "momentum": grow_momentum}
GRADIENT_GROWTH = {"gradient", "momentum"}


def check_rule(kind: str, name: str, rules: dict) -> str:
    if name not in rules:
        raise SparseTrainingError(f"unknown {kind} rule '{name}'; available: {', '.join(rules)}")
    return name
