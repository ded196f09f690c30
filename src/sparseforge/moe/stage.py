"""The ``factorize:`` stage (FFNs split into routed experts and trained, FactorLLM) and the restorer of the
``experts`` attachment, for the registry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..models.attachments import register_restorer
from ..settings import StrictSettings
from ..stages import StageContext, StageSpec, must_be_last, register_stage
from .api import factorize_model
from .factorize import check_factorize_request
from .losses import DIRECTIONS
from .partition import PARTITIONS
from .routing import ROUTER_GRADS, ExpertRouting
from .storage import restore_experts


class FactorizeStage(StrictSettings):
    """Split every FFN into routed experts (FactorLLM), train the routers on the Prior-Approximate loss, then the
    experts on the LM loss; evaluation and export then run sparsely. Training text and seed from ``data``."""

    experts: int = Field(4, ge=1, description="experts per FFN (the shared one included); must divide the FFN width")
    topk: int = Field(1, ge=1, description="routed experts run per token")
    partition: Literal[PARTITIONS] = "contiguous"  # type: ignore[valid-type]
    shared_expert: bool = Field(False, description="one expert always runs; the router picks among the others")
    router_steps: int = Field(30, ge=0, description="stage 1 steps (0: untrained, random routers)")
    expert_steps: int = Field(10, ge=0, description="stage 2 steps (0: experts keep the dense weights)")
    router_lr: float = Field(1e-2, gt=0)
    expert_lr: float = Field(1e-3, gt=0)
    batch: int = Field(4, ge=1)
    seqlen: int = Field(256, ge=2)
    pa_weight: float = Field(0.05, ge=0, description="Prior-Approximate loss weight (summed over layers)")
    balance_weight: float = Field(0.01, ge=0, description="load-balancing weight (summed over layers)")
    lm_weight: float = Field(0.0, ge=0, description="LM loss weight in stage 1 (needs router_grad straight_through)")
    router_grad: Literal[ROUTER_GRADS] = "pa_only"  # type: ignore[valid-type]
    direction: Literal[DIRECTIONS] = "reverse_kl"  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _topk_fits(self) -> "FactorizeStage":
        routed = self.experts - int(self.shared_expert)
        if not 1 <= self.topk <= routed:
            raise ValueError(f"topk must be between 1 and the number of routed experts ({routed}), got {self.topk}")
        return self


def run_factorize_stage(handle, config: FactorizeStage, context: StageContext) -> None:
    data = context.recipe.data
    factorize_model(handle, data=data.calibration, seed=data.seed, checkpoint_dir=context.checkpoint_dir,
                    progress=context.progress, **config.model_dump())


def preflight_factorize_stage(handle, config: FactorizeStage, recipe) -> None:
    check_factorize_request(handle, config.experts, config.topk, config.partition, config.shared_expert)


register_stage(StageSpec("factorize", FactorizeStage, run_factorize_stage, preflight_factorize_stage,
                          must_be_last))
register_restorer(ExpertRouting.kind, restore_experts)
