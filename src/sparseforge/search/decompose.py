"""Sub-network decomposition (EMO joint pruning with multiple sub-networks, adapted to one-shot LLM pruning).

1. Split the blocks into ``groups`` runs of consecutive blocks.
2. Search each group alone with NSGA-II on a *local* proxy: the group's output reconstruction error on its dense
   inputs (only the group's blocks run, so a local evaluation costs a fraction of a full-model one), against
   the group's density.
3. Global performance impairment: plug each of (at most ``gpir_points``, spread over density) front points of a
   group into the otherwise dense model and measure its KL to the dense model: one full-model evaluation each.
4. Combine: for each global target, choose one point per group so the model's average sparsity reaches the target
   with the least total impairment (a multiple-choice knapsack, solved exactly by dynamic programming over the
   achievable totals). The distinct combinations are measured once more as whole models: the decomposition's
   front.

The paper's cross-network feature constraints and feature selectors serve CNN retraining; one-shot pruning
trains nothing, so the dense inputs and outputs of each group play their role. Impairments are assumed
additive across groups; the final measurement of each combination says how well that held.
"""

from __future__ import annotations

from typing import Callable

from .nsga import Genome, nsga2_front
from .space import DENSE, SearchSpace


def split_groups(num_units: int, groups: int) -> list[range]:
    """``groups`` runs of consecutive blocks, sizes differing by at most one."""
    groups = max(1, min(groups, num_units))
    bounds = [round(i * num_units / groups) for i in range(groups + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(groups)]


def spread(points: list[dict], count: int, key: str = "density") -> list[dict]:
    """At most ``count`` points evenly spread over ``key`` (both ends kept)."""
    if len(points) <= count:
        return points
    ordered = sorted(points, key=lambda p: p[key])
    picks = sorted({round(i * (len(ordered) - 1) / (count - 1)) for i in range(count)})
    return [ordered[i] for i in picks]


def combine(space: SearchSpace, groups: list[range], fronts: list[list[dict]], targets: list[float]) -> list[Genome]:
    """For each target, the least-impairment choice of one point per group that reaches it (exact DP)."""
    total = sum(space.unit_sizes)
    states: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for units, front in zip(groups, fronts):
        following: dict[int, tuple[float, tuple[int, ...]]] = {}
        for pruned, (cost, choice) in states.items():
            for option, point in enumerate(front):
                gained = round(sum(space.unit_sizes[u] * space.levels[g] for u, g in zip(units, point["genome"])))
                key = pruned + gained
                value = (cost + point["impairment"], choice + (option,))
                if key not in following or value < following[key]:
                    following[key] = value
        states = following
    chosen: list[Genome] = []
    for target in targets:
        reaching = [(cost, choice) for pruned, (cost, choice) in states.items() if pruned >= target * total - 0.5]
        if not reaching:
            continue
        _, choice = min(reaching)
        genome = tuple(g for option, front in zip(choice, fronts) for g in front[option]["genome"])
        if genome not in chosen:
            chosen.append(genome)
    return chosen


def decompose(space: SearchSpace, groups: int, local: Callable[[int, list[Genome]], list[float]],
              impairment: Callable[[list[Genome]], list[float]], population: int, generations: int,
              gpir_points: int, targets: list[float], seed: int, progress: bool = True) -> dict:
    """Run the decomposition; ``local(first_block, group_genomes)`` and ``impairment(full_genomes)`` measure."""
    ranges = split_groups(space.num_units, groups)
    fronts, records = [], []
    for number, units in enumerate(ranges):
        front = nsga2_front(len(units), space.num_levels, lambda genomes, first=units.start: local(first, genomes),
                            lambda genome, units=units: 1 - space.average_sparsity(
                                [DENSE] * units.start + list(genome) + [DENSE] * (space.num_units - units.stop),
                                units),
                            population, generations, seed + number,
                            [(level,) * len(units) for level in range(space.num_levels)], progress,
                            desc=f"group {number + 1}/{len(ranges)} (blocks {units.start}-{units.stop - 1})")
        chosen = spread(front, gpir_points)
        plugged = [tuple([DENSE] * units.start) + p["genome"] + tuple([DENSE] * (space.num_units - units.stop))
                   for p in chosen]
        for point, value in zip(chosen, impairment(plugged)):
            point["impairment"] = value
        fronts.append(chosen)
        records.append({"blocks": [units.start, units.stop - 1], "local_front": len(front),
                        "points": [{"sparsities": space.sparsities(p["genome"]), "local_error": p["quality"],
                                    "impairment": p["impairment"]} for p in chosen]})
    return {"groups": records, "combined": combine(space, ranges, fronts, targets)}

