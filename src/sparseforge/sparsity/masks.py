"""Masks on weights: apply them, keep pruned weights at zero during training, check invariants.

Enforcement is a ``torch.nn.utils.parametrize`` parametrization (weight = original * mask), so any training loop
(ours, a Trainer, a user's) keeps pruned weights at exactly zero without knowing about sparsity. The same
parametrization serves the LLM adapters' linear layers and any ``nn.Module`` weight (dynamic sparse training of
convolutions and MLPs): its mask is a buffer that a topology update may rewrite in place, and it can record the
gradient of the *effective* (dense-shaped) weight, which gradient-based regrowth needs and which the masked
parameter's own gradient no longer carries.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from .patterns import nm_group_counts


class LinearView(Protocol):
    """A prunable linear as masks see it (the adapters' ``LinearView`` is one): its name, its module, its weight in
    [out, in] orientation, and how a mask in that orientation maps onto the stored weight. The mask core knows
    tensors and modules, not architectures."""

    name: str
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor: ...

    def to_storage(self, tensor_out_in: torch.Tensor) -> torch.Tensor: ...


class ModelAdapter(Protocol):
    """Anything that lists a model's prunable linears (the adapters do)."""

    def linears(self) -> Iterable[LinearView]: ...


def apply_mask(view: LinearView, mask: torch.Tensor) -> None:
    """Zero the pruned weights of one layer in place."""
    with torch.no_grad():
        view.weight.mul_(mask.to(view.weight.dtype))


class KeepMask(nn.Module):
    """weight = original * mask. With ``record_gradient`` set, keeps dL/d(weight) of the last backward pass."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)
        self.record_gradient = False
        self.dense_grad: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self._attach_recorder(weight * self.mask.to(weight.dtype))

    def _attach_recorder(self, effective: torch.Tensor) -> torch.Tensor:
        if self.record_gradient and effective.requires_grad:
            effective.register_hook(self._record)
        return effective

    def _record(self, grad: torch.Tensor) -> None:
        self.dense_grad = grad.detach()


def enforce_weight_mask(module: nn.Module, mask: torch.Tensor, keeper: KeepMask | None = None,
                        name: str = "weight") -> KeepMask:
    """Zero ``module.<name>`` outside ``mask`` and keep it so through training; returns the parametrization.

    The trainable parameter stays the same object (``module.parametrizations.<name>.original``), so an optimizer
    built before this call keeps working. ``keeper`` lets a caller install a subclass (per-task frozen weights).
    """
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} already has a mask")
    keeper = keeper if keeper is not None else KeepMask(mask.to(getattr(module, name).device))
    with torch.no_grad():
        getattr(module, name).mul_(keeper.mask.to(getattr(module, name).dtype))
    parametrize.register_parametrization(module, name, keeper)
    return keeper


def trainable_weight(module: nn.Module, name: str = "weight") -> nn.Parameter:
    """The parameter an optimizer updates: the original under a mask, or the plain weight."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name)


def enforce_masks(adapter: ModelAdapter, masks: dict[str, torch.Tensor]) -> None:
    """Make every masked layer compute with ``weight * mask`` so training cannot revive pruned weights."""
    for view in adapter.linears():
        if view.name in masks and not parametrize.is_parametrized(view.module, "weight"):
            enforce_weight_mask(view.module, view.to_storage(masks[view.name]).to(view.module.weight.device))


def release_masks(adapter: ModelAdapter) -> None:
    """Remove enforcement, baking the masked weights into plain parameters (before export or inference)."""
    for view in adapter.linears():
        release_weight_mask(view.module)


def release_weight_mask(module: nn.Module, name: str = "weight") -> None:
    if parametrize.is_parametrized(module, name):
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def sparsity_of(mask: torch.Tensor) -> float:
    return 1.0 - mask.sum().item() / mask.numel()


def is_valid_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """At most N kept in every group of M consecutive inputs of every row."""
    return mask.shape[1] % m == 0 and bool((nm_group_counts(mask, m) <= n).all())


def check_masks_hold(adapter: ModelAdapter, masks: dict[str, torch.Tensor]) -> list[str]:
    """Names of layers whose pruned weights are no longer zero (empty list = invariant holds)."""
    broken = []
    for view in adapter.linears():
        weight = view.weight.detach()
        if view.name in masks and bool((weight[~masks[view.name].to(weight.device)] != 0).any()):
            broken.append(view.name)
    return broken
