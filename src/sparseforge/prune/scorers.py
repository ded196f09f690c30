"""Importance scores for the weights of one linear layer, registered by name.

A scorer maps a layer (and, for calibrated methods, its input statistics) to a score matrix in [out, in]
orientation; higher means more important. Patterns and allocations turn scores into masks, so a new scorer needs
no change anywhere else. Calibrated scorers (Wanda, SparseGPT) set ``needs_calibration`` and receive the
statistics gathered by the layer-sequential pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PatternError
from ..models.adapters import LinearView


@dataclass(frozen=True)
class Scorer:
    name: str
    score: Callable[[LinearView, object], torch.Tensor]
    needs_calibration: bool = False
    description: str = ""


def _magnitude(view: LinearView, stats: object = None) -> torch.Tensor:
    return view.weight.detach().abs().float()


SCORERS: dict[str, Scorer] = {
    "magnitude": Scorer("magnitude", _magnitude, description="|W|: no data needed"),
}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise PatternError(f"unknown pruning method '{name}'; available: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]
