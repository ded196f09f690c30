"""The recorded structure of a shrunk model, and rebuilding a model from it.

Every shrink writes ``config.sparseforge_structure``: per block, the FFN width, query and key/value heads (0 =
sub-layer removed) and whether the output projections carry a bias (mean-contribution compensation adds one). When
the shapes fit the family's standard config (the same widths in every block, nothing removed, no added bias, head
counts the config can express), the standard fields are updated too and the directory loads with plain
``transformers``; the record then only documents the change. Otherwise :func:`apply_structure` rebuilds the exact
shapes on a model built from the config, before the weights are loaded strictly, with no custom code.
"""

from __future__ import annotations

import torch

from ..errors import CorruptCheckpointError
from .adapters import ModelAdapter
from .surgery import add_to_bias, attention_heads, ffn_width, keep_ffn_neurons, keep_heads, remove_sublayer

STRUCTURE_KEY = "sparseforge_structure"
STRUCTURE_VERSION = 1


def _has_bias(view) -> bool:
    return view is not None and getattr(view.module, "bias", None) is not None


def describe_blocks(adapter: ModelAdapter) -> list[dict]:
    """The current per-block shapes, read from the tensors."""
    rows = []
    for index in range(adapter.num_blocks):
        heads, kv_heads = attention_heads(adapter, index)
        attention, ffn = adapter.attention(index).linears, adapter.ffn(index).linears
        rows.append({"ffn": ffn_width(adapter, index), "heads": heads, "kv_heads": kv_heads,
                     "ffn_out_bias": _has_bias(ffn.get(adapter.spec.ffn_output_role)),
                     "attention_out_bias": _has_bias(attention.get(adapter.spec.attention_output_role))})
    return rows


def _added_bias(adapter: ModelAdapter) -> bool:
    """An output projection with a bias where its sub-layer's input projections have none: no config flag says so."""
    for index in range(adapter.num_blocks):
        for sub, out_role in ((adapter.ffn(index), adapter.spec.ffn_output_role),
                              (adapter.attention(index), adapter.spec.attention_output_role)):
            if sub.linears and _has_bias(sub.linears[out_role]) and \
                    not _has_bias(next(v for r, v in sub.linears.items() if r != out_role)):
                return True
    return False


def record_structure(adapter: ModelAdapter, original: dict | None = None) -> dict:
    """Write the structure record (and, when the shapes allow, the standard config fields); returns the record.

    ``original`` describes the model before its first shrink (kept from an earlier record if there is one).
    """
    config = adapter.config
    blocks = describe_blocks(adapter)
    previous = getattr(config, STRUCTURE_KEY, None) or {}
    shapes = {(b["ffn"], b["heads"], b["kv_heads"]) for b in blocks}
    ffn, heads, kv_heads = next(iter(shapes))
    geometry = adapter.head_geometry()
    heads_expressible = adapter.spec.head_dim_attr is not None or heads == geometry.num_heads
    loadable = len(shapes) == 1 and ffn > 0 and heads > 0 and heads_expressible and not _added_bias(adapter)
    if loadable:
        setattr(config, adapter.spec.ffn_width_attr, ffn)
        if heads != geometry.num_heads or kv_heads != geometry.num_kv_heads:
            setattr(config, adapter.spec.num_heads_attrs[0], heads)
            setattr(config, adapter.spec.num_kv_heads_attrs[0], kv_heads)
            setattr(config, adapter.spec.head_dim_attr, geometry.head_dim)
    record = {"version": STRUCTURE_VERSION, "transformers_loadable": loadable,
              "original": previous.get("original") or original, "blocks": blocks}
    setattr(config, STRUCTURE_KEY, record)
    return record


def structure_of(adapter: ModelAdapter) -> dict | None:
    """The model's structure record, or None for a model that was never shrunk."""
    return getattr(adapter.config, STRUCTURE_KEY, None)


def apply_structure(adapter: ModelAdapter, record: dict) -> None:
    """Give a model freshly built from its config the recorded shapes (weights are loaded afterwards)."""
    blocks = record.get("blocks") if isinstance(record, dict) else None
    if not isinstance(blocks, list) or len(blocks) != adapter.num_blocks:
        raise CorruptCheckpointError(f"the recorded structure lists {len(blocks) if isinstance(blocks, list) else 'no'}"
                                     f" blocks but the config has {adapter.num_blocks}")
    for index, wanted in enumerate(blocks):
        try:
            _rebuild_block(adapter, index, wanted)
        except (KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"the recorded structure of block {index} is malformed: {exc}") from None


def _rebuild_block(adapter: ModelAdapter, index: int, wanted: dict) -> None:
    heads, kv_heads = attention_heads(adapter, index)
    width = ffn_width(adapter, index)
    if wanted["heads"] > heads or wanted["kv_heads"] > kv_heads or wanted["ffn"] > width:
        raise CorruptCheckpointError(f"the recorded structure of block {index} is larger than its config allows")
    if wanted["heads"] == 0:
        remove_sublayer(adapter, index, "attention")
    elif (wanted["heads"], wanted["kv_heads"]) != (heads, kv_heads):
        if wanted["heads"] % wanted["kv_heads"]:
            raise CorruptCheckpointError(f"block {index}: {wanted['heads']} query heads cannot share "
                                         f"{wanted['kv_heads']} key/value heads evenly")
        keep_heads(adapter, index, list(range(wanted["heads"])), list(range(wanted["kv_heads"])))
    if wanted["ffn"] == 0:
        remove_sublayer(adapter, index, "ffn")
    elif wanted["ffn"] != width:
        keep_ffn_neurons(adapter, index, torch.arange(wanted["ffn"]))
    for sub, role, flag in ((adapter.ffn(index), adapter.spec.ffn_output_role, "ffn_out_bias"),
                            (adapter.attention(index), adapter.spec.attention_output_role, "attention_out_bias")):
        if sub.linears and wanted[flag] and not _has_bias(sub.linears[role]):
            add_to_bias(sub.linears[role], torch.zeros(sub.linears[role].out_features))
