"""EvoPress-style search at a fixed budget: level-switch mutation and multi-fidelity selection (one parent).

Start from the most uniform allocation at the target. Each generation makes ``offspring`` distinct children of
the parent, each by f = min(U{1,3}, U{1,3}) level switches (one block moves down a level and another up, so the
average sparsity stays exactly where it is when blocks have equal size and levels are evenly spaced; a child that
would move the average is rejected). Children are ranked on a few tokens, the best ``keep`` go on to more tokens,
and so on; the parent joins at the last stage, so the search is elitist. Token sets are fixed per stage (not
redrawn each generation as in the reference code) so that every fitness is reproducible and memoisable.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..errors import SearchError
from .space import SearchSpace

Genome = tuple[int, ...]


def level_switch(parent: Genome, space: SearchSpace, rng: np.random.Generator) -> Genome | None:
    child = list(parent)
    flips = min(int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    for _ in range(flips):
        down = [u for u in range(len(child)) if child[u] > 0]
        up = [u for u in range(len(child)) if child[u] < space.num_levels - 1]
        if not down or not up:
            return None
        lower = down[int(rng.integers(len(down)))]
        raise_ = up[int(rng.integers(len(up)))]
        if lower == raise_:
            continue
        child[lower] -= 1
        child[raise_] += 1
    child = tuple(child)
    if abs(space.average_sparsity(child) - space.average_sparsity(parent)) > 1e-9:
        return None
    return child


def evopress(space: SearchSpace, target: float, fitness: Callable[[str, list[Genome]], list[float]],
             stages: list[tuple[str, int]], offspring: int, generations: int, seed: int,
             progress: bool = True) -> dict:
    """Returns the best genome and the per-generation history of its fitness at the last stage."""
    rng = np.random.default_rng(seed)
    parent = space.balanced_genome(target)
    last_fidelity = stages[-1][0]
    history = [{"generation": 0, "fitness": fitness(last_fidelity, [parent])[0]}]
    bar = tqdm(range(1, generations + 1), desc="EvoPress", unit="generation", disable=not progress, leave=False)
    for generation in bar:
        children: list[Genome] = []
        for _ in range(offspring * 50):
            if len(children) == offspring:
                break
            child = level_switch(parent, space, rng)
            if child is not None and child != parent and child not in children:
                children.append(child)
        if not children:
            raise SearchError("no level switch keeps the average sparsity fixed: EvoPress needs evenly spaced levels "
                              "and blocks of equal size")
        candidates = children
        for stage, (fidelity, keep) in enumerate(stages):
            if stage == len(stages) - 1:
                candidates = candidates + [parent]
            values = fitness(fidelity, candidates)
            order = sorted(range(len(candidates)), key=lambda i: (values[i], i))
            candidates = [candidates[i] for i in order[:keep]]
            best_value = values[order[0]]
        parent = candidates[0]
        history.append({"generation": generation, "fitness": best_value})
        bar.set_postfix(kl=f"{best_value:.4f}")
    return {"genome": parent, "history": history}
