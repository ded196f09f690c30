"""Where activation sparsity acts: the four inputs of a decoder block's linears, found through the adapter.

Each block's linears read one of four tensors: the normalised stream entering attention (q, k, v, or a fused qkv),
the attention heads' output (o), the normalised stream entering the FFN (gate and up, or fc1) and the FFN's
intermediate activation (down, or fc2). Zeroing an entry of one of them removes one column of every weight that
reads it, so a site's weight count is what its sparsity saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.adapters.base import LinearView

SITES = ("attention_input", "attention_output", "ffn_input", "ffn_intermediate")


@dataclass
class Site:
    block: int
    name: str  # one of SITES
    linears: list[LinearView]  # every linear that reads this input (same tensor, same threshold)

    @property
    def weights(self) -> int:
        return sum(view.out_features * view.in_features for view in self.linears)


def block_sites(adapter, block: int) -> dict[str, Site]:
    """The sites of ``block`` that exist (a removed sub-layer has none)."""
    sites = {}
    for kind, sub, output_role in (("attention", adapter.attention(block), adapter.spec.attention_output_role),
                                   ("ffn", adapter.ffn(block), adapter.spec.ffn_output_role)):
        inputs = [view for role, view in sub.linears.items() if role != output_role]
        first, second = (("attention_input", "attention_output") if kind == "attention"
                         else ("ffn_input", "ffn_intermediate"))
        if inputs:
            sites[first] = Site(block, first, inputs)
        if output_role in sub.linears:
            sites[second] = Site(block, second, [sub.linears[output_role]])
    return sites


def model_sites(adapter) -> list[dict[str, Site]]:
    return [block_sites(adapter, block) for block in range(adapter.num_blocks)]
