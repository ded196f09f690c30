"""Stand-ins for removed sub-layers: they compute nothing and hold no weights, so the residual path is all that
is left of the sub-layer, and the model really does less work.

A removed FFN keeps its module tree but its linears become :class:`RemovedLinear` (the input projections produce
width-0 activations, the output projection produces zeros), which works for every family, including OPT whose FFN
linears sit directly on the block. A removed attention becomes :class:`RemovedAttention`: attention implementations
reshape by head count, so it has to be replaced whole. It still records a one-channel zero entry in the KV cache,
because generation reads the cached length from layer 0 and the causal mask from each layer's cache.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import cache_in


class RemovedLinear(nn.Module):
    """A linear layer that was removed: returns zeros of its output width (width 0 for an FFN's input side)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}"


class RemovedAttention(nn.Module):
    """An attention sub-layer that was removed: contributes zero to the residual stream, keeps the cache length."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = cache_in(kwargs)
        if cache is not None and hasattr(cache, "update"):
            batch, length = hidden_states.shape[:2]
            length_marker = hidden_states.new_zeros(batch, 1, length, 1)
            cache.update(length_marker, length_marker, self.layer_idx)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


def is_removed(module: nn.Module | None) -> bool:
    return isinstance(module, (RemovedLinear, RemovedAttention))
