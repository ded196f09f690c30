"""What every structural change checks first, and the shape it records as the model's original."""

from __future__ import annotations

from ..errors import StructureError
from ..evaluation.stats import parameter_counts
from ..models.handle import LoadedModel
from ..models.structure import describe_blocks, structure_of


def check_shrinkable(handle: LoadedModel, what: str) -> None:
    """Refuse a model with pruning masks: slicing rows and columns out of a masked weight would keep zeros that
    the mask no longer describes, and the sparsity report would silently change meaning."""
    if handle.masks:
        raise StructureError(f"{handle.source} has pruning masks on {len(handle.masks)} linears; {what} removes "
                             "whole neurons, heads or sub-layers from a dense model: run it before unstructured or "
                             "N:M pruning, not after")
    if handle.ffn_taken_over_by() is not None:
        raise StructureError(f"{handle.source} has {handle.ffn_taken_over_by()} attached, which runs its FFNs; "
                             f"{what} would cut through them: shrink the dense model first")


def original_shape(handle: LoadedModel) -> dict:
    """The model's shape before its first structural change (an earlier record keeps the true original)."""
    record = structure_of(handle.adapter)
    if record and record.get("original"):
        return record["original"]
    first = describe_blocks(handle.adapter)[0]
    return {"ffn": first["ffn"], "heads": first["heads"], "kv_heads": first["kv_heads"],
            "blocks": handle.adapter.num_blocks, "parameters": parameter_counts(handle)["total"]}
