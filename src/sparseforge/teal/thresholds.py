"""Calibrated activation thresholds, checked and stored: per block and site, the magnitude below which an input
entry is zeroed, the sparsity it was chosen for, and the model it belongs to.

The file (``activation_sparsity.json``) sits next to the model's weights. It keeps, besides the thresholds, the
magnitude quantiles of every site on the calibration text, so a different target or allocation is a new choice of
thresholds from the same statistics, not a new calibration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..atomic import atomic_write_text
from ..errors import ActivationSparsityError
from ..models.fingerprint import require_same_model
from ..settings import read_json_settings
from .sites import SITES

THRESHOLDS_FILE = "activation_sparsity.json"
ALLOCATIONS = ("uniform", "greedy", "searched")
GRID = tuple(i / 100 for i in range(100))  # quantile levels kept per site: sparsity 0.00 .. 0.99


def check_target(target: float) -> float:
    if not 0 <= target < 1:
        raise ActivationSparsityError(f"activation sparsity target {target:g} is outside [0, 1)")
    return target


def threshold_at(quantiles: list[float], sparsity: float) -> float:
    """The magnitude below which ``sparsity`` of a site's entries fall, interpolated in its quantile grid; 0 for
    sparsity 0 (nothing is zeroed, exactly)."""
    if sparsity <= 0:
        return 0.0
    position = min(sparsity, GRID[-1]) * 100
    low = int(position)
    high = min(low + 1, len(quantiles) - 1)
    return float(quantiles[low] + (quantiles[high] - quantiles[low]) * (position - low))


class ActivationThresholds(BaseModel):
    """Per block (list index) and site (key): the allocated sparsity, its threshold and the site's magnitude
    quantiles at :data:`GRID`; ``weights`` is each site's weight count (what a zeroed entry saves)."""

    model_config = ConfigDict(extra="forbid")

    target: float = Field(ge=0, lt=1, description="model-wide sparsity, weighted by the weights each site reads")
    allocation: Literal[ALLOCATIONS] = "uniform"  # type: ignore[valid-type]
    sparsity: list[dict[str, float]]
    thresholds: list[dict[str, float]]
    quantiles: list[dict[str, list[float]]]
    weights: list[dict[str, int]]
    model: dict = Field(default_factory=dict, description="fingerprint of the model these were calibrated on")
    calibration: dict = Field(default_factory=dict, description="how they were calibrated")

    def check(self, num_blocks: int) -> None:
        for name, table in (("sparsity", self.sparsity), ("thresholds", self.thresholds),
                            ("quantiles", self.quantiles), ("weights", self.weights)):
            if len(table) != num_blocks:
                raise ActivationSparsityError(f"activation thresholds have {len(table)} blocks of {name}, the "
                                              f"model has {num_blocks}")
        for block, sites in enumerate(self.sparsity):
            for site, value in sites.items():
                if site not in SITES:
                    raise ActivationSparsityError(f"block {block}: unknown site '{site}' (known: {', '.join(SITES)})")
                if not 0 <= value < 1:
                    raise ActivationSparsityError(f"block {block} {site}: sparsity {value:g} is outside [0, 1)")

    def overall(self, sparsity: list[dict[str, float]] | None = None) -> float:
        """Model-wide sparsity of an allocation (default: this one), weighted by the weights each site reads."""
        sparsity = self.sparsity if sparsity is None else sparsity
        total = sum(w for block in self.weights for w in block.values())
        saved = sum(block[site] * self.weights[b][site] for b, block in enumerate(sparsity) for site in block)
        return saved / total if total else 0.0

    def with_allocation(self, sparsity: list[dict[str, float]], allocation: str, target: float
                        ) -> "ActivationThresholds":
        """The same statistics with another allocation: thresholds read from the quantiles."""
        thresholds = [{site: threshold_at(self.quantiles[b][site], value) for site, value in block.items()}
                      for b, block in enumerate(sparsity)]
        return self.model_copy(update={"sparsity": sparsity, "thresholds": thresholds, "allocation": allocation,
                                       "target": target})

    def uniform(self, target: float) -> "ActivationThresholds":
        check_target(target)
        return self.with_allocation([{site: target for site in block} for block in self.weights], "uniform", target)


def check_fingerprint(thresholds: ActivationThresholds, adapter, origin: str) -> None:
    require_same_model(thresholds.model, adapter, origin, ActivationSparsityError,
                       "calibrate activation sparsity again")


def save_thresholds(thresholds: ActivationThresholds, directory: str | Path) -> Path:
    path = Path(directory) / THRESHOLDS_FILE
    atomic_write_text(path, json.dumps(thresholds.model_dump(mode="json")))
    return path


def read_thresholds(path: str | Path) -> ActivationThresholds:
    """Thresholds from a JSON file (a directory means its ``activation_sparsity.json``), with one-line errors."""
    path = Path(path)
    if path.is_dir():
        path = path / THRESHOLDS_FILE
    return read_json_settings(path, ActivationThresholds, ActivationSparsityError, "activation thresholds")
