"""Multiply-accumulates per generated token, and the ideal speed-up they imply.

A physically smaller model can at best run as much faster as it does fewer multiply-accumulates. Counted per
token: every block linear, the LM head (the largest single matrix of a small model) and any final projection,
plus attention over the context (``2 * heads * head_dim * context`` per block: scores and the weighted sum of
values). Removed sub-layers count zero. Measured speed-ups are reported next to this bound.
"""

from __future__ import annotations

from ..models.adapters import ModelAdapter
from ..models.adapters.base import get_path
from ..models.surgery import attention_heads


def macs_per_token(adapter: ModelAdapter, context: float) -> float:
    """MACs to produce one token's logits when attending over ``context`` earlier tokens."""
    linears = sum(v.out_features * v.in_features for v in adapter.linears())
    head = adapter.lm_head().weight.numel()
    if adapter.spec.final_projection and get_path(adapter.model, adapter.spec.final_projection) is not None:
        head += get_path(adapter.model, adapter.spec.final_projection).weight.numel()
    head_dim = adapter.head_geometry().head_dim
    attention = sum(2 * attention_heads(adapter, i)[0] * head_dim * context for i in range(adapter.num_blocks))
    return linears + head + attention


def ideal_speedups(dense: ModelAdapter, shrunk: ModelAdapter, prompt_tokens: int, new_tokens: int) -> dict:
    """Ideal prefill and decode speed-ups at the speed harness's prompt length and number of new tokens."""
    prefill_context = (prompt_tokens + 1) / 2  # causal: token t attends to t tokens
    decode_context = prompt_tokens + (new_tokens + 1) / 2
    return {"prefill": macs_per_token(dense, prefill_context) / macs_per_token(shrunk, prefill_context),
            "decode": macs_per_token(dense, decode_context) / macs_per_token(shrunk, decode_context),
            "decode_macs_per_token": {"dense": macs_per_token(dense, decode_context),
                                      "shrunk": macs_per_token(shrunk, decode_context)}}
