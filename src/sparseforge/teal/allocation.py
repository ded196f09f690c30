"""Allocations as points of the blocks' greedy walks: a block's sparsity (weighted by the weights each site reads)
and the point of each walk that reaches a target."""

from __future__ import annotations


def block_sparsity(sparsity: dict[str, float], weights: dict[str, int]) -> float:
    total = sum(weights.values())
    return sum(sparsity[s] * weights[s] for s in sparsity) / total if total else 0.0


def allocation_from_paths(paths: list[list[dict[str, float]]], weights: list[dict[str, int]], target: float
                          ) -> list[dict[str, float]]:
    """Per block, the first point of its greedy walk at or above ``target`` (the last if the walk stopped short)."""
    chosen = []
    for path, block_weights in zip(paths, weights):
        chosen.append(next((point for point in path if block_sparsity(point, block_weights) >= target - 1e-9),
                           path[-1]))
    return chosen
