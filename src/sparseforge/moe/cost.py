"""Multiply-accumulates of a factorized model per token, and the ideal speed-up they imply.

Per FFN and token: the shared expert, ``k`` routed experts (``k / routed`` of the routed neurons) and the router
(``hidden * routed``). Everything else (attention, its context term, the LM head) is what
:func:`sparseforge.evaluation.macs.macs_per_token` counts for the dense model, unchanged.
"""

from __future__ import annotations

from ..evaluation.macs import macs_per_token
from ..models.adapters import ModelAdapter


def ffn_macs_per_token(adapter: ModelAdapter, routing=None) -> float:
    """FFN MACs per token summed over the layers (dense when ``routing`` is None)."""
    total = 0.0
    for layer in range(adapter.num_blocks):
        linears = adapter.ffn(layer).linears
        dense = sum(v.out_features * v.in_features for v in linears.values())
        if routing is None:
            total += dense
            continue
        layout = routing.layout
        active = layout.shared + routing.settings.topk * layout.size
        hidden = adapter.embed_tokens().weight.shape[1]
        total += dense * active / layout.width + hidden * layout.routed
    return total


def ideal_expert_speedups(adapter: ModelAdapter, routing, prompt_tokens: int, new_tokens: int) -> dict:
    """Ideal prefill and decode speed-ups of the routed model over the same weights run densely."""
    saved = ffn_macs_per_token(adapter) - ffn_macs_per_token(adapter, routing)
    prefill_context = (prompt_tokens + 1) / 2
    decode_context = prompt_tokens + (new_tokens + 1) / 2
    prefill, decode = macs_per_token(adapter, prefill_context), macs_per_token(adapter, decode_context)
    return {"prefill": prefill / (prefill - saved), "decode": decode / (decode - saved),
            "ffn_macs_per_token": {"dense": ffn_macs_per_token(adapter), "routed": ffn_macs_per_token(adapter, routing)},
            "decode_macs_per_token": {"dense": decode, "routed": decode - saved}}
