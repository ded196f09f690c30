"""Which model a side file (an FFN-skip policy, trained expert routers) was made for.

Policies and routers are only valid for the weights they were calibrated or trained on; a fingerprint stored with
them lets loading refuse a file that belongs to another model instead of silently degrading it.
"""

from __future__ import annotations

import torch

from ..export.integrity import digest


def model_fingerprint(adapter) -> dict:
    """Architecture and a hash of the FFN output weights: equal for the same model, different for another one
    (a fine-tuned or pruned variant included), cheap to compute on load. The sampled weights are rounded to
    bfloat16 first, so the same model loaded in float32 or bfloat16 has the same fingerprint, and signed zeros
    are made positive, so a pruned model reloaded from a compressed export has it too."""
    samples = []
    for index in range(adapter.num_blocks):
        linears = adapter.ffn(index).linears
        if linears:
            sample = linears[adapter.spec.ffn_output_role].weight.detach().flatten()[:256].to(torch.bfloat16)
            samples.append(sample + 0.0)  # -0.0 -> 0.0: compressed formats store a pruned zero without its sign
    return {"model_type": adapter.config.model_type, "num_layers": adapter.num_blocks,
            "hidden_size": int(adapter.embed_tokens().weight.shape[1]), "weights": digest(samples)}


def fingerprint_differences(recorded: dict, adapter) -> list[str]:
    """The fingerprint fields in which ``adapter``'s model differs from ``recorded`` (empty: the same model; an
    empty record matches anything, for files written by hand)."""
    if not recorded:
        return []
    actual = model_fingerprint(adapter)
    return [key for key in actual if recorded.get(key) != actual[key]]


def require_same_model(recorded: dict, adapter, origin: str, error: type[Exception], redo: str) -> None:
    """Refuse a side file (``origin``) whose recorded fingerprint is not ``adapter``'s model, saying what to
    ``redo`` (e.g. "calibrate it again")."""
    differing = fingerprint_differences(recorded, adapter)
    if differing:
        raise error(f"{origin} was calibrated for a different model ({', '.join(differing)} differ): {redo} for "
                    "this one")
