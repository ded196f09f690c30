"""FactorLLM's two training stages on the offline text, through the training loop every recovery method shares.

Stage 1 (routers): every expert computes (dense mode) so each token's Prior-Approximate label can be found; the
loss is ``pa_weight * sum_layers PA + balance_weight * sum_layers balance`` (+ ``lm_weight * LM`` when the router
gets a straight-through gate, the only way the LM loss reaches a hard top-k router). Only the routers train and
the experts are frozen, so the teacher (the dense FFN) is exactly the sum of the experts computed anyway: no teacher
copy is kept, and none needs dropping afterwards. PA uses each layer's own FFN input (the reference code feeds
later layers the previous layer's teacher output, a bug not reproduced).

Stage 2 (experts): routers frozen, the FFN weights (the experts) train on the LM loss through sparse dispatch, so
each expert learns from the tokens routed to it; attention, norms, embeddings and the LM head stay frozen. Pruned
weights stay zero (the sparsity core's mask enforcement) when the model was pruned before.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import FactorizeError
from ..models.handle import LoadedModel
from ..retrain.data import batch_for_step, training_windows
from ..retrain.selection import freeze
from ..retrain.trainer import TrainConfig, checkpoint_path, train
from ..sparsity.masks import enforce_masks, release_masks
from .losses import DIRECTIONS, balance_loss, pa_loss
from .routing import ROUTER_GRADS, ExpertRouting


def _routing(handle: LoadedModel) -> ExpertRouting:
    routing = handle.attachment(ExpertRouting.kind)
    if routing is None:
        raise FactorizeError("this model is not factorized; call sparseforge.moe.factorize first")
    return routing


def router_loss(routing: ExpertRouting, pa_weight: float, balance_weight: float,
                direction: str = "reverse_kl") -> torch.Tensor:
    """PA and balance terms summed over the layers of the last dense-mode forward."""
    total = None
    for record in routing.records():
        term = pa_weight * pa_loss(record.logits, record.expert_outputs, record.expert_outputs.sum(-2),
                                   routing.settings.topk, direction)
        if balance_weight:
            term = term + balance_weight * balance_loss(record.logits, record.selection)
        total = term if total is None else total + term
    return total


def train_routers(handle: LoadedModel, config: TrainConfig, data: str | torch.Tensor = "default",
                  pa_weight: float = 0.05, balance_weight: float = 0.01, lm_weight: float = 0.0,
                  router_grad: Literal[ROUTER_GRADS] = "pa_only", direction: str = "reverse_kl",  # type: ignore[valid-type]
                  checkpoint_dir=None, progress: bool = True) -> dict:
    """Stage 1. ``router_grad="straight_through"`` with ``lm_weight > 0`` lets the LM loss train the routers too
    (``pa_weight=0`` then gives the LM-only router of the comparison)."""
    routing = _routing(handle)
    if router_grad not in ROUTER_GRADS:
        raise FactorizeError(f"unknown router_grad '{router_grad}'; available: {', '.join(ROUTER_GRADS)}")
    if direction not in DIRECTIONS:
        raise FactorizeError(f"unknown PA loss direction '{direction}'; available: {', '.join(DIRECTIONS)}")
    use_lm = lm_weight > 0 and router_grad == "straight_through"
    if not use_lm and pa_weight <= 0 and balance_weight <= 0:
        raise FactorizeError("stage 1 has no loss that reaches the routers: give pa_weight > 0, or lm_weight > 0 "
                             "with router_grad 'straight_through'")
    windows = training_windows(handle, data, config.seqlen)
    device = next(handle.model.parameters()).device
    freeze(handle.model)
    params = list(routing.routers.parameters())
    for p in params:
        p.requires_grad_(True)

    def loss_of_step(step: int) -> torch.Tensor:
        ids = batch_for_step(windows, step, config.batch, config.seed).to(device)
        with torch.set_grad_enabled(use_lm):
            out = handle.model(input_ids=ids, labels=ids if use_lm else None, use_cache=False)
        loss = router_loss(routing, pa_weight, balance_weight, direction) if pa_weight or balance_weight else None
        if use_lm:
            loss = lm_weight * out.loss if loss is None else loss + lm_weight * out.loss
        return loss

    try:
        with routing.dense(router_grad):
            report = train(params, loss_of_step, config, handle.model, checkpoint_dir, {"stage": "routers"},
                           progress, desc="routers")
    finally:
        for p in params:
            p.requires_grad_(False)
    report["objective"] = {"pa_weight": pa_weight, "balance_weight": balance_weight,
                           "lm_weight": lm_weight if use_lm else 0.0, "router_grad": router_grad,
                           "direction": direction}
    return report


def train_experts(handle: LoadedModel, config: TrainConfig, data: str | torch.Tensor = "default",
                  checkpoint_dir=None, progress: bool = True) -> dict:
    """Stage 2: the experts (FFN weights) on the LM loss through sparse dispatch, routers frozen."""
    routing = _routing(handle)
    windows = training_windows(handle, data, config.seqlen)
    device = next(handle.model.parameters()).device
    freeze(handle.model)
    for p in routing.ffn_parameters():
        p.requires_grad_(True)
    enforce_masks(handle.adapter, handle.masks)
    params = [p for p in handle.model.parameters() if p.requires_grad]  # parametrized originals when masked

    def loss_of_step(step: int) -> torch.Tensor:
        ids = batch_for_step(windows, step, config.batch, config.seed).to(device)
        return handle.model(input_ids=ids, labels=ids, use_cache=False).loss

    try:
        report = train(params, loss_of_step, config, handle.model, checkpoint_dir, {"stage": "experts"}, progress,
                       desc="experts")
    finally:
        release_masks(handle.adapter)
        freeze(handle.model)
    report["trainable"] = sum(p.numel() for p in params)
    return report


def train_factorized(handle: LoadedModel, router: TrainConfig | None, experts: TrainConfig | None,
                     data: str | torch.Tensor = "default", checkpoint_root=None, progress: bool = True,
                     **router_objective) -> dict:
    """Both stages (either may be None to skip it); returns their reports."""
    report = {}
    if router is not None:
        report["routers"] = train_routers(handle, router, data, checkpoint_dir=checkpoint_path(
            checkpoint_root, "routers"), progress=progress, **router_objective)
    if experts is not None:
        report["experts"] = train_experts(handle, experts, data, checkpoint_dir=checkpoint_path(
            checkpoint_root, "experts"), progress=progress)
    return report
