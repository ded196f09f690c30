"""Width pruning: remove FFN neurons and attention heads, physically, so the model is smaller and faster.

Per block, the units with the lowest importance (:mod:`.importance`) are removed with the shape surgery of
:mod:`sparseforge.models.surgery`. Ratios are uniform or given per block (a search can drive them). FFN widths can
be rounded to a multiple (8, 64, ...) for kernel-friendly shapes. Heads keep the GQA geometry valid:

* ``head_unit='within'`` (default with GQA): every key/value group keeps the same number of its query heads,
  chosen by score inside the group; the KV cache keeps its size.
* ``head_unit='group'``: whole key/value groups (with all their query heads) go, which also shrinks the KV cache.
* without GQA both mean single heads.

``compensate`` adds a removed channel's mean contribution ``W[:, j] * mean(x_j)`` to the output projection's bias
(FLAP's bias compensation), so the removed units are replaced by their average instead of by zero.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import StructureError
from ..evaluation.stats import parameter_counts
from ..models.handle import LoadedModel
from ..models.structure import describe_blocks, record_structure
from ..models.surgery import add_to_bias, attention_heads, ffn_width, keep_ffn_neurons, keep_heads
from ..calibration.data import calibration_data
from ..data.windows import CALIBRATION_WINDOWS
from .importance import SCORES, channel_scores, collect_statistics
from .preconditions import check_shrinkable, original_shape

HEAD_UNITS = ("auto", "within", "group")


@dataclass
class ShrinkConfig:
    ffn: float | list[float] = 0.0
    heads: float | list[float] = 0.0
    score: str = "fluctuation"
    round_to: int = 1
    head_unit: str = "auto"
    compensate: bool = False


def _ratios(value: float | list[float], blocks: int, what: str) -> list[float]:
    ratios = [float(value)] * blocks if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(ratios) != blocks:
        raise StructureError(f"{what} ratios: got {len(ratios)} values for a model with {blocks} blocks")
    for ratio in ratios:
        if not (0.0 <= ratio < 1.0) or math.isnan(ratio):
            raise StructureError(f"{what} ratio {ratio:g} is outside [0, 1): a ratio of 1 would remove the whole "
                                 "sub-layer (use finercut for that)")
    return ratios


def _validate(config: ShrinkConfig, blocks: int) -> tuple[list[float], list[float]]:
    if config.score not in SCORES:
        raise StructureError(f"unknown importance score '{config.score}'; available: {', '.join(SCORES)}")
    if config.head_unit not in HEAD_UNITS:
        raise StructureError(f"unknown head unit '{config.head_unit}'; available: {', '.join(HEAD_UNITS)}")
    if config.round_to < 1:
        raise StructureError(f"round_to must be a positive multiple, got {config.round_to}")
    return _ratios(config.ffn, blocks, "FFN"), _ratios(config.heads, blocks, "head")


def kept_width(width: int, ratio: float, multiple: int, index: int) -> int:
    """Neurons kept of ``width`` at ``ratio``, rounded to the nearest multiple of ``multiple`` (never above width)."""
    kept = min(width, multiple * round(width * (1 - ratio) / multiple))
    if kept <= 0:
        raise StructureError(f"block {index}: removing {ratio:.0%} of {width} FFN neurons rounded to multiples of "
                             f"{multiple} would leave none; lower the ratio or the multiple")
    return kept


def _top(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.topk(scores, count).indices.tolist())


def _head_plan(queries: int, kvs: int, ratio: float, unit: str, index: int) -> tuple[str, int]:
    """(unit, units kept) for one block: key/value groups kept, or query heads kept per group."""
    group = queries // kvs
    if unit == "auto":
        unit = "within" if group > 1 else "group"
    if unit == "group":
        kept = round(kvs * (1 - ratio))
        if kept == 0:
            raise StructureError(f"block {index}: removing {ratio:.0%} of {kvs} key/value groups leaves none; "
                                 "use finercut to remove a whole attention sub-layer")
        return unit, kept
    kept = round(group * (1 - ratio))
    if kept == 0:
        raise StructureError(f"block {index}: removing {ratio:.0%} of the {group} query heads of each key/value "
                             "group leaves none; lower the ratio or use head_unit 'group'")
    return unit, kept


def _choose_heads(head_scores: torch.Tensor, queries: int, kvs: int, ratio: float, unit: str,
                  index: int) -> tuple[list[int], list[int]]:
    """Kept (query heads, key/value heads), group by group, for one block."""
    group = queries // kvs
    unit, kept = _head_plan(queries, kvs, ratio, unit, index)
    if unit == "group":
        kv = _top(head_scores.view(kvs, group).sum(1), kept)
        return [g * group + h for g in kv for h in range(group)], kv
    chosen = [g * group + h for g in range(kvs) for h in _top(head_scores[g * group:(g + 1) * group], kept)]
    return chosen, list(range(kvs))


def check_shrink_request(handle: LoadedModel, config: ShrinkConfig) -> tuple[list[float], list[float]]:
    """Everything about a request that can be refused before any data is read: ratios, names, and whether every
    block keeps at least one neuron and a valid head geometry. Returns the per-block ratios."""
    adapter = handle.adapter
    ffn_ratios, head_ratios = _validate(config, adapter.num_blocks)
    check_shrinkable(handle, "shrink")
    for index in range(adapter.num_blocks):
        if adapter.ffn(index).linears and ffn_ratios[index] > 0:
            kept_width(ffn_width(adapter, index), ffn_ratios[index], config.round_to, index)
        if adapter.attention(index).linears and head_ratios[index] > 0:
            _head_plan(*attention_heads(adapter, index), head_ratios[index], config.head_unit, index)
    return ffn_ratios, head_ratios


def _compensate(view, removed: torch.Tensor, mean: torch.Tensor) -> None:
    if len(removed):
        weight = view.weight.detach().double().cpu()
        add_to_bias(view, (weight[:, removed] @ mean[removed]).to(view.weight.device))


def shrink(handle: LoadedModel, ffn: float | list[float] = 0.0, heads: float | list[float] = 0.0,
           score: str = "fluctuation", round_to: int = 1, head_unit: str = "auto", compensate: bool = False,
           calibration: str | torch.Tensor = "default", nsamples: int = CALIBRATION_WINDOWS, seqlen: int = 512, seed: int = 0,
           batch_size: int = 8, progress: bool = True) -> LoadedModel:
    """Remove the least important FFN neurons and attention heads of every block, in place.

    ``ffn``/``heads``: fraction to remove, one value or one per block. ``score``: magnitude (no data), wanda or
    fluctuation (calibration activations of ``nsamples`` windows of ``seqlen`` tokens). A report (parameters
    before and after, kept widths) is appended to ``handle.history``.
    """
    started = time.perf_counter()
    config = ShrinkConfig(ffn, heads, score, round_to, head_unit, compensate)
    adapter = handle.adapter
    ffn_ratios, head_ratios = check_shrink_request(handle, config)
    original = original_shape(handle)
    before = parameter_counts(handle)["total"]
    needs_data = score != "magnitude" or compensate
    stats = {}
    if needs_data and (any(ffn_ratios) or any(head_ratios)):
        windows = calibration_data(handle, calibration, nsamples, seqlen, seed)
        stats = collect_statistics(adapter, windows, batch_size, progress)
    head_dim = adapter.head_geometry().head_dim
    for index in range(adapter.num_blocks):
        ffn_sub, attention = adapter.ffn(index), adapter.attention(index)
        if ffn_sub.linears and ffn_ratios[index] > 0:
            out = ffn_sub.linears[adapter.spec.ffn_output_role]
            width = ffn_width(adapter, index)
            kept = kept_width(width, ffn_ratios[index], round_to, index)
            if kept < width:
                inputs = [v for r, v in ffn_sub.linears.items() if r != adapter.spec.ffn_output_role]
                scores = channel_scores(score, out, inputs, stats.get(out.name))
                keep = _top(scores, kept)
                if compensate:
                    removed = torch.tensor(sorted(set(range(width)) - set(keep)), dtype=torch.long)
                    _compensate(out, removed, stats[out.name].mean)
                keep_ffn_neurons(adapter, index, torch.tensor(keep))
        if attention.linears and head_ratios[index] > 0:
            out = attention.linears[adapter.spec.attention_output_role]
            queries, kvs = attention_heads(adapter, index)
            inputs = [v for r, v in attention.linears.items() if r != adapter.spec.attention_output_role]
            scores = channel_scores(score, out, inputs, stats.get(out.name)).view(queries, head_dim).sum(1)
            kept_q, kept_kv = _choose_heads(scores, queries, kvs, head_ratios[index], config.head_unit, index)
            if len(kept_q) < queries:
                if compensate:
                    kept_channels = {h * head_dim + d for h in kept_q for d in range(head_dim)}
                    removed = torch.tensor(sorted(set(range(queries * head_dim)) - kept_channels), dtype=torch.long)
                    _compensate(out, removed, stats[out.name].mean)
                keep_heads(adapter, index, kept_q, kept_kv)
    record = record_structure(adapter, original)
    after = parameter_counts(handle)["total"]
    handle.history.append({
        "stage": "shrink", "method": "width", "settings": asdict(config),
        "calibration": {"windows": nsamples, "seqlen": seqlen, "seed": seed} if stats else None,
        "parameters": {"before": before, "after": after, "removed_fraction": 1 - after / before},
        "blocks": describe_blocks(adapter), "original": record["original"],
        "transformers_loadable": record["transformers_loadable"], "seconds": round(time.perf_counter() - started, 3)})
    return handle
