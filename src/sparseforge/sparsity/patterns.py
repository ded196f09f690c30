"""Sparsity patterns: turn a score matrix (higher = more important) into a keep-mask at a target sparsity.

Patterns work on [out, in] score matrices (the orientation every :class:`LinearView` exposes).

N:M follows the hardware convention: **N kept (nonzero) out of every M consecutive inputs** of a row. For 2:4 and
4:8 this is the same as the Wanda/SparseGPT code's "prune n of m"; for 1:4 vs 3:4 it is not, so we say it here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import PatternError


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise PatternError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def nm_group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Number of kept entries in each group of ``m`` consecutive inputs: shape [out, in // m]."""
    rows, cols = mask.shape
    return mask.reshape(rows, cols // m, m).sum(dim=-1)


def _keep_lowest_pruned(scores: torch.Tensor, num_pruned: int, dim: int | None) -> torch.Tensor:
    """Mask that prunes exactly ``num_pruned`` lowest scores (per row if ``dim`` is given, else overall).

    A stable sort makes ties deterministic, so the achieved count is exact even on grid-like (quantised) weights.
    """
    flat = scores.reshape(-1) if dim is None else scores
    order = torch.argsort(flat, dim=-1, stable=True)
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask.scatter_(-1, order[..., :num_pruned], False)
    return mask.reshape(scores.shape)


@dataclass(frozen=True)
class Unstructured:
    """Any weights may be pruned; the threshold is per layer, or per output row with ``per_row``."""

    per_row: bool = False

    @property
    def name(self) -> str:
        return "unstructured"

    def fixed_sparsity(self) -> float | None:
        return None

    def validate(self, shape: tuple[int, int], layer: str) -> None:
        pass

    def mask(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        check_sparsity(sparsity)
        if self.per_row:
            return _keep_lowest_pruned(scores, round(sparsity * scores.shape[1]), dim=1)
        return _keep_lowest_pruned(scores, round(sparsity * scores.numel()), dim=None)


@dataclass(frozen=True)
class NM:
    """N kept out of every M consecutive input weights of each row (2:4 is what sparse tensor cores run)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise PatternError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}")

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    def fixed_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def validate(self, shape: tuple[int, int], layer: str) -> None:
        if shape[1] % self.m:
            raise PatternError(f"pattern {self.name}: M={self.m} does not divide the input width {shape[1]} of {layer}")

    def mask(self, scores: torch.Tensor, sparsity: float | None = None) -> torch.Tensor:
        rows, cols = scores.shape
        grouped = scores.reshape(rows, cols // self.m, self.m)
        return _keep_lowest_pruned(grouped, self.m - self.n, dim=-1).reshape(rows, cols)


Pattern = Unstructured | NM
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(spec: str, per_row: bool = False) -> Pattern:
    """'unstructured' or 'N:M' (e.g. '2:4', '4:8')."""
    if spec == "unstructured":
        return Unstructured(per_row=per_row)
    match = _NM_RE.match(str(spec))
    if not match:
        raise PatternError(f"unknown sparsity pattern '{spec}'; use 'unstructured' or N:M such as '2:4'")
    return NM(int(match.group(1)), int(match.group(2)))


def resolve_sparsity(pattern: Pattern, sparsity: float | None) -> float:
    """The sparsity a pattern will reach: N:M fixes it, and a conflicting request is an error, not a surprise."""
    fixed = pattern.fixed_sparsity()
    if fixed is None:
        if sparsity is None:
            raise PatternError("unstructured pruning needs a sparsity")
        return check_sparsity(sparsity)
    if sparsity is not None and abs(check_sparsity(sparsity) - fixed) > 1e-9:
        raise PatternError(f"pattern {pattern.name} means sparsity {fixed:g}, but sparsity {sparsity:g} was asked for")
    return fixed
