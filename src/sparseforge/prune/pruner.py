"""One-shot pruning: score each linear layer, turn scores into a mask with a pattern, apply it."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import PatternError
from ..models.handle import LoadedModel
from ..sparsity.allocation import get_allocation
from ..sparsity.masks import apply_mask
from ..sparsity.patterns import Pattern, parse_pattern, resolve_sparsity
from .scorers import get_scorer


def prune(
    handle: LoadedModel,
    method: str = "magnitude",
    sparsity: float | None = 0.5,
    pattern: str | Pattern = "unstructured",
    per_row: bool = False,
    allocation: str = "uniform",
    progress: bool = True,
) -> LoadedModel:
    """Prune every decoder linear of ``handle`` in place and record its mask in ``handle.masks``.

    Embeddings, the LM head, norms and biases are not pruned (the convention of the Wanda/SparseGPT line of work).
    All arguments are checked before any weight changes, so a bad request leaves the model untouched.
    """
    scorer = get_scorer(method)
    if scorer.needs_calibration:
        raise PatternError(f"method '{method}' needs calibration data; use sparseforge.prune with calibration")
    pat = parse_pattern(pattern, per_row) if isinstance(pattern, str) else pattern
    target = resolve_sparsity(pat, sparsity)
    layers = list(handle.adapter.linears())
    for view in layers:
        pat.validate((view.out_features, view.in_features), view.name)
    per_layer = get_allocation(allocation)(layers, target)
    for view in tqdm(layers, desc=f"{method} {pat.name}", disable=not progress, unit="layer"):
        scores = scorer.score(view, None)
        mask = pat.mask(scores, per_layer[view.name]).cpu()
        if view.name in handle.masks:  # pruning again never revives weights pruned before
            mask &= handle.masks[view.name]
        apply_mask(view, mask.to(view.weight.device))
        handle.masks[view.name] = mask
    return handle
