"""The ``retrain:`` stage: recovery training (PERP, full, IMP) or layer-wise reconstruction, for the registry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..errors import SparseforgeError
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


register_stage(StageSpec("retrain", RetrainStage, run_retrain_stage, placement=_placement))
