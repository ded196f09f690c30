"""The search space: one sparsity level per decoder block, each chosen from one grid of levels.

A candidate (a *genome*) is a tuple of level indices, one per block. Blocks are the unit because every linear of
a block sees the same residual stream: OWL and EvoPress allocate per block too, and all linears of a block share
its level (within a matrix the method still compares weights per row or per matrix). The average sparsity is
weighted by each block's number of prunable weights, so it is the sparsity the pruned model really has.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SearchError

DENSE = -1  # the level index of a block left unpruned (the decomposition's "otherwise dense" model)


def parse_levels(spec: str | list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Levels from ``lo:hi:step`` (inclusive), ``a,b,c``, or a list; sorted, unique, each in [0, 1)."""
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if ":" in text:
                lo, hi, step = (float(part) for part in text.split(":"))
                if step <= 0:
                    raise SearchError(f"the level step must be positive, got {step:g}")
                count = int(round((hi - lo) / step)) + 1
                values = [round(lo + i * step, 10) for i in range(max(count, 0))]
            else:
                values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise SearchError(f"levels must look like 0.3:0.9:0.05 or 0.4,0.5,0.6, got '{spec}'") from None
    else:
        values = [float(v) for v in spec]
    if not values:
        raise SearchError(f"the search space is empty: no sparsity levels in '{spec}'")
    for value in values:
        if not 0 <= value < 1:
            raise SearchError(f"sparsity level {value:g} is outside [0, 1)")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class SearchSpace:
    levels: tuple[float, ...]
    unit_sizes: tuple[int, ...]  # prunable weights of each block

    def __post_init__(self) -> None:
        if not self.unit_sizes or sum(self.unit_sizes) == 0:
            raise SearchError("the search space is empty: the model has no prunable blocks")
        if len(self.levels) < 2:
            raise SearchError(f"the search space is empty: one level ({self.levels[0]:g}) leaves nothing to choose; "
                              "give at least two")

    @property
    def num_units(self) -> int:
        return len(self.unit_sizes)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def sparsities(self, genome) -> list[float]:
        """Per-block sparsity of a genome (0 for a block left dense)."""
        return [0.0 if g == DENSE else self.levels[g] for g in genome]

    def average_sparsity(self, genome, units: range | None = None) -> float:
        """Parameter-weighted mean sparsity of the blocks in ``units`` (all by default) under ``genome``."""
        units = units if units is not None else range(self.num_units)
        values = self.sparsities(genome)
        return sum(self.unit_sizes[u] * values[u] for u in units) / sum(self.unit_sizes[u] for u in units)

    def check_target(self, target: float) -> float:
        lo, hi = self.levels[0], self.levels[-1]
        if not lo - 1e-9 <= target <= hi + 1e-9:
            raise SearchError(f"target sparsity {target:g} is outside the level range [{lo:g}, {hi:g}]; "
                              "widen --levels or change the target")
        return target

    def balanced_genome(self, target: float) -> tuple[int, ...]:
        """The most uniform genome whose average sparsity is as close to ``target`` as the grid allows.

        Every block starts at the highest level not above the target; then blocks spread evenly over depth move
        up one level while that brings the average closer. With the target on the grid this is the uniform
        allocation itself.
        """
        self.check_target(target)
        base = max(i for i, level in enumerate(self.levels) if level <= target + 1e-9)
        genome = [base] * self.num_units
        if base == self.num_levels - 1:
            return tuple(genome)
        order = sorted(range(self.num_units), key=lambda u: ((u * 0.6180339887) % 1.0, u))  # spread over depth
        for unit in order:
            gap = abs(self.average_sparsity(genome) - target)
            genome[unit] += 1
            if abs(self.average_sparsity(genome) - target) >= gap:
                genome[unit] -= 1
                break
        return tuple(genome)

    def uniform_genomes(self) -> list[tuple[int, ...]]:
        """Every block at the same level, for each level: the uniform allocations on the grid."""
        return [(level,) * self.num_units for level in range(self.num_levels)]
