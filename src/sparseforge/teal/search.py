"""A searched allocation of activation sparsity across blocks: the project's EvoPress search (``search/``) over one
activation-sparsity level per block, each block split between its sites by its greedy walk.

The per-block allocation is the same problem the weight-sparsity search solves, so this reuses its parts: the
search space (levels per block, averages weighted by each block's weights, so the average is the share of weight
bytes skipped), EvoPress's level-switch mutation with multi-fidelity selection, and the KL divergence of the
next-token distributions from the dense model's as fitness. The boundary is the search's: one callable maps
genomes to fitness, memoised per genome and fidelity.
"""

from __future__ import annotations

import torch

from ..search.evopress import evopress
from ..search.space import SearchSpace
from ..structured.divergence import Reference
from .allocation import allocation_from_paths
from .runtime import ActivationSparsity
from .thresholds import ActivationThresholds

LEVEL_STEP = 0.05
LEVEL_SPAN = 0.3  # levels from target - span to target + span: EvoPress moves blocks a few levels at most


def search_levels(target: float) -> tuple[float, ...]:
    """Evenly spaced block levels around ``target`` (on the grid when the target is a multiple of the step)."""
    low = max(0.0, round(target - LEVEL_SPAN, 2))
    count = int(round((min(0.9, target + LEVEL_SPAN) - low) / LEVEL_STEP)) + 1
    return tuple(round(low + i * LEVEL_STEP, 4) for i in range(count))


@torch.no_grad()
def searched_allocation(handle, statistics: ActivationThresholds, paths: list[list[dict[str, float]]],
                        windows: torch.Tensor, target: float, generations: int = 20, offspring: int = 8,
                        seed: int = 0, progress: bool = True) -> tuple[list[dict[str, float]], dict]:
    """Per block and site sparsities for ``target`` found by EvoPress; ``paths`` are the blocks' greedy walks
    (reaching at least the highest level of :func:`search_levels`). Returns the allocation and the search's
    history."""
    space = SearchSpace(search_levels(target), tuple(sum(w.values()) for w in statistics.weights))
    fidelities = {"small": windows[:1], "full": windows}
    device = next(handle.model.parameters()).device
    references = {name: [Reference("kl", handle.model(input_ids=row[None].to(device), use_cache=False)
                                   .logits[:, :-1]) for row in ids] for name, ids in fidelities.items()}
    attachment = ActivationSparsity(handle, statistics, count=False)
    memo: dict[tuple[str, tuple[int, ...]], float] = {}

    def allocation(genome) -> list[dict[str, float]]:
        per_block = [allocation_from_paths([path], [weights], level)[0]
                     for path, weights, level in zip(paths, statistics.weights, space.sparsities(genome))]
        return per_block

    def fitness(fidelity: str, genomes: list[tuple[int, ...]]) -> list[float]:
        values = []
        for genome in genomes:
            key = (fidelity, tuple(genome))
            if key not in memo:
                attachment.set_thresholds(statistics.with_allocation(allocation(genome), "searched", target))
                distances = [reference.distance(handle.model(input_ids=row[None].to(device), use_cache=False)
                                                .logits[:, :-1])
                             for reference, row in zip(references[fidelity], fidelities[fidelity])]
                memo[key] = sum(distances) / len(distances)
            values.append(memo[key])
        return values

    try:
        found = evopress(space, target, fitness, [("small", max(offspring // 2, 1)), ("full", 1)], offspring,
                         generations, seed, progress)
    finally:
        attachment.remove()
    genome = found["genome"]
    return allocation(genome), {"levels": list(space.levels), "block_levels": space.sparsities(genome),
                                "history": found["history"], "evaluations": len(memo)}
