"""The whole-block baseline for FinerCut: remove the decoder blocks whose output is most similar to their input.

A block whose output hidden state points the same way as its input (high cosine similarity, averaged over
calibration tokens) changes the residual stream least; ShortGPT ranks blocks this way and drops the top ones in
one shot. Comparisons with FinerCut are made at the same removed-parameter budget: ``parameters`` picks blocks in
similarity order until the removed count is closest to the budget.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import StructureError
from ..evaluation.stats import parameter_counts
from ..models.adapters import ModelAdapter
from ..models.handle import LoadedModel
from ..models.structure import describe_blocks, record_structure
from ..models.surgery import remove_sublayer
from ..calibration.data import calibration_data
from .preconditions import check_shrinkable, original_shape


@torch.no_grad()
def block_similarities(adapter: ModelAdapter, windows: torch.Tensor, batch_size: int,
                       progress: bool = True) -> list[float]:
    """Mean cosine similarity between each block's input and output hidden states over the calibration tokens."""
    device = next(adapter.model.parameters()).device
    totals = [0.0] * adapter.num_blocks
    tokens = 0
    for start in tqdm(range(0, len(windows), batch_size), desc="block similarity", disable=not progress,
                      unit="batch"):
        ids = windows[start:start + batch_size].to(device)
        hidden, kwargs = adapter.capture_inputs_per_block(ids)
        for index in range(adapter.num_blocks):
            output = adapter.run_block(index, hidden, kwargs[index])
            totals[index] += float(F.cosine_similarity(hidden.float(), output.float(), dim=-1).sum())
            hidden = output
        tokens += ids.numel()
    return [t / tokens for t in totals]


def block_parameters(adapter: ModelAdapter, index: int) -> int:
    return sum(p.numel() for p in adapter.blocks()[index].parameters())


def choose_blocks(similarities: list[float], sizes: list[int], count: int | None, parameters: int | None) -> list[int]:
    """Most similar blocks first: ``count`` of them, or as many as bring the removed parameters closest to
    ``parameters``."""
    order = sorted(range(len(similarities)), key=lambda i: -similarities[i])
    if count is not None:
        return sorted(order[:count])
    chosen, removed = [], 0
    for index in order:
        if abs(removed + sizes[index] - parameters) >= abs(removed - parameters):
            break
        chosen.append(index)
        removed += sizes[index]
    return sorted(chosen)


def check_block_request(handle: LoadedModel, count: int | float | None, parameters: int | None) -> int | None:
    """Refuse an impossible request before reading data; returns the block count (None with a budget)."""
    blocks = handle.adapter.num_blocks
    if (count is None) == (parameters is None):
        raise StructureError("give exactly one of a block count and a parameter budget")
    if count is not None:
        count = round(count * blocks) if count < 1 else int(count)
        if not 0 <= count < blocks:
            raise StructureError(f"cannot remove {count} of {blocks} blocks (at least one must remain)")
    check_shrinkable(handle, "block removal")
    return count


def remove_blocks(handle: LoadedModel, count: int | float | None = None, parameters: int | None = None,
                  calibration: str | torch.Tensor = "default", nsamples: int = 8, seqlen: int = 128, seed: int = 0,
                  batch_size: int = 4, progress: bool = True) -> LoadedModel:
    """Remove whole blocks by input/output cosine similarity, in place: ``count`` blocks (a fraction of the
    blocks when below 1) or a budget of ``parameters`` removed."""
    started = time.perf_counter()
    adapter = handle.adapter
    count = check_block_request(handle, count, parameters)
    original = original_shape(handle)
    before = parameter_counts(handle)["total"]
    windows = calibration_data(handle, calibration, nsamples, seqlen, seed)
    similarities = block_similarities(adapter, windows, batch_size, progress)
    sizes = [block_parameters(adapter, i) for i in range(adapter.num_blocks)]
    chosen = choose_blocks(similarities, sizes, count, parameters)
    for index in chosen:
        for kind in ("attention", "ffn"):
            remove_sublayer(adapter, index, kind)
    record = record_structure(adapter, original)
    after = parameter_counts(handle)["total"]
    handle.history.append({
        "stage": "finercut", "method": "block", "settings": {"count": count, "parameters": parameters},
        "calibration": {"windows": nsamples, "seqlen": seqlen, "seed": seed},
        "similarities": similarities, "removed": [{"block": i, "kind": "block"} for i in chosen],
        "parameters": {"before": before, "after": after, "removed_fraction": 1 - after / before},
        "blocks": describe_blocks(adapter), "original": record["original"],
        "transformers_loadable": record["transformers_loadable"], "seconds": round(time.perf_counter() - started, 3)})
    return handle
