"""The ``dst:`` stage: dynamic sparse training of a language model's linears, for the registry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..settings import StrictSettings
from ..stages import StageContext, StageSpec, must_be_first, register_stage
from .engine import METHODS as DST_METHODS
from .lm import check_dense, sparse_train_lm
from .masks import MASK_INITS


class DstStage(StrictSettings):
    """Dynamic sparse training of the adapter's linears (SET, RigL, SNFS) on the recipe's training text; the final
    masks become the model's pruning masks. Starts from a dense model, so it must be the first stage."""

    method: Literal[tuple(m for m in DST_METHODS)] = "rigl"  # type: ignore[valid-type]
    density: float = Field(0.5, gt=0, le=1, description="share of each layer's weights kept")
    init: Literal[MASK_INITS] = "erk"  # type: ignore[valid-type]
    from_scratch: bool = Field(True, description="re-initialise the weights (sparse training from scratch)")
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch: int = Field(8, ge=1)
    seqlen: int = Field(256, ge=2)
    delta_t: int = Field(100, ge=1, description="optimizer steps between topology updates")
    drop_fraction: float = Field(0.3, ge=0, lt=1, description="share of active weights rewired at the first update")
    stop_fraction: float = Field(0.75, ge=0, le=1, description="no topology updates after this share of the steps")


def run_dst_stage(handle, config: DstStage, context: StageContext) -> None:
    data = context.recipe.data
    sparse_train_lm(handle, data=data.calibration, seed=data.seed, progress=context.progress, **config.model_dump())


def preflight_dst_stage(handle, config: DstStage, recipe) -> None:
    check_dense(handle)


def _dst_lines(stage: dict) -> list[str]:
    """Sparse training: where it started, how many topology updates rewired how many weights, the loss."""
    start = "from scratch (re-initialised)" if stage["from_scratch"] else "from the loaded weights"
    return [f"- {stage['init']} masks at density {stage['density']:.3f}, {start}",
            f"- {stage['steps_done']} steps, {stage['updates']} topology updates rewiring {stage['rewired']:,} weights "
            f"({stage['seconds']:.1f} s)",
            f"- loss {stage['loss_first']} -> {stage['loss_last']}"]


def report_dst_stage(stage: dict, after: dict) -> tuple[str, list[str]]:
    return f"dynamic sparse training ({stage['method']})", _dst_lines(stage)


register_stage(StageSpec("dst", DstStage, run_dst_stage, preflight_dst_stage, must_be_first, report=report_dst_stage))
