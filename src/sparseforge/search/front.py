"""Pareto fronts: non-dominated filtering, hypervolume, and picking the point a user asked for."""

from __future__ import annotations

import numpy as np

from ..errors import SearchError


def non_dominated(points: list[dict], x: str = "density", y: str = "kl") -> list[dict]:
    """The points no other point beats on both ``x`` and ``y`` (both minimised), sorted by ``x``; ties keep one."""
    ordered = sorted(points, key=lambda p: (p[x], p[y]))
    front, best = [], float("inf")
    for point in ordered:
        if point[y] < best:
            front.append(point)
            best = point[y]
    return front


def hypervolume(points: list[dict], reference: tuple[float, float], x: str = "density", y: str = "kl") -> float:
    """Area dominated by ``points`` up to ``reference`` (both objectives minimised; pymoo's indicator)."""
    from pymoo.indicators.hv import HV

    inside = [(p[x], p[y]) for p in points if p[x] < reference[0] and p[y] < reference[1]]
    if not inside:
        return 0.0
    return float(HV(ref_point=np.array(reference, dtype=float))(np.array(inside, dtype=float)))


def pick_point(front: list[dict], target: float) -> dict:
    """The best point (lowest KL) whose average sparsity reaches ``target``."""
    reaching = [p for p in front if p["average_sparsity"] >= target - 1e-6]
    if not reaching:
        best = max(p["average_sparsity"] for p in front)
        raise SearchError(f"no point of the front reaches sparsity {target:g} (the sparsest has {best:.4f}); pick a "
                          "lower sparsity or search with higher levels")
    return min(reaching, key=lambda p: (p["kl"], -p["average_sparsity"]))
