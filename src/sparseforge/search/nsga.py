"""NSGA-II over per-block levels, through pymoo's ask/tell interface.

Integer genes use pymoo's SBX crossover and polynomial mutation with rounding repair, duplicates are eliminated,
and the first population holds the given genomes (the uniform allocations, so the search starts from the
baseline it must beat) topped up with random ones. The front returned is the non-dominated set of *every*
evaluated candidate, not only of the last population: an evaluation is the expensive part, so none is wasted.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from .front import non_dominated

Genome = tuple[int, ...]


def nsga2_front(num_vars: int, num_levels: int, quality: Callable[[list[Genome]], list[float]],
                density: Callable[[Genome], float], population: int, generations: int, seed: int,
                initial: list[Genome], progress: bool = True, desc: str = "NSGA-II") -> list[dict]:
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.problems.static import StaticProblem

    rng = np.random.default_rng(seed)
    population = min(population, num_levels ** num_vars)  # a small group may have fewer genomes than that
    start = list(dict.fromkeys(initial))[:population]
    while len(start) < population:
        candidate = tuple(int(v) for v in rng.integers(0, num_levels, num_vars))
        if candidate not in start:
            start.append(candidate)
    problem = Problem(n_var=num_vars, n_obj=2, xl=0, xu=num_levels - 1, vtype=int)
    algorithm = NSGA2(pop_size=population, sampling=np.array(start),
                      crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                      mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
    evaluated: dict[Genome, dict] = {}
    for _ in tqdm(range(generations), desc=desc, unit="generation", disable=not progress, leave=False):
        if not algorithm.has_next():
            break
        offspring = algorithm.ask()
        if offspring is None or len(offspring) == 0:  # a small space can run out of new genomes
            break
        genomes = [tuple(int(v) for v in row) for row in np.rint(offspring.get("X")).astype(int)]
        values = quality(genomes)
        objectives = []
        for genome, value in zip(genomes, values):
            evaluated[genome] = {"genome": genome, "quality": value, "density": density(genome)}
            objectives.append((value, evaluated[genome]["density"]))
        Evaluator().eval(StaticProblem(problem, F=np.array(objectives, dtype=float)), offspring)
        algorithm.tell(infills=offspring)
    return non_dominated(list(evaluated.values()), x="density", y="quality")
