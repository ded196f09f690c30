"""The ``shrink:`` and ``finercut:`` stages (width pruning; sub-layer and block removal), for the registry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..settings import StrictSettings
from ..stages import StageContext, StageSpec, before_pruning, register_stage
from .blocks import check_block_request, remove_blocks
from .divergence import DISTANCES
from .finercut import check_finercut_request, finercut
from .importance import SCORES
from .width import HEAD_UNITS, ShrinkConfig, check_shrink_request, shrink


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


register_stage(StageSpec("shrink", ShrinkStage, run_shrink_stage, preflight_shrink_stage, before_pruning))
register_stage(StageSpec("finercut", FinerCutStage, run_finercut_stage, preflight_finercut_stage,
                          before_pruning))
