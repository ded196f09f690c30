"""Low-level shape surgery: physically remove FFN neurons, attention heads and whole sub-layers.

These functions change tensors and the few module attributes that attention implementations read (head counts,
GQA group size, GPT-2's split size); they choose nothing. Algorithms decide *what* to remove (``structured/``);
the loader calls the same functions to rebuild a shrunk model from its recorded structure, so a model built either
way has identical shapes. Everything goes through the adapter, so every supported family is handled alike,
including GPT-2's ``Conv1D`` (weights stored [in, out]) and fused q/k/v projection.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import LinearView, ModelAdapter
from .adapters.base import set_path
from .removed import RemovedAttention, RemovedLinear


def _parameter(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=like.requires_grad)


def slice_linear(view: LinearView, keep: torch.Tensor, side: str) -> None:
    """Keep only the output features (``side='out'``) or input features (``'in'``) listed in ``keep``."""
    module = view.module
    keep = keep.to(module.weight.device)
    weight = view.weight.index_select(0 if side == "out" else 1, keep)
    module.weight = _parameter(view.to_storage(weight), module.weight)
    if side == "out" and getattr(module, "bias", None) is not None:
        module.bias = _parameter(module.bias.index_select(0, keep), module.bias)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = view.weight.shape
    else:  # transformers' Conv1D
        module.nf = view.weight.shape[0]
        if hasattr(module, "nx"):
            module.nx = view.weight.shape[1]


def add_to_bias(view: LinearView, delta: torch.Tensor) -> None:
    """Add ``delta`` to a linear's bias, creating the bias if the layer has none (mean-contribution compensation)."""
    module = view.module
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(view.out_features, dtype=module.weight.dtype,
                                               device=module.weight.device), requires_grad=False)
    with torch.no_grad():
        module.bias.add_(delta.to(module.bias.dtype))


def ffn_width(adapter: ModelAdapter, index: int) -> int:
    """Intermediate width of block ``index``'s FFN (0 when the FFN was removed)."""
    linears = adapter.ffn(index).linears
    return linears[adapter.spec.ffn_output_role].in_features if linears else 0


def keep_ffn_neurons(adapter: ModelAdapter, index: int, keep: torch.Tensor) -> None:
    """Keep the intermediate neurons ``keep`` of block ``index``: input-side rows and output-side columns."""
    for role, view in adapter.ffn(index).linears.items():
        slice_linear(view, keep, "in" if role == adapter.spec.ffn_output_role else "out")


def attention_heads(adapter: ModelAdapter, index: int) -> tuple[int, int]:
    """(query heads, key/value heads) of block ``index``, read from the tensors (0, 0 when removed)."""
    linears = adapter.attention(index).linears
    if not linears:
        return 0, 0
    head_dim = adapter.head_geometry().head_dim
    queries = linears[adapter.spec.attention_output_role].in_features // head_dim
    if "qkv" in linears:  # GPT-2: fused, no GQA
        return queries, queries
    return queries, linears["k"].out_features // head_dim


def _head_rows(heads: list[int], head_dim: int, offset: int = 0) -> list[int]:
    return [offset + h * head_dim + d for h in heads for d in range(head_dim)]


def keep_heads(adapter: ModelAdapter, index: int, query_heads: list[int], kv_heads: list[int]) -> None:
    """Keep the listed query heads and key/value heads of block ``index``.

    The caller keeps the geometry valid: every kept key/value head keeps the same number of query heads, listed
    group by group (query head ``h`` reads key/value head ``h // group``).
    """
    head_dim = adapter.head_geometry().head_dim
    queries, kvs = attention_heads(adapter, index)
    q_rows, kv_rows = _head_rows(query_heads, head_dim), _head_rows(kv_heads, head_dim)
    linears = adapter.attention(index).linears
    for role, view in linears.items():
        if role == "qkv":
            rows = q_rows + _head_rows(kv_heads, head_dim, queries * head_dim) \
                + _head_rows(kv_heads, head_dim, (queries + kvs) * head_dim)
            slice_linear(view, torch.tensor(rows), "out")
        elif role == adapter.spec.attention_output_role:
            slice_linear(view, torch.tensor(q_rows), "in")
        else:
            slice_linear(view, torch.tensor(q_rows if role == "q" else kv_rows), "out")
    module = adapter.attention(index).module
    settings = {"num_heads": len(query_heads), "num_key_value_heads": len(kv_heads),
                "num_key_value_groups": len(query_heads) // len(kv_heads), "split_size": len(query_heads) * head_dim}
    for attr, value in settings.items():
        if hasattr(module, attr):
            setattr(module, attr, value)


def remove_sublayer(adapter: ModelAdapter, index: int, kind: str) -> None:
    """Remove the ``'attention'`` or ``'ffn'`` sub-layer of block ``index``: only its residual path remains.

    Its norms become identities (their output would only feed the removed computation; Gemma's post-norms of a
    zero output are zero), so nothing of the sub-layer is computed or stored.
    """
    if adapter.is_removed(index, kind):
        return
    block = adapter.blocks()[index]
    spec = adapter.spec
    sub = adapter.attention(index) if kind == "attention" else adapter.ffn(index)
    for role in sub.norms:
        path = (spec.attention_norms if kind == "attention" else spec.ffn_norms)[role]
        if kind == "ffn" or not path.startswith(f"{spec.attention}."):
            set_path(block, path, nn.Identity())
    if kind == "attention":
        set_path(block, spec.attention, RemovedAttention(getattr(sub.module, "layer_idx", index)))
        return
    hidden = sub.linears[spec.ffn_output_role].out_features
    for role, path in spec.ffn_linears.items():
        set_path(block, path, RemovedLinear(hidden if role == spec.ffn_output_role else 0))
