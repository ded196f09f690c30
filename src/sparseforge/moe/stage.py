"""The ``factorize:`` stage (FFNs split into routed experts and trained, FactorLLM) and the restorer of the
``experts`` attachment, for the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..models.attachments import register_restorer
from ..settings import StrictSettings
from ..stages import StageContext, StageSpec, must_be_last, register_stage
from .api import factorize_model
from .factorize import check_factorize_request
from .losses import DIRECTIONS
from .partition import PARTITIONS
from .plots import plot_expert_usage
from .routing import ROUTER_GRADS, ExpertRouting
from .storage import restore_experts


EXPERTS_PLOT = "expert_usage.png"


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


def _experts_lines(stage: dict, after: dict) -> list[str]:
    """A factorized model: its experts, the training budget and losses, the ideal speed-up, how balanced routing is."""
    settings, training = stage["settings"], stage["settings"]["training"]
    cost = stage["cost"]
    lines = [f"- {settings['experts']} experts ({'1 shared + ' if settings['shared_expert'] else ''}top-"
             f"{settings['topk']} routed), {settings['partition']} partition ({stage['seconds']:.1f} s)",
             f"- training: {training['router_steps']} router steps (lr {training['router_lr']:g}) + "
             f"{training['expert_steps']} expert steps (lr {training['expert_lr']:g}) x {training['batch']} x "
             f"{training['seqlen']} tokens = {training['train_tokens']:,} tokens"]
    for part, losses in stage["losses"].items():
        if losses:
            lines.append(f"- {part} loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
    lines.append(f"- FFN multiply-accumulates per token: {cost['ffn_macs_per_token']['dense'] / 1e6:.1f}M dense -> "
                 f"{cost['ffn_macs_per_token']['routed'] / 1e6:.1f}M routed; ideal speed-up prefill "
                 f"{cost['prefill']:.2f}x, decode {cost['decode']:.2f}x (prompt {cost['prompt_tokens']}, "
                 f"{cost['new_tokens']} new tokens)")
    usage = after.get("experts")
    if usage:
        balance = [b for b in usage["balance"] if b is not None]
        if balance:
            lines.append(f"- routing balance over the evaluation (1 = even): mean {sum(balance) / len(balance):.2f}, "
                         f"worst layer {min(balance):.2f}")
    return lines


def report_factorize_stage(stage: dict, after: dict) -> tuple[str, list[str]]:
    return (f"factorized into experts ({stage['method']})",
            _experts_lines(stage, after) + ["", f"![expert usage per layer]({EXPERTS_PLOT})"])


def factorize_losses(index: int, stage: dict) -> dict[str, list[float]]:
    return {f"stage {index}: {part}": losses for part, losses in stage["losses"].items()}


def draw_experts_figures(directory: Path, report: dict) -> None:
    """How often each expert ran, per layer, over the evaluation."""
    usage = (report["metrics"].get("after") or {}).get("experts")
    if usage and usage["tokens"]:
        plot_expert_usage(usage["per_layer"], directory / EXPERTS_PLOT, f"{report['model']['source']}: "
                          f"{usage['settings']}")


register_stage(StageSpec("factorize", FactorizeStage, run_factorize_stage, preflight_factorize_stage,
                         must_be_last, report=report_factorize_stage, figures=draw_experts_figures,
                         loss_curves=factorize_losses))
register_restorer(ExpertRouting.kind, restore_experts)
