"""The ``retrain:`` stage: recovery training (PERP, full, IMP) or layer-wise reconstruction, for the registry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..errors import SparseforgeError
from ..evaluation.report import format_value
from ..settings import StrictSettings
from ..stages import StageContext, StageSpec, register_stage
from .lora import LORA_VARIANTS
from .reconstruct import ReconstructConfig
from .recovery import DEFAULT_PARAMS, RETRAIN_METHODS, retrain
from .selection import PARAM_GROUPS


class LoRASettings(StrictSettings):
    variant: Literal[LORA_VARIANTS] = "mask"  # type: ignore[valid-type]
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)


class IMPSettings(StrictSettings):
    sparsity: float = Field(0.5, ge=0, lt=1)
    rounds: int = Field(3, ge=1)


class RetrainStage(StrictSettings):
    """Recovery training; ``reconstruct`` must directly follow a prune stage (it runs inside that stage's
    layer-sequential pass). Training text: the training side of ``data.calibration``, seeded by ``data.seed``."""

    method: Literal[RETRAIN_METHODS] = "perp"  # type: ignore[valid-type]
    params: list[Literal[PARAM_GROUPS]] = Field(default_factory=lambda: list(DEFAULT_PARAMS),  # type: ignore[valid-type]
                                                min_length=1, description="perp/reconstruct: bias, norm, lm_head, lora")
    lora: LoRASettings = LoRASettings()
    steps: int = Field(100, ge=1, description="optimizer steps (reconstruct: per block)")
    lr: float | None = Field(None, gt=0, description="learning rate; default per method")
    batch: int = Field(8, ge=1, description="windows per step (not used by reconstruct: it uses the prune batches)")
    seqlen: int | None = Field(None, ge=2, description="training window length; defaults to data.seqlen")
    warmup: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    imp: IMPSettings = IMPSettings()

    @model_validator(mode="after")
    def _valid_combination(self) -> "RetrainStage":
        if self.method == "reconstruct":
            try:
                ReconstructConfig.from_dict(self.reconstruct_options())
            except SparseforgeError as exc:
                raise ValueError(str(exc)) from None
        return self

    def reconstruct_options(self) -> dict:
        options = {"params": list(self.params), "lora": self.lora.model_dump(), "steps": self.steps,
                   "warmup": self.warmup, "max_grad_norm": self.max_grad_norm}
        return options | ({"lr": self.lr} if self.lr is not None else {})


def run_retrain_stage(handle, config: RetrainStage, context: StageContext) -> None:
    if config.method == "reconstruct":  # already done inside the preceding prune stage
        return
    data = context.recipe.data
    retrain(handle, method=config.method, params=config.params, lora=config.lora.model_dump(), steps=config.steps,
            lr=config.lr, batch=config.batch, seqlen=config.seqlen or data.seqlen, data=data.calibration,
            seed=data.seed, warmup=config.warmup, weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm, gradient_checkpointing=config.gradient_checkpointing,
            imp=config.imp.model_dump(), checkpoint_dir=context.checkpoint_dir, progress=context.progress)


def _placement(index: int, kinds: list[str], config: RetrainStage) -> str | None:
    if config.method == "reconstruct" and (index == 0 or kinds[index - 1] != "prune"):
        return "retrain method 'reconstruct' runs inside pruning, so it must directly follow a prune stage"
    return None


def _retrain_lines(stage: dict) -> list[str]:
    """Recovery training: what was trained, how much of the model that is, the loss, memory, and any early stop."""
    trainable = stage["trainable"]
    what = "+".join(stage.get("params") or []) or "all parameters"
    lora = stage.get("lora")
    lines = [f"- trained: {what}" + (f" (LoRA {lora['variant']}, rank {lora['rank']}, alpha {lora['alpha']:g})"
                                     if lora else "") +
             f": {trainable['trainable']:,} parameters, {trainable['fraction']:.4%} of the model"]
    train = stage["train"]
    lines.append(f"- {train['steps']} steps x {train['batch']} windows x {train['seqlen']} tokens, lr {train['lr']:g}, "
                 f"warm-up {train['warmup']:.0%} then linear decay, {stage['seconds']:.1f} s")
    for run in stage.get("rounds") or [stage.get("training")]:
        prefix = f"round {run['round']} (sparsity {run['sparsity']:.3f}): " if "round" in run else ""
        lines.append(f"- {prefix}loss {format_value(run['loss_first'], 4)} -> {format_value(run['loss_last'], 4)}, "
                     f"peak memory while training {run['peak_memory_mb']:.0f} MB")
        if run.get("stopped"):
            lines.append(f"- **stopped early**: {run['stopped']}")
    if "merge" in stage:
        merge = stage["merge"]
        lines.append(f"- adapters merged into {merge['layers']} linears" +
                     (", LM head untied from the input embedding" if merge["lm_head_untied"] else "") +
                     (f"; {merge['densified_layers']} layers became dense (plain LoRA)" if merge["densified_layers"]
                      else ""))
    lines.append(f"- sparsity pattern preserved exactly: {'yes' if stage['sparsity_preserved'] else 'no'}")
    lines += [f"- note: {note}" for note in trainable.get("notes", [])]
    return lines


def report_retrain_stage(stage: dict, after: dict) -> tuple[str, list[str]]:
    return f"retrain ({stage['method']})", _retrain_lines(stage)


def retrain_losses(index: int, stage: dict) -> dict[str, list[float]]:
    """The loss per step (IMP rounds joined), so a diverging run is seen at a glance."""
    runs = stage.get("rounds") or [stage["training"]]
    return {f"stage {index}: {stage['method']}": [loss for run in runs for loss in run["losses"]]}


register_stage(StageSpec("retrain", RetrainStage, run_retrain_stage, placement=_placement,
                         report=report_retrain_stage, loss_curves=retrain_losses))
