"""The ``search:`` stage: per-block sparsity searched, then the model pruned at the picked point, for the registry."""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import Field, model_validator

from ..errors import SparseforgeError
from ..settings import StrictSettings
from ..stages import StageContext, StageSpec, register_stage
from .api import ALGORITHMS, SearchConfig, check_unpruned, search
from .runner import probe_ray


class SearchStage(StrictSettings):
    """Search per-block sparsity levels (NSGA-II, EvoPress or the sub-network decomposition), then prune the model
    at the front point picked. Calibration text, window count, length and seed from ``data``; the KL objective
    scores its own ``windows`` x ``seqlen``. Starts from a dense model, so it must come before any pruning."""

    algorithm: Literal[ALGORITHMS] = "nsga2"  # type: ignore[valid-type]
    method: str = "wanda"
    pattern: str = Field("unstructured", description="unstructured, or an N:M family such as nm:8 (levels pick N)")
    per_row: bool | None = None
    levels: str | list[float] = Field("0.3:0.9:0.05", description="lo:hi:step or a list of sparsities")
    target: float | None = Field(None, description="evopress: the budget; otherwise the default pick")
    pick: float | None = Field(None, description="average sparsity of the front point to keep (default: target)")
    windows: int = Field(8, ge=1, description="calibration windows scored by the KL objective")
    seqlen: int = Field(128, ge=2)
    batch_size: int = Field(4, ge=1)
    population: int = Field(16, ge=4)
    generations: int = Field(12, ge=1)
    groups: int = Field(5, ge=1, description="decompose: groups of consecutive blocks")
    group_generations: int = Field(12, ge=1)
    gpir_points: int = Field(10, ge=1, description="decompose: front points per group measured in the full model")
    offspring: int = Field(16, ge=1, description="evopress: children per generation")
    stages: list[list[int]] = Field(default_factory=lambda: [[2, 4], [8, 1]],
                                    description="evopress: [windows, survivors] per selection stage")
    workers: int = Field(0, ge=0, description="0: serial; N: N Ray workers")
    ray_address: str | None = None
    ray_timeout: float = Field(10.0, gt=0)
    cache_dir: str | None = None
    cache_budget_gb: float = Field(4.0, gt=0)
    owl_m: float = 5.0
    owl_lam: float = 0.08
    reuse: bool = True

    @model_validator(mode="after")
    def _valid_search(self) -> "SearchStage":
        try:
            self.config().check()
        except SparseforgeError as exc:
            raise ValueError(str(exc)) from None
        if self.pick is None and self.target is None:
            raise ValueError("a search stage needs pick (the average sparsity to keep) or target")
        return self

    def config(self, seed: int = 0) -> SearchConfig:
        return SearchConfig(**self.model_dump(exclude={"pick"}), seed=seed)


def run_search_stage(handle, config: SearchStage, context: StageContext) -> None:
    data = context.recipe.data
    search(handle, config.config(data.seed), pick=config.pick, calibration=data.calibration, nsamples=data.nsamples,
           seqlen=data.seqlen, seed=data.seed, log=lambda message: print(message, file=sys.stderr),
           progress=context.progress)


def preflight_search_stage(handle, config: SearchStage, recipe) -> None:
    check_unpruned(handle)
    search_config = config.config(recipe.data.seed)
    search_config.check(handle)
    if search_config.ray_address:  # an unreachable cluster is found now, not after the variant bank
        probe_ray(search_config.ray_address, search_config.ray_timeout)


register_stage(StageSpec("search", SearchStage, run_search_stage, preflight_search_stage))
