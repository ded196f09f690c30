"""SparseGPT: prune columns left to right and compensate each pruned weight on the not-yet-pruned ones (OBS).

Follows the reference algorithm (Frantar & Alistarh, 2023): Hessian ``H = X^T X`` of the layer input, dampened by a
fraction of its mean diagonal; dead inputs (``H_jj = 0``) get ``H_jj = 1``; the upper
Cholesky factor ``U`` of ``H^-1`` drives the updates; columns are processed in lazy blocks (updates inside a block
are rank-1, the block's accumulated error reaches the remaining columns in one matmul). Unstructured masks are
chosen adaptively per block from ``w^2 / U_jj^2``; N:M masks per group of M columns. Weights of dead inputs are
pruned first but, unlike the reference, not zeroed up front, so sparsity 0 leaves every weight unchanged.

Two departures from the reference, both exact: rows of linears that share one input (q/k/v, gate/up) are solved
in one stacked matrix with one factorisation (the OBS update of a row depends only on that row and ``U``), and the
per-block prune counts are rounded cumulatively, so each matrix ends with exactly ``round(s * numel)`` zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import PatternError
from ..sparsity.patterns import NM, Pattern

MAX_DAMPENING_RETRIES = 6


@dataclass
class SparseGPTConfig:
    block_size: int = 128
    dampening: float = 0.01  # fraction of mean(diag H) added to the diagonal


@dataclass
class Factor:
    """What SparseGPT needs from a Hessian, computed once per shared input: ``U`` with ``U^T U = H^-1``."""

    upper: torch.Tensor
    dead: torch.Tensor  # inputs that were always zero
    dampening: float  # the dampening that finally worked
    events: list[str] = field(default_factory=list)


@dataclass
class SolveResult:
    weight: torch.Tensor  # [rows, in] float32, pruned and compensated
    mask: torch.Tensor  # [rows, in] bool


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float, name: str) -> tuple[torch.Tensor, float, list[str]]:
    """Upper Cholesky factor of the dampened ``H^-1``; on failure retry with 10x the dampening, and say so."""
    events = []
    mean_diag = torch.diagonal(hessian).mean().item()
    if not math.isfinite(mean_diag):
        raise PatternError(f"{name}: the calibration Hessian is not finite (NaN or Inf activations)")
    damp = dampening
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(MAX_DAMPENING_RETRIES):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * max(mean_diag, 1e-8) * eye)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp, events
        events.append(f"{name}: Hessian not positive definite with dampening {damp:g}; retrying with {damp * 10:g}")
        damp *= 10
    raise PatternError(f"{name}: Hessian stays singular even with dampening {damp / 10:g}; "
                       "calibrate on more or different text")


def _block_prune_count(rows: int, sparsity: float, start: int, stop: int) -> int:
    """Weights to prune in columns [start, stop) of a ``rows``-row segment; cumulative rounding keeps totals exact."""
    return round(sparsity * rows * stop) - round(sparsity * rows * start)


def factorize(hessian: torch.Tensor, config: SparseGPTConfig = SparseGPTConfig(), name: str = "layer") -> Factor:
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights are free to prune
    h[dead, dead] = 1.0
    upper, used_damp, events = inverse_hessian_factor(h, config.dampening, name)
    return Factor(upper, dead, used_damp, events)


def solve(weight: torch.Tensor, factor: Factor, pattern: Pattern, sparsities: list[float], segments: list[int],
          config: SparseGPTConfig = SparseGPTConfig(), name: str = "layer") -> SolveResult:
    """Prune ``weight`` [rows, in] (rows = the stacked ``segments`` of linears sharing the input of ``factor``).

    ``sparsities`` has one target per segment (all equal for N:M). The input weight is not modified.
    """
    w = weight.detach().float().clone()
    columns = w.shape[1]
    upper, dead = factor.upper, factor.dead

    mask = torch.ones_like(w, dtype=torch.bool)
    bounds = torch.cumsum(torch.tensor([0] + segments), 0).tolist()
    nm = pattern if isinstance(pattern, NM) else None
    per_row = getattr(pattern, "per_row", False)
    if nm and columns % nm.m:
        raise PatternError(f"{name}: pattern {nm.name} needs the input width {columns} to be a multiple of {nm.m}")
    block = config.block_size
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        w1 = w[:, i1:i2].clone()
        u1 = upper[i1:i2, i1:i2]
        diag = torch.diagonal(u1)
        err1 = torch.zeros_like(w1)
        mask1 = torch.ones_like(w1, dtype=torch.bool)
        if nm is None:
            scores = w1.square() / diag.square()
            scores[:, dead[i1:i2]] = -1.0  # pruned first; unlike the reference, not zeroed when nothing is pruned
            for k, rows in enumerate(segments):
                seg, seg_mask = scores[bounds[k]:bounds[k + 1]], mask1[bounds[k]:bounds[k + 1]]
                if per_row:  # the same count in every row of the segment
                    count = _block_prune_count(1, sparsities[k], i1, i2)
                    seg_mask.scatter_(1, torch.argsort(seg, dim=1, stable=True)[:, :count], False)
                else:
                    count = _block_prune_count(rows, sparsities[k], i1, i2)
                    seg_mask.view(-1)[torch.argsort(seg.reshape(-1), stable=True)[:count]] = False
        for j in range(i2 - i1):
            if nm is not None and j % nm.m == 0:
                group = w1[:, j:j + nm.m].square() / diag[j:j + nm.m].square()
                group[:, dead[i1 + j:i1 + j + nm.m]] = -1.0
                pruned = torch.argsort(group, dim=1, stable=True)[:, : nm.m - nm.n]
                mask1[:, j:j + nm.m].scatter_(1, pruned, False)
            col = w1[:, j]
            q = col * mask1[:, j]
            err = (col - q) / diag[j]
            w1[:, j:] -= err.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = q
            err1[:, j] = err
        w[:, i1:i2] = w1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1.matmul(upper[i1:i2, i2:])
    w.mul_(mask)
    return SolveResult(w, mask)
