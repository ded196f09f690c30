"""The ``search:`` stage: per-block sparsity searched, then the model pruned at the picked point, for the registry."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..errors import SparseforgeError
from ..settings import StrictSettings
from ..stages import StageContext, StageSpec, register_stage
from .api import ALGORITHMS, SearchConfig, check_unpruned, search
from .plots import plot_fronts
from .runner import probe_ray


SEARCH_PLOT = "search_front.png"


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


def _search_lines(stage: dict) -> list[str]:
    """The search: its cost, its front next to the uniform allocations, OWL, and the point kept."""
    counts = stage["evaluations"]
    objective = stage["objective"]
    cache = stage["cache"]
    lines = [f"- objective: {objective['quality']} on {objective['windows']} windows x {objective['seqlen']} tokens; "
             f"size: {objective['size']}",
             f"- {counts['full_model_evaluations']} full-model evaluations ({counts['full_model_tokens']:,} tokens), "
             f"by kind {counts['by_kind']}; {stage['seconds']:.0f} s in all"
             + (f", {stage['workers']} Ray workers" if stage.get("workers") else ", serial"),
             f"- variant cache {cache['directory']}: {cache['used_bytes'] / 2**20:.1f} MB of "
             f"{cache['budget_bytes'] / 2**20:.0f} MB, {cache['evicted']} evicted", ""]
    uniform = {round(p["average_sparsity"], 6): p["kl"] for p in stage["uniform"]}
    lines += ["| average sparsity | KL to dense | uniform at the same sparsity | per-block sparsities |",
              "|---|---|---|---|"]
    for point in stage["front"]:
        same = uniform.get(round(point["average_sparsity"], 6))
        lines.append(f"| {point['average_sparsity']:.4f} | {point['kl']:.4f} | {'-' if same is None else f'{same:.4f}'}"
                     f" | {' '.join(f'{s:.2f}' for s in point['sparsities'])} |")
    if stage.get("owl"):
        owl = stage["owl"]
        lines += ["", f"- OWL at {owl['average_sparsity']:.4f} (M={owl['m']:g}, lambda={owl['lam']:g}): KL {owl['kl']:.4f}"]
    picked = stage.get("picked")
    if picked:
        lines.append(f"- kept: the point at average sparsity {picked['average_sparsity']:.4f} (asked for "
                     f"{picked['target']:g}), KL {picked['kl']:.4f}")
    return lines + ["", f"![Pareto front]({SEARCH_PLOT})"]


def report_search_stage(stage: dict, after: dict) -> tuple[str, list[str]]:
    return (f"sparsity search ({stage['algorithm']}, {stage['settings']['method']} {stage['settings']['pattern']})",
            _search_lines(stage))


def draw_search_figures(directory: Path, report: dict) -> None:
    """The front next to the uniform allocations and OWL."""
    searches = [s for s in report.get("stages") or [] if s.get("stage") == "search"]
    if searches:
        last = searches[-1]
        evopress = last["algorithm"] == "evopress"
        plot_fronts({} if evopress else {last["algorithm"]: last["front"]}, last["uniform"],
                    [last["owl"]] if last.get("owl") else [], last["front"] if evopress else [],
                    directory / SEARCH_PLOT, f"{report['model']['source']}: {last['algorithm']} "
                                             f"({last['settings']['method']})")


register_stage(StageSpec("search", SearchStage, run_search_stage, preflight_search_stage,
                         report=report_search_stage, figures=draw_search_figures))
