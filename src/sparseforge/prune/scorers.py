"""Importance scores for the weights of one linear layer, registered by name.

A scorer maps a layer (and, for calibrated scores, the statistics of its input) to a score matrix in [out, in]
orientation; higher means more important. Patterns and allocations turn scores into masks, so a new scorer needs
no change anywhere else. Scores are also what OWL (outlier ratios) and DSnoT (which kept weight to drop) read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..models.adapters import LinearView
from ..calibration.statistics import InputStatistics


@dataclass(frozen=True)
class Scorer:
    name: str
    score: Callable[[torch.Tensor, InputStatistics | None], torch.Tensor]
    needs: frozenset[str] = frozenset()
    description: str = ""

    def __call__(self, view: LinearView, stats: InputStatistics | None = None) -> torch.Tensor:
        return self.score(view.weight.detach(), stats)


def magnitude_scores(weight: torch.Tensor, stats: InputStatistics | None = None) -> torch.Tensor:
    return weight.abs().float()


def wanda_scores(weight: torch.Tensor, stats: InputStatistics) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al., 2023): a weight matters as much as the input it multiplies."""
    return weight.abs().float() * stats.norms().to(weight.device).unsqueeze(0)


SCORERS: dict[str, Scorer] = {
    "magnitude": Scorer("magnitude", magnitude_scores, description="|W|: no data needed"),
    "wanda": Scorer("wanda", wanda_scores, frozenset({"norms"}), description="|W| * ||X||: calibrated, no update"),
}

