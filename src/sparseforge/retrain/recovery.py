"""Recovery after pruning, the public entry point: PERP, full masked retraining, iterative magnitude pruning.

* ``perp``: train only the chosen parameter groups (:mod:`.selection`) on the causal-LM loss, then merge the
  adapters. With a sparsity-preserving LoRA variant the merged model has exactly the masks it had before.
* ``full``: every parameter trains; pruned weights are held at zero by the sparsity core's mask
  parametrization, so the mask is fixed. The classical, expensive reference.
* ``imp``: iterative magnitude pruning: ``rounds`` times, prune a fraction of the remaining weights by magnitude
  and retrain fully with the mask fixed, splitting the step budget evenly, reaching ``sparsity`` at the end.
* ``reconstruct`` (layer-wise reconstruction) runs inside the layer-sequential pruning pipeline, where the dense
  block outputs exist: see :func:`sparseforge.prune`'s ``reconstruct`` argument and :mod:`.reconstruct`.

A model without masks is refused for ``perp`` and ``full`` unless it was shrunk (its structure is recorded):
otherwise there is nothing to recover, and a silent dense fine-tune would be mistaken for recovery. A shrunk
model is dense, so its LoRA adapters merge with all-ones masks. IMP prunes by itself and accepts a dense model.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import RetrainError
from ..models.handle import LoadedModel
from ..models.structure import structure_of
from ..sparsity.masks import check_masks_hold, enforce_masks, release_masks
from ..sparsity.patterns import check_sparsity
from .data import batch_for_step, training_windows
from .lora import LoRAConfig
from .selection import check_groups, freeze, select_parameters
from .trainer import TrainConfig, checkpoint_path, train

RETRAIN_METHODS = ("perp", "reconstruct", "full", "imp")
DEFAULT_LR = {"perp": 5e-4, "reconstruct": 1e-3, "full": 2e-5, "imp": 2e-5}
DEFAULT_PARAMS = ("norm", "lora")


@dataclass
class IMPConfig:
    sparsity: float = 0.5
    rounds: int = 3

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise RetrainError(f"IMP rounds must be a positive integer, got {self.rounds!r}")

    def round_sparsity(self, round_index: int) -> float:
        """Each round removes the same fraction of the remaining weights: density (1 - s)^(r / R) after round r."""
        return 1.0 - (1.0 - self.sparsity) ** ((round_index + 1) / self.rounds)


def lm_loss(handle: LoadedModel, windows: torch.Tensor, config: TrainConfig):
    """Causal-LM loss on step ``step``'s windows; under ``accelerate launch`` each process takes its own share of
    a global batch of ``batch x processes`` windows."""
    from accelerate import PartialState

    device = next(handle.model.parameters()).device
    processes = PartialState()
    world, rank = processes.num_processes, processes.process_index

    def loss_of_step(step: int) -> torch.Tensor:
        ids = batch_for_step(windows, step, config.batch * world, config.seed)[rank::world].to(device)
        return handle.model(input_ids=ids, labels=ids, use_cache=False).loss

    return loss_of_step


def _settings(handle: LoadedModel, method: str, extra: dict) -> dict:
    return {"model": handle.source, "method": method, "masks": sorted(handle.masks), **extra}


def _check_pruned(handle: LoadedModel, method: str) -> None:
    """A model must have lost something: pruning masks, or structure (a shrunk model, recorded in its config)."""
    if not handle.masks and structure_of(handle.adapter) is None:
        raise RetrainError(f"{handle.source} has no pruned weights and was not shrunk, so '{method}' has nothing to "
                           "recover; prune or shrink it first (or use method 'imp', which prunes by itself)")


def _verify_sparsity(handle: LoadedModel, masks_before: dict[str, torch.Tensor]) -> bool:
    """Every weight pruned before retraining is still exactly zero, and no mask changed (a bug otherwise)."""
    kept = {name: mask for name, mask in masks_before.items() if name in handle.masks}
    broken = check_masks_hold(handle.adapter, kept)
    if broken:
        raise RetrainError(f"retraining revived pruned weights in {len(broken)} layer(s), e.g. {broken[0]}")
    return len(kept) == len(masks_before)


def _full(handle: LoadedModel, windows, config: TrainConfig, checkpoint_dir, settings, progress, on_step,
          desc: str) -> dict:
    for p in handle.model.parameters():
        p.requires_grad_(True)
    enforce_masks(handle.adapter, handle.masks)
    params = [p for p in handle.model.parameters() if p.requires_grad]  # the parametrized originals
    try:
        report = train(params, lm_loss(handle, windows, config), config, handle.model, checkpoint_dir, settings,
                       progress, desc, on_step)
    finally:
        release_masks(handle.adapter)
        freeze(handle.model)
    report["trainable"] = {"trainable": sum(p.numel() for p in params), "fraction": 1.0}
    return report


def retrain(
    handle: LoadedModel,
    method: str = "perp",
    params: list[str] | tuple[str, ...] = DEFAULT_PARAMS,
    lora: dict | LoRAConfig | None = None,
    steps: int = 100,
    lr: float | None = None,
    batch: int = 8,
    seqlen: int = 512,
    data: str | torch.Tensor = "default",
    seed: int = 0,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    gradient_checkpointing: bool = False,
    imp: dict | IMPConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 25,
    progress: bool = True,
    on_step=None,
) -> LoadedModel:
    """Recover a pruned model's quality in place; a report is appended to ``handle.history``.

    ``method``: perp, full or imp (reconstruct runs inside :func:`sparseforge.prune`). ``params`` (perp): any of
    bias, norm, lm_head, lora. ``lora``: {variant: mask|scale|plain|prune_at_merge, rank, alpha}. Training:
    ``steps`` AdamW steps of ``batch`` packed windows of ``seqlen`` tokens from the training side of ``data``,
    learning rate ``lr`` (default per method) with ``warmup`` then linear decay. ``imp``: {sparsity, rounds}.
    ``checkpoint_dir``: save every ``checkpoint_every`` steps and resume from there. ``on_step(step)`` is called
    after every update.
    """
    if method not in RETRAIN_METHODS:
        raise RetrainError(f"unknown retraining method '{method}'; available: {', '.join(RETRAIN_METHODS)}")
    if method == "reconstruct":
        raise RetrainError("layer-wise reconstruction runs inside pruning, where the dense block outputs exist: "
                           "pass reconstruct={...} to prune(), or put the retrain stage right after a prune stage")
    lora = lora if isinstance(lora, LoRAConfig) else LoRAConfig(**(lora or {}))
    config = TrainConfig(steps=steps, lr=lr if lr is not None else DEFAULT_LR[method], batch=batch, seqlen=seqlen,
                         warmup=warmup, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
                         gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every)
    groups = check_groups(list(params)) if method == "perp" else []
    imp_config = (imp if isinstance(imp, IMPConfig) else IMPConfig(**(imp or {}))) if method == "imp" else None
    if method != "imp":
        _check_pruned(handle, method)
    windows = training_windows(handle, data, seqlen)
    masks_before = {name: mask.clone() for name, mask in handle.masks.items()}
    started = time.perf_counter()
    settings = _settings(handle, method, {"params": groups, "lora": asdict(lora), "data_windows": len(windows)})
    record: dict = {"stage": "retrain", "method": method, "train": asdict(config),
                    "data": {"windows": windows.shape[0], "seqlen": windows.shape[1],
                             "tokens_per_step": config.batch * config.seqlen}}
    if method == "perp":
        torch.manual_seed(seed)  # adapter initialisation
        selection = select_parameters(handle, groups, lora)
        record.update(params=groups, lora=asdict(lora) if "lora" in groups or "lm_head" in groups else None,
                      trainable=selection.describe())
        try:
            record["training"] = train(selection.all(), lm_loss(handle, windows, config), config, handle.model,
                                       checkpoint_dir, settings, progress, f"PERP {'+'.join(groups)}", on_step)
        finally:
            freeze(handle.model)
        if selection.adapters is not None:
            record["merge"] = selection.adapters.merge()
    elif method == "full":
        record["training"] = _full(handle, windows, config, checkpoint_dir, settings, progress, on_step,
                                   "full masked retraining")
        record["trainable"] = record["training"].pop("trainable")
    else:
        record["imp"] = asdict(imp_config)
        record["rounds"] = _imp(handle, windows, config, imp_config, checkpoint_dir, settings, progress, on_step)
        masks_before = {}
    record["sparsity_preserved"] = _verify_sparsity(handle, masks_before)
    record["seconds"] = round(time.perf_counter() - started, 3)
    handle.history.append(record)
    return handle


def _imp(handle, windows, config: TrainConfig, imp: IMPConfig, checkpoint_dir, settings, progress, on_step) -> list:
    from ..prune.pruner import prune

    base_steps, extra = divmod(config.steps, imp.rounds)
    if base_steps < 1:
        raise RetrainError(f"IMP needs at least one step per round: {config.steps} steps for {imp.rounds} rounds")
    rounds = []
    for index in range(imp.rounds):
        target = imp.round_sparsity(index)
        prune(handle, method="magnitude", sparsity=target, progress=False)
        handle.history.pop()  # the round is recorded in the IMP report instead
        round_config = TrainConfig(**{**asdict(config), "steps": base_steps + (index < extra), "seed": config.seed + index})
        report = _full(handle, windows, round_config, checkpoint_path(checkpoint_dir, f"round_{index}"),
                       {**settings, "round": index}, progress, on_step, f"IMP round {index + 1}/{imp.rounds}")
        report.pop("trainable")
        rounds.append({"round": index + 1, "sparsity": round(target, 6), **report})
    return rounds
