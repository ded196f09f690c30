"""OWL's calibration pass, as the pipeline's allocator: outlier ratios of Wanda scores, block by block on the
dense model, mapped to per-block sparsities by :func:`sparseforge.sparsity.allocation.owl_sparsities`."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from ..sparsity.allocation import outlier_ratio, owl_sparsities
from .hooks import Allocator, dataclass_options, register_hook
from .scorers import wanda_scores


@dataclass
class OWLConfig:
    m: float = 5.0  # outlier threshold, in multiples of the block's mean Wanda score
    lam: float = 0.08  # block sparsities lie in [target - lam, target + lam]


def owl_allocate(blocks, hidden, target: float, config: OWLConfig, progress: bool) -> dict:
    ratios = []
    adapter = blocks.adapter
    hidden = hidden.clone()  # the pruning pass starts again from block 0's inputs
    for index in tqdm(range(adapter.num_blocks), desc="OWL outlier ratios", disable=not progress, unit="block"):
        blocks.on_device(index)
        views = {v.name: v for v in adapter.block_linears(index).values()}
        collector = blocks.calibrate(index, hidden, frozenset({"norms"}))
        hidden = blocks.run(index, hidden)
        ratios.append(outlier_ratio([wanda_scores(v.weight.detach(), collector.of(n)) for n, v in views.items()],
                                    config.m))
        blocks.release(index)
    return {"outlier_ratios": ratios, "block_sparsity": owl_sparsities(ratios, target, config.lam)}


register_hook(Allocator("owl", lambda value: dataclass_options(OWLConfig, value, "owl"), owl_allocate))
