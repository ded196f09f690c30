"""Dynamic sparse training of a language model: any family the adapters support, trained on text.

The sparse layers are the ones the model's adapter exposes (attention and FFN projections of every block), never
embeddings or the LM head, as in every other method of the toolkit. Training is the shared recovery loop
(AdamW, warm-up then linear decay, NaN stop) with the DST engine attached to its optimizer. ``from_scratch``
re-initialises the weights with the architecture's own initialiser (sparse training from scratch, the setting
of SET/RigL); without it DST starts from the loaded weights under random masks. Afterwards the masks become the
model's pruning masks, so evaluation, reports and every export format treat the model like a pruned one. This is
the recipe stage ``dst:`` and ``sparseforge dst MODEL``.

Not resumable: the trainer's checkpoints do not hold the masks, so an interrupted run starts again.
"""

from __future__ import annotations

import torch

from ..errors import SparseTrainingError
from ..models.handle import LoadedModel
from ..retrain.data import training_windows
from ..retrain.recovery import lm_loss
from ..retrain.selection import freeze
from ..retrain.trainer import TrainConfig, train
from .engine import DSTConfig, DynamicSparsity


def check_dense(handle: LoadedModel) -> None:
    if handle.masks:
        raise SparseTrainingError(f"{handle.source} is already pruned; dynamic sparse training starts from a dense "
                                  f"model")


def reinitialise(handle: LoadedModel, seed: int) -> None:
    """Fresh weights from the architecture's initialiser (``_init_weights``), embeddings tied again."""
    model = handle.model
    if not hasattr(model, "_init_weights"):
        raise SparseTrainingError(f"{type(model).__name__} has no initialiser to train from scratch")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.apply(model._init_weights)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def sparse_train_lm(handle: LoadedModel, method: str = "rigl", density: float = 0.5, init: str = "erk",
                    from_scratch: bool = True, steps: int = 200, lr: float = 1e-3, batch: int = 8, seqlen: int = 256,
                    delta_t: int = 100, drop_fraction: float = 0.3, stop_fraction: float = 0.75,
                    data: str | torch.Tensor = "default", seed: int = 0, progress: bool = True) -> dict:
    """Train ``handle`` sparse with DST in place; sets ``handle.masks`` and appends a report to its history."""
    check_dense(handle)
    dst = DSTConfig(density=density, init=init, method=method, delta_t=delta_t, drop_fraction=drop_fraction,
                    stop_fraction=stop_fraction, total_steps=steps, seed=seed)
    train_config = TrainConfig(steps=steps, lr=lr, batch=batch, seqlen=seqlen, seed=seed)
    windows = training_windows(handle, data, train_config.seqlen)
    if from_scratch:
        reinitialise(handle, seed)
    views = {view.name: view for view in handle.adapter.linears()}
    for parameter in handle.model.parameters():
        parameter.requires_grad_(True)
    engine = DynamicSparsity.install(handle.model, dst, {name: view.module for name, view in views.items()})
    params = [p for p in handle.model.parameters() if p.requires_grad]
    try:
        report = train(params, lm_loss(handle, windows, train_config), train_config, handle.model,
                       progress=progress, desc=f"{method} sparse training", on_optimizer=engine.attach)
    finally:
        masks = engine.masks()
        engine.release()
        freeze(handle.model)
    handle.masks = {name: views[name].to_storage(mask) for name, mask in masks.items()}
    report.update({"stage": "dst", "method": method, "init": init, "from_scratch": from_scratch,
                   "density": engine.density(), "updates": len(engine.history),
                   "rewired": sum(sum(r.rewired.values()) for r in engine.history),
                   "layer_densities": {name: float(mask.float().mean()) for name, mask in masks.items()}})
    handle.history.append(report)
    return report
