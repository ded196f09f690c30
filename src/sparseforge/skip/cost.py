"""The ideal decode speed-up of a skip policy: multiply-accumulates saved by the skipped FFNs, minus the similarity
checks the adaptive rule adds, over everything a token costs (attention over the context and the LM head included;
see :mod:`sparseforge.evaluation.macs`)."""

from __future__ import annotations

from ..evaluation.macs import macs_per_token
from ..models.adapters import ModelAdapter
from .policy import SkipPolicy


def ffn_macs(adapter: ModelAdapter, layer: int) -> int:
    return sum(v.out_features * v.in_features for v in adapter.ffn(layer).linears.values())


def ideal_skip_speedup(adapter: ModelAdapter, policy: SkipPolicy, accounting: dict, context: float) -> dict:
    """Dense MACs / MACs with skipping, per generated token, from an accounting summary (its per-layer skip rates
    over governed tokens, warm-up tokens counted as dense)."""
    num_layers = adapter.num_blocks
    dense = macs_per_token(adapter, context)
    governed, warmup = accounting["governed_tokens"], accounting["warmup_tokens"]
    share = governed / (governed + warmup) if governed + warmup else 0.0
    saved = sum(rate * ffn_macs(adapter, layer) for layer, rate in enumerate(accounting["per_layer"]))
    checks = 0.0
    if policy.mode == "adaptive":  # three dot products over the hidden size per measured FFN
        hidden = adapter.embed_tokens().weight.shape[1]
        measured = sum(1 - rate for layer, rate in enumerate(accounting["per_layer"])
                       if policy.eligible(layer, num_layers))
        checks = 3 * hidden * measured
    per_token = dense - share * (saved - checks)
    return {"decode": dense / per_token, "dense_macs_per_token": dense, "skip_macs_per_token": per_token,
            "saved_ffn_macs_per_governed_token": saved, "similarity_check_macs": checks}
