"""DSnoT (Zhang et al., 2024): training-free prune-and-grow that reduces each row's expected reconstruction error.

For output row i, weight j contributes ``W_ij * mu_j`` in expectation (``mu_j`` = mean over calibration windows of
the window's token sum of input j, the reference's scale). The expected error of a sparse row is the sum of the
contributions it lost. DSnoT repeatedly regrows the pruned weight that best cancels the error (ranked by
contribution over input variance) and prunes, in exchange, a kept weight with the opposite effect and the smallest
Wanda score, so every row keeps its sparsity; for N:M the exchanged weight is in the grown weight's group, so the
pattern stays valid. Candidate lists are sorted once and consumed in order, as in the reference.

The reference leaves two choices ambiguous, exposed here as options: ``sign_check`` (stop a row once a swap would
flip the sign of its error; the reference turns it off for unstructured and on for N:M) and ``layers`` (the
reference refines only attention projections: ``skip_layer="mlp"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.statistics import InputStatistics
from ..errors import PatternError
from ..sparsity.patterns import NM, Pattern
from .hooks import Refinement, dataclass_options, register_hook

INF = float("inf")


@dataclass
class DSnoTConfig:
    max_cycles: int = 50
    threshold: float = 0.1  # stop a row when |expected error| falls below this
    sign_check: bool | None = None  # None: the reference's choice (off for unstructured, on for N:M)
    layers: str = "all"  # "all" or "attention" (the reference's skip of MLP linears)
    variance_power: float = 1.0


def _sorted_candidates(key: torch.Tensor, valid: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: column indices of valid entries sorted by ``key`` (invalid ones last), and how many are valid."""
    fill = -INF if descending else INF
    order = torch.argsort(torch.where(valid, key, torch.full_like(key, fill)), dim=1, descending=descending,
                          stable=True)
    return order, valid.sum(1)


def refine(dense: torch.Tensor, current: torch.Tensor, mask: torch.Tensor, stats: InputStatistics,
           pattern: Pattern, config: DSnoTConfig = DSnoTConfig()) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return the refined (weight, mask, number of swaps) for one linear; per-row (and per-group) counts unchanged.

    ``dense`` is the weight before pruning (regrown weights take its values), ``current`` the pruned (for
    SparseGPT: also compensated) weight, ``mask`` its keep-mask; all [out, in].
    """
    dense, current = dense.float(), current.float()
    mask = mask.clone()
    mu = stats.sample_sum_mean().to(dense.device)
    var = stats.variance().to(dense.device).clamp_min(1e-12)
    norms = stats.norms().to(dense.device)
    gain = dense * mu  # error removed by regrowing a pruned weight
    loss = current * mu  # error added by pruning a kept weight
    error = ((dense - current) * mu).sum(1)
    wanda = current.abs() * norms
    grow_key = gain / var.pow(config.variance_power)
    nm = pattern if isinstance(pattern, NM) else None
    sign_check = config.sign_check if config.sign_check is not None else nm is not None

    pruned = ~mask
    grow_pos, n_grow_pos = _sorted_candidates(grow_key, pruned & (gain > 0), descending=True)
    grow_neg, n_grow_neg = _sorted_candidates(grow_key, pruned & (gain < 0), descending=False)
    drop_neg, n_drop_neg = _sorted_candidates(wanda, mask & (loss < 0), descending=False)
    drop_pos, n_drop_pos = _sorted_candidates(wanda, mask & (loss > 0), descending=False)
    rows = torch.arange(mask.shape[0], device=mask.device)
    ptr = {name: torch.zeros_like(rows) for name in ("grow_pos", "grow_neg", "drop_neg", "drop_pos")}
    initial_sign = error.sign()
    active = torch.ones_like(rows, dtype=torch.bool)
    grown = torch.zeros_like(mask)
    swaps = 0

    def at(order: torch.Tensor, name: str) -> torch.Tensor:
        return order[rows, ptr[name].clamp_max(order.shape[1] - 1)]

    for _ in range(config.max_cycles):
        positive = error > 0
        grow = torch.where(positive, at(grow_pos, "grow_pos"), at(grow_neg, "grow_neg"))
        available = torch.where(positive, ptr["grow_pos"] < n_grow_pos, ptr["grow_neg"] < n_grow_neg)
        if nm is None:
            drop = torch.where(positive, at(drop_neg, "drop_neg"), at(drop_pos, "drop_pos"))
            available &= torch.where(positive, ptr["drop_neg"] < n_drop_neg, ptr["drop_pos"] < n_drop_pos)
        else:  # the lowest-scored kept weight of the grown weight's group, never one grown by DSnoT itself
            cols = (grow // nm.m * nm.m).unsqueeze(1) + torch.arange(nm.m, device=mask.device)
            keepable = mask.gather(1, cols) & ~grown.gather(1, cols)
            group_scores = torch.where(keepable, wanda.gather(1, cols), torch.full(cols.shape, INF, device=mask.device))
            drop = cols.gather(1, group_scores.argmin(1, keepdim=True)).squeeze(1)
            available &= keepable.any(1)
        new_error = error - gain[rows, grow] + loss[rows, drop]
        ok = active & available & (error.abs() > config.threshold)
        if sign_check:
            ok &= new_error.sign() == initial_sign
        active &= ok  # a row that cannot improve stops for good
        if not bool(ok.any()):
            break
        r, g, d = rows[ok], grow[ok], drop[ok]
        mask[r, g], grown[r, g], mask[r, d] = True, True, False
        error = torch.where(ok, new_error, error)
        swaps += int(ok.sum())
        for name, on in (("grow_pos", positive), ("grow_neg", ~positive)):
            ptr[name] += (ok & on).long()
        if nm is None:
            ptr["drop_neg"] += (ok & positive).long()
            ptr["drop_pos"] += (ok & ~positive).long()
    weight = torch.where(mask, torch.where(grown, dense, current), torch.zeros_like(current))
    return weight, mask, swaps


def _options(value) -> DSnoTConfig:
    config = dataclass_options(DSnoTConfig, value, "dsnot")
    if config.layers not in ("all", "attention"):
        raise PatternError(f"dsnot layers must be 'all' or 'attention', got '{config.layers}'")
    return config


def _targets(adapter, index: int, config: DSnoTConfig) -> set[str]:
    views = adapter.block_linears(index).values() if config.layers == "all" else \
        adapter.attention(index).linears.values()
    return {view.name for view in views}


register_hook(Refinement("dsnot", _options, frozenset({"norms", "moments"}), _targets, refine))
