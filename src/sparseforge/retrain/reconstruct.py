"""Layer-wise reconstruction (PERP's "reconstruct" mode), run block by block inside the pruning pipeline.

For each block the pipeline keeps the block's inputs (what the already pruned and reconstructed model upstream
produces) and the dense block's outputs on those inputs. After the block is pruned, the chosen parameters of that
block only (norms, biases, a sparsity-preserving LoRA on its linears) are trained to minimise the mean squared
error between the pruned block's output and the dense output, the adapters are merged, and the next block gets the
reconstructed block's outputs. Memory stays one block's worth, as in pruning: inputs, targets and one block's
gradients. Steps cycle through the calibration batches in a fixed order (the reference's choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from ..errors import RetrainError
from ..models.handle import LoadedModel
from ..prune.hooks import Repair, register_hook
from .lora import SPARSE_VARIANTS, LoRAConfig
from .selection import check_groups, freeze, select_parameters
from .trainer import TrainConfig, train


@dataclass
class ReconstructConfig:
    params: list[str] = field(default_factory=lambda: ["norm", "lora"])
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    steps: int = 50  # per block
    lr: float = 1e-3
    warmup: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**self.lora)
        self.params = check_groups(self.params)
        if "lm_head" in self.params:
            raise RetrainError("reconstruction trains block parameters only; remove 'lm_head' from params")
        if "lora" in self.params and self.lora.variant not in SPARSE_VARIANTS:
            raise RetrainError(f"reconstruction merges each block's adapters into its sparse weights; LoRA variant "
                               f"'{self.lora.variant}' would make them dense (use {', '.join(SPARSE_VARIANTS)})")
        TrainConfig(steps=self.steps, lr=self.lr, warmup=self.warmup, max_grad_norm=self.max_grad_norm)

    @classmethod
    def from_dict(cls, values: dict) -> "ReconstructConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RetrainError(f"unknown reconstruct option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise RetrainError(f"invalid reconstruct options: {exc}") from None


def reconstruct_block(handle: LoadedModel, index: int, inputs: torch.Tensor, targets: torch.Tensor,
                      ranges: list[tuple[int, int]], kwargs: dict[int, dict], config: ReconstructConfig) -> dict:
    """Train block ``index``'s chosen parameters so its output on ``inputs`` matches the dense ``targets``.

    The block's error before and after is measured by the pipeline on outputs it computes anyway (the pruning pass
    and the propagation to the next block), so reconstruction adds no forward pass of its own beyond training.
    """
    torch.manual_seed(config.seed + index)  # adapter initialisation: the same whether or not the run was resumed
    selection = select_parameters(handle, config.params, config.lora, blocks=[index])
    block = handle.adapter.blocks()[index]
    train_config = TrainConfig(steps=config.steps, lr=config.lr, batch=1, seqlen=inputs.shape[1],
                               warmup=config.warmup, max_grad_norm=config.max_grad_norm, seed=config.seed)

    def loss_of_step(step: int) -> torch.Tensor:
        start, stop = ranges[step % len(ranges)]
        out = handle.adapter.run_block(index, inputs[start:stop], kwargs[stop - start])
        return F.mse_loss(out.float(), targets[start:stop].float())

    try:
        report = train(selection.all(), loss_of_step, train_config, block, progress=False)
    finally:
        freeze(handle.model)
    if selection.adapters is not None:
        selection.adapters.merge()
    return {"block": index, "trainable": selection.describe()["trainable"],
            "peak_memory_mb": report["peak_memory_mb"], "stopped": report["stopped"]}


register_hook(Repair("reconstruction",
                     lambda value: value if isinstance(value, ReconstructConfig) else ReconstructConfig.from_dict(value),
                     reconstruct_block))
