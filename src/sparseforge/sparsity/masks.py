"""Masks on linear layers: apply them, keep pruned weights at zero during training, check invariants.

Enforcement is a ``torch.nn.utils.parametrize`` parametrization (weight = original * mask), so any training loop
(ours, a Trainer, a user's) keeps pruned weights at exactly zero without knowing about sparsity.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models.adapters import LinearView, ModelAdapter
from .patterns import nm_group_counts


def apply_mask(view: LinearView, mask: torch.Tensor) -> None:
    """Zero the pruned weights of one layer in place."""
    with torch.no_grad():
        view.weight.mul_(mask.to(view.weight.dtype))


class _KeepMask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def enforce_masks(adapter: ModelAdapter, masks: dict[str, torch.Tensor]) -> None:
    """Make every masked layer compute with ``weight * mask`` so training cannot revive pruned weights."""
    for view in adapter.linears():
        if view.name in masks and not parametrize.is_parametrized(view.module, "weight"):
            apply_mask(view, masks[view.name])
            storage_mask = view.to_storage(masks[view.name]).to(view.module.weight.device)
            parametrize.register_parametrization(view.module, "weight", _KeepMask(storage_mask))


def release_masks(adapter: ModelAdapter) -> None:
    """Remove enforcement, baking the masked weights into plain parameters (before export or inference)."""
    for view in adapter.linears():
        if parametrize.is_parametrized(view.module, "weight"):
            parametrize.remove_parametrizations(view.module, "weight", leave_parametrized=True)


def masks_from_zeros(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """Recover masks of a model saved as dense-with-zeros (only layers that have zeros get one)."""
    masks = {}
    for view in adapter.linears():
        mask = view.weight.detach() != 0
        if not bool(mask.all()):
            masks[view.name] = mask.cpu()
    return masks


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
