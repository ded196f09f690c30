"""The ``skip:`` stage (calibrate an FFN-skip policy on the final weights) and the restorer of the ``skip``
attachment, for the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..models.attachments import register_restorer
from ..settings import StrictSettings
from ..stages import StageContext, StageSpec, must_be_last, register_stage
from .calibrate import calibrate_skip, check_skip_request
from .plots import plot_skip_profile
from .policy import SIMILARITIES
from .runtime import SkipController, restore_policy


SKIP_PLOT = "skip_profile.png"


class SkipStage(StrictSettings):
    """Calibrate an input-adaptive FFN-skip policy (FFN-SkipLLM) for the final model; evaluation and export then run
    with it. Calibration text and seed from ``data``."""

    target: float = Field(0.25, description="share of all FFN blocks to skip on generated tokens, in (0, 1)")
    k: int | None = Field(None, ge=1, description="FFNs skipped after a saturated one (default: searched, 1-4)")
    similarity: Literal[SIMILARITIES] = "residual"  # type: ignore[valid-type]
    cold_start: int | None = Field(None, ge=0, description="first layers never skipped (default: from calibration)")
    cold_end: int | None = Field(None, ge=0, description="last layers never skipped (default: from calibration)")
    warmup: int = Field(0, ge=0, description="generated tokens decoded densely before skipping starts")
    nsamples: int = Field(8, ge=1, description="calibration prompts")
    prompt_tokens: int = Field(48, ge=1)
    new_tokens: int = Field(32, ge=1, description="tokens the dense model generates per calibration prompt")
    tolerance: float = Field(0.005, gt=0, description="how close to the target the calibration ratio must get")

    @field_validator("target")
    @classmethod
    def _in_range(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"target skip ratio {value:g} is outside (0, 1)")
        return value


def run_skip_stage(handle, config: SkipStage, context: StageContext) -> None:
    data = context.recipe.data
    calibrate_skip(handle, target=config.target, k=config.k, similarity=config.similarity,
                   cold_start=config.cold_start, cold_end=config.cold_end, warmup=config.warmup,
                   calibration=data.calibration, nsamples=config.nsamples, prompt_tokens=config.prompt_tokens,
                   new_tokens=config.new_tokens, seed=data.seed, tolerance=config.tolerance, progress=context.progress)


def preflight_skip_stage(handle, config: SkipStage, recipe) -> None:
    check_skip_request(handle.adapter.num_blocks, config.target, config.cold_start, config.cold_end)


def _skip_lines(stage: dict, after: dict) -> list[str]:
    """A calibrated FFN-skip policy: its settings, how well calibration hit the target, what it skipped here."""
    policy = stage["policy"]
    calibration = policy["calibration"]
    lines = [f"- policy: {policy['mode']}, threshold {policy['threshold']:.4f}, k {policy['k']}, "
             f"{policy['similarity']} similarity, cold layers {policy['cold_start']} + {policy['cold_end']}, "
             f"warm-up {policy['warmup']} tokens ({stage['seconds']:.1f} s)",
             f"- target ratio {calibration['target']:g}: {calibration['ratio_teacher_forced']:.3f} on the "
             f"calibration text, {calibration['ratio_in_generation']:.3f} when generating from its prompts; "
             f"top-1 agreement with the dense model there {calibration['agreement']:.3f}",
             "- candidates: " + "; ".join(f"k {c['k']} cold {c['cold_start']}+{c['cold_end']}: threshold "
                                          f"{c['threshold']:.4f}, ratio {c['ratio']:.3f}, KL {c['kl']:.3f}, "
                                          f"agreement {c['agreement']:.3f}" for c in calibration["candidates"])]
    for part, summary in (after.get("skip") or {}).items():
        if isinstance(summary, dict):
            lines.append(f"- realised in {part}: {summary['ratio']:.3f} of all FFN blocks over "
                         f"{summary['governed_tokens']:,} governed tokens ({summary['warmup_tokens']:,} warm-up "
                         f"tokens dense)")
    return lines


def report_skip_stage(stage: dict, after: dict) -> tuple[str, list[str]]:
    lines = _skip_lines(stage, after) + ["", f"![where FFNs are skipped]({SKIP_PLOT})"]
    return f"FFN skipping ({stage['method']})", lines


def draw_skip_figures(directory: Path, report: dict) -> None:
    """Where the policy skips: its cold layers and, per layer, the skip rate realised in each measurement."""
    skips = [s for s in report.get("stages") or [] if s.get("stage") == "skip"]
    if skips:
        measured = (report["metrics"].get("after") or {}).get("skip") or {}
        rates = {f"in {part}": s["per_layer"] for part, s in measured.items() if isinstance(s, dict)}
        plot_skip_profile(skips[-1]["policy"], rates, directory / SKIP_PLOT, report["model"]["source"])


register_stage(StageSpec("skip", SkipStage, run_skip_stage, preflight_skip_stage, must_be_last,
                         report=report_skip_stage, figures=draw_skip_figures))
register_restorer(SkipController.kind, restore_policy)
