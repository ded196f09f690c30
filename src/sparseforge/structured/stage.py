"""The ``shrink:`` and ``finercut:`` stages (width pruning; sub-layer and block removal), for the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..settings import StrictSettings
from ..stages import StageContext, StageSpec, before_pruning, register_stage
from .blocks import check_block_request, remove_blocks
from .divergence import DISTANCES
from .finercut import check_finercut_request, finercut
from .importance import SCORES
from .plots import plot_divergence, plot_structure
from .width import HEAD_UNITS, ShrinkConfig, check_shrink_request, shrink


STRUCTURE_PLOT = "structure.png"
DIVERGENCE_PLOT = "finercut_divergence.png"


def _check_ratios(value: float | list[float]) -> float | list[float]:
    for ratio in [value] if isinstance(value, (int, float)) else value:
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio {ratio:g} is outside [0, 1)")
    return value


class ShrinkStage(StrictSettings):
    """Width pruning: remove FFN neurons and attention heads physically; calibration from the recipe's ``data``."""

    ffn: float | list[float] = Field(0.0, description="fraction of FFN neurons to remove, one value or one per block")
    heads: float | list[float] = Field(0.0, description="fraction of query heads to remove, one value or per block")
    score: Literal[SCORES] = "fluctuation"  # type: ignore[valid-type]
    round_to: int = Field(1, ge=1, description="keep FFN widths a multiple of this (8, 64, ...)")
    head_unit: Literal[HEAD_UNITS] = "auto"  # type: ignore[valid-type]
    compensate: bool = Field(False, description="add removed channels' mean contribution to the output bias")
    batch_size: int = Field(8, ge=1)

    _ratios = field_validator("ffn", "heads")(classmethod(lambda cls, value: _check_ratios(value)))


class FinerCutStage(StrictSettings):
    """Remove whole sub-layers: greedily by output divergence (``unit: sublayer``, FinerCut) or whole blocks by
    input/output similarity (``unit: block``). Calibration text and seed from ``data``; its own window count."""

    remove: float = Field(0.25, gt=0, description="fraction of sub-layers (or blocks) to remove, or a count if >= 1")
    unit: Literal["sublayer", "block"] = "sublayer"
    distance: Literal[DISTANCES] = "js"  # type: ignore[valid-type]
    exclude: float = Field(0.0, ge=0, lt=1, description="protect the first blocks until this fraction is removed")
    nsamples: int = Field(8, ge=1)
    seqlen: int = Field(128, ge=2)
    batch_size: int = Field(4, ge=1)


def run_shrink_stage(handle, config: ShrinkStage, context: StageContext) -> None:
    data = context.recipe.data
    shrink(handle, ffn=config.ffn, heads=config.heads, score=config.score, round_to=config.round_to,
           head_unit=config.head_unit, compensate=config.compensate, calibration=data.calibration,
           nsamples=data.nsamples, seqlen=data.seqlen, seed=data.seed, batch_size=config.batch_size,
           progress=context.progress)


def run_finercut_stage(handle, config: FinerCutStage, context: StageContext) -> None:
    data = context.recipe.data
    common = {"calibration": data.calibration, "nsamples": config.nsamples, "seqlen": config.seqlen,
              "seed": data.seed, "batch_size": config.batch_size, "progress": context.progress}
    if config.unit == "block":
        remove_blocks(handle, count=config.remove, **common)
    else:
        finercut(handle, remove=config.remove, distance_name=config.distance, exclude=config.exclude,
                 checkpoint_dir=context.checkpoint_dir, **common)


def preflight_shrink_stage(handle, config: ShrinkStage, recipe) -> None:
    check_shrink_request(handle, ShrinkConfig(ffn=config.ffn, heads=config.heads, score=config.score,
                                              round_to=config.round_to, head_unit=config.head_unit,
                                              compensate=config.compensate))


def preflight_finercut_stage(handle, config: FinerCutStage, recipe) -> None:
    if config.unit == "block":
        check_block_request(handle, config.remove, None)
    else:
        check_finercut_request(handle, config.remove, config.distance, config.exclude)


def _structure_lines(stage: dict) -> list[str]:
    """A structural change: parameters before and after, what was removed, and how the export loads."""
    params = stage["parameters"]
    lines = [f"- parameters {params['before']:,} -> {params['after']:,} ({params['removed_fraction']:.1%} removed), "
             f"{stage['seconds']:.1f} s"]
    if stage["method"] == "width":
        settings = stage["settings"]
        lines.append(f"- removed FFN {settings['ffn']} and heads {settings['heads']} (score {settings['score']}, "
                     f"widths rounded to {settings['round_to']}, head unit {settings['head_unit']}"
                     f"{', mean contribution compensated' if settings['compensate'] else ''})")
    else:
        order = ", ".join(f"{r['kind']}@{r['block']}" for r in stage["removed"])
        lines.append(f"- removed in this order: {order or 'nothing'}")
    lines.append("- export loads with plain transformers `from_pretrained`" if stage["transformers_loadable"] else
                 "- per-block shapes differ from the standard config: the export records them in `config.json` "
                 "(`sparseforge_structure`) and `sparseforge.load_model` rebuilds them")
    return lines


def report_structural_stage(stage: dict, after: dict) -> tuple[str, list[str]]:
    lines = _structure_lines(stage) + ["", f"![structure per block]({STRUCTURE_PLOT})"]
    if stage["method"] == "finercut":
        lines += ["", f"![FinerCut divergence]({DIVERGENCE_PLOT})"]
    return f"{stage['stage']} ({stage['method']})", lines


def draw_structure_figures(directory: Path, report: dict) -> None:
    """The widths per block after the last structural stage, and FinerCut's divergence per removal."""
    structural = [s for s in report.get("stages") or [] if s.get("stage") in ("shrink", "finercut")]
    if structural:
        last = structural[-1]
        plot_structure(last["blocks"], last["original"], directory / STRUCTURE_PLOT, report["model"]["source"])
    searched = [s for s in structural if s["method"] == "finercut"]
    if searched:
        plot_divergence(searched[-1]["removed"], directory / DIVERGENCE_PLOT, searched[-1]["settings"]["distance"])


register_stage(StageSpec("shrink", ShrinkStage, run_shrink_stage, preflight_shrink_stage, before_pruning,
                         report=report_structural_stage, figures=draw_structure_figures))
register_stage(StageSpec("finercut", FinerCutStage, run_finercut_stage, preflight_finercut_stage,
                         before_pruning, report=report_structural_stage, figures=draw_structure_figures))
