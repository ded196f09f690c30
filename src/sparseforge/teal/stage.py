"""The ``activation_sparsity:`` stage (calibrate TEAL thresholds on the final weights) and the restorer of the
``activation_sparsity`` attachment, for the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..models.attachments import register_restorer
from ..settings import StrictSettings
from ..stages import StageContext, StageSpec, must_be_last, register_stage
from .calibrate import calibrate_activation_sparsity
from .plots import plot_activation_sparsity
from .runtime import ActivationSparsity, restore_thresholds

PLOT = "activation_sparsity.png"


class ActivationSparsityStage(StrictSettings):
    """Calibrate per-site activation thresholds (TEAL) for the final model; evaluation and export then run with
    them. Calibration text and seed from ``data``."""

    target: float = Field(0.4, description="model-wide share of input entries zeroed, weighted by the weights "
                                           "each reads, in [0, 1)")
    allocation: Literal["uniform", "greedy", "searched"] = "greedy"
    nsamples: int = Field(16, ge=1, description="calibration windows")
    seqlen: int = Field(512, ge=2)
    greedy_windows: int = Field(4, ge=1, description="windows the greedy walk runs each block on")
    step: float = Field(0.05, gt=0, le=0.5, description="greedy increment of one site's sparsity")
    generations: int = Field(20, ge=1, description="searched: EvoPress generations")

    @field_validator("target")
    @classmethod
    def _in_range(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"activation sparsity target {value:g} is outside [0, 1)")
        return value


def run_stage(handle, config: ActivationSparsityStage, context: StageContext) -> None:
    data = context.recipe.data
    calibrate_activation_sparsity(handle, config.target, config.allocation, data.calibration, config.nsamples,
                                  config.seqlen, data.seed, config.greedy_windows, config.step, config.generations,
                                  context.progress)


def report_stage(stage: dict, after: dict) -> tuple[str, list[str]]:
    realised = stage["realised"]
    lines = [f"- target {stage['target']:g}, {stage['method']} allocation: {stage['allocated']:.3f} of the weights "
             f"read allocated, {realised['overall']:.3f} realised on the calibration text ({stage['seconds']:.1f} s)",
             "", f"![activation sparsity per block and site]({PLOT})"]
    return "Activation sparsity (TEAL)", lines


def draw_figures(directory: Path, report: dict) -> None:
    stages = [s for s in report.get("stages") or [] if s.get("stage") == "activation_sparsity"]
    if stages:
        plot_activation_sparsity(stages[-1], directory / PLOT, report["model"]["source"])


register_stage(StageSpec("activation_sparsity", ActivationSparsityStage, run_stage, None, must_be_last,
                         report=report_stage, figures=draw_figures))
register_restorer(ActivationSparsity.kind, restore_thresholds)
