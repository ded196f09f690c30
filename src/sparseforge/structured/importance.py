"""How much each FFN neuron and attention head matters, from weights and calibration activations.

The activations that decide a neuron's or a head's worth are the inputs of the sub-layer's output projection
(``down_proj`` / ``fc2`` for FFN neurons, ``o_proj`` for heads, one channel per neuron or per head dimension): a
removed channel is exactly a removed column of that projection. One calibration pass with hooks on those
projections collects per-channel mean, variance and L2 norm; nothing else is kept in memory.

Scores (higher = keep):

* ``magnitude``: the L2 norm of every weight coupled to the unit (input-side rows and output-side columns), the
  data-free baseline of structured pruning (Torch-Pruning's group norm).
* ``wanda``: the aggregated Wanda score of the output projection's columns, ``||X_j||_2 * sum_i |W_ij|``.
* ``fluctuation``: FLAP's fluctuation metric, ``Var(X_j) * ||W_:,j||^2``: a channel that barely varies around its
  mean can be replaced by that mean (see ``compensate``), however large it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models.adapters import LinearView, ModelAdapter

SCORES = ("magnitude", "wanda", "fluctuation")


@dataclass
class ChannelStatistics:
    """Running per-channel sums of one projection's input (float64, so long calibration sets do not drift)."""

    count: int
    total: torch.Tensor
    squares: torch.Tensor

    @classmethod
    def empty(cls, width: int) -> "ChannelStatistics":
        return cls(0, torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        self.count += flat.shape[0]
        self.total += flat.sum(0).cpu()
        self.squares += flat.pow(2).sum(0).cpu()

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares / max(self.count, 1) - self.mean.pow(2)).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        return self.squares.sqrt()


def collect_statistics(adapter: ModelAdapter, windows: torch.Tensor, batch_size: int,
                       progress: bool = True) -> dict[str, ChannelStatistics]:
    """Input statistics of every live output projection (FFN and attention), keyed by linear name."""
    views = output_projections(adapter)
    stats = {name: ChannelStatistics.empty(view.in_features) for name, view in views.items()}
    handles = [view.module.register_forward_pre_hook(lambda m, args, n=name: stats[n].update(args[0]))
               for name, view in views.items()]
    device = next(adapter.model.parameters()).device
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(windows), batch_size), desc="structure statistics", disable=not progress,
                              unit="batch"):
                adapter.model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def output_projections(adapter: ModelAdapter) -> dict[str, LinearView]:
    views = {}
    for index in range(adapter.num_blocks):
        for sub, role in ((adapter.attention(index), adapter.spec.attention_output_role),
                          (adapter.ffn(index), adapter.spec.ffn_output_role)):
            if sub.linears:
                views[sub.linears[role].name] = sub.linears[role]
    return views


def channel_scores(score: str, output: LinearView, inputs: list[LinearView],
                   stats: ChannelStatistics | None) -> torch.Tensor:
    """One score per input channel of ``output`` (float64 on the CPU)."""
    w_out = output.weight.detach().double().cpu()
    if score == "magnitude":
        coupled = w_out.pow(2).sum(0)
        for view in inputs:  # rows of the input projections that produce these channels (same width)
            if view.out_features == w_out.shape[1]:
                coupled = coupled + view.weight.detach().double().cpu().pow(2).sum(1)
        return coupled.sqrt()
    if stats is None:
        raise ValueError(f"score '{score}' needs calibration statistics")
    if score == "wanda":
        return w_out.abs().sum(0) * stats.norm
    return stats.variance * w_out.pow(2).sum(0)
