"""ADMM weight updates and mask selection for a layer's reconstruction problem, and ALPS.

Every solver here minimises the layer's output error on the calibration inputs, ``||X W0^T - X W^T||^2 =
tr((W - W0) H (W - W0)^T)`` with ``H = X^T X``, over weights ``W`` restricted to a sparsity pattern. ADMM splits it
into a dense least-squares step and a projection onto the pattern (Boža, 2024; ALPS, Meng et al., 2024):

    W <- (W0 H + rho (Z - U)) (H + rho I)^-1      dense step (one eigendecomposition of H serves every rho)
    Z <- project(W + U)                           onto the mask (fixed), or choosing it (gradual, ALPS)
    U <- U + W - Z                                scaled dual

and then polishes ``Z`` on its final support with preconditioned conjugate gradients (PCG, Jacobi preconditioner,
all rows at once), which can only lower the error from where ADMM stopped. Three ways to get the mask:

* ``admm``: fixed, from a scorer (Wanda by default, or magnitude) — ADMM as a weight update for any mask;
* ``admm-gradual``: chosen inside ADMM, the target sparsity reached on a cubic schedule over the first
  ``ramp`` iterations (Boža's gradual pruning), scored with the Wanda criterion on ``W + U``;
* ``alps``: chosen inside ADMM by projecting ``W + U`` on the target (largest magnitudes), with ``rho`` raised
  according to how much the support still changes (ALPS), stopped once it is stable.

Choices the papers leave open or make differently, measured in ``bench/high_sparsity.py`` and written down in
``docs/solvers.md``: ``H`` is scaled to mean diagonal 1 and dampened by ``dampening`` (as SparseGPT, 0.01) so
``rho`` is scale-free; ``rho`` starts at ``rho``; the fixed-mask and gradual modes multiply it by ``rho_growth``
every iteration; PCG runs ``pcg_iterations`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PatternError
from ..sparsity.patterns import NM, Pattern

MODES = ("fixed", "gradual", "alps")


@dataclass
class ADMMConfig:
    iterations: int = 30
    rho: float = 0.1  # initial penalty, relative to the mean diagonal of H
    rho_growth: float = 1.2  # per iteration (fixed and gradual modes)
    ramp: int = 15  # gradual: iterations over which the sparsity reaches its target
    pcg_iterations: int = 20
    dampening: float = 0.01  # fraction of mean(diag H) added to the diagonal, as SparseGPT
    mask: str = "wanda"  # admm (fixed mask): the scorer that chooses it, wanda or magnitude

    def check(self, name: str) -> "ADMMConfig":
        problems = []
        if self.iterations < 1:
            problems.append(f"iterations must be at least 1, got {self.iterations}")
        if not (self.rho > 0 and math.isfinite(self.rho)):
            problems.append(f"rho must be positive, got {self.rho}")
        if not self.rho_growth >= 1:
            problems.append(f"rho_growth must be at least 1, got {self.rho_growth}")
        if not 0 < self.ramp <= self.iterations:
            problems.append(f"ramp must be in [1, iterations={self.iterations}], got {self.ramp}")
        if self.pcg_iterations < 0:
            problems.append(f"pcg_iterations must be at least 0, got {self.pcg_iterations}")
        if not 0 <= self.dampening < 1:
            problems.append(f"dampening must be in [0, 1), got {self.dampening}")
        if self.mask not in ("wanda", "magnitude"):
            problems.append(f"mask must be wanda or magnitude, got '{self.mask}'")
        if problems:
            raise PatternError(f"{name} options: " + "; ".join(problems))
        return self


@dataclass
class Hessian:
    """What every mode needs from ``H``, computed once per shared input: scaled and dampened ``H``, its
    eigendecomposition (so ``(H + rho I)^-1`` costs two matmuls for any ``rho``) and its diagonal."""

    matrix: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    diagonal: torch.Tensor


def prepare(hessian: torch.Tensor, dampening: float) -> Hessian:
    h = hessian.detach().double()
    scale = torch.diagonal(h).mean()
    if not torch.isfinite(scale) or scale <= 0:
        raise PatternError("the calibration Hessian is zero or not finite (dead or NaN activations)")
    h = h / scale
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0  # inputs that were always zero: any weight there is free, as in SparseGPT
    h += dampening * torch.eye(h.shape[0], dtype=h.dtype)
    values, vectors = torch.linalg.eigh(h)
    return Hessian(h.float(), values.float(), vectors.float(), torch.diagonal(h).float().clone())


def reconstruction_error(w0: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``tr((W - W0) H (W - W0)^T)`` per row (the output error the solvers minimise)."""
    delta = (w - w0).double()
    return ((delta @ hessian.double()) * delta).sum(dim=1)


def _threshold_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep the scores above the ``sparsity`` quantile (per row or overall): linear time, where the exact, stably
    sorted mask of the pattern costs a full sort. Ties may keep a few extra; fine inside the iterations."""
    flat = scores if per_row else scores.reshape(1, -1)
    count = round(sparsity * flat.shape[1])
    if count == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, count, dim=1, keepdim=True).values
    return (flat > threshold).reshape(scores.shape)


def _select(mode: str, values: torch.Tensor, diagonal: torch.Tensor, pattern: Pattern, sparsities: list[float],
            segments: list[int], exact: bool = True) -> torch.Tensor:
    """The mask of each stacked segment: Wanda's score on ``values`` (gradual) or plain magnitude (ALPS); the
    pattern's exact mask, or (``exact=False``, unstructured only) a quantile threshold for the iterations."""
    scores = values.abs() * (diagonal.sqrt() if mode == "gradual" else 1.0)
    if not exact and isinstance(pattern, NM):  # the n largest of each group, unsorted
        grouped = scores.reshape(scores.shape[0], -1, pattern.m)
        kept = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, grouped.topk(pattern.n, dim=-1).indices, True)
        return kept.reshape(scores.shape)
    masks, start = [], 0
    for rows, sparsity in zip(segments, sparsities):
        segment = scores[start:start + rows]
        masks.append(pattern.mask(segment, sparsity) if exact else
                     _threshold_mask(segment, sparsity, pattern.per_row))
        start += rows
    return torch.cat(masks)


def pcg(w0: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, h: Hessian, iterations: int) -> torch.Tensor:
    """Minimise the reconstruction error over the weights on ``mask``, from ``start``, one independent problem per
    row solved together; the error never rises above the start's (CG on a convex quadratic)."""
    keep = mask.float()
    x = start * keep
    residual = ((w0 - x) @ h.matrix) * keep  # minus half the gradient
    inverse_diag = 1.0 / h.diagonal
    z = residual * inverse_diag
    p = z.clone()
    rz = (residual * z).sum(dim=1, keepdim=True)
    for _ in range(iterations):
        ap = (p @ h.matrix) * keep
        curvature = (p * ap).sum(dim=1, keepdim=True)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        x = x + alpha * p
        residual = residual - alpha * ap
        z = residual * inverse_diag
        rz_next = (residual * z).sum(dim=1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_next
        if float(rz.max()) <= 1e-20:
            break
    return x * keep


def solve(weight: torch.Tensor, h: Hessian, pattern: Pattern, sparsities: list[float], segments: list[int],
          config: ADMMConfig, mode: str, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune ``weight`` [rows, in] (the stacked ``segments`` of linears sharing ``h``'s input).

    ``mode`` fixed needs ``mask``; gradual and alps choose it. Returns (weight, mask, trace) with the weight exactly
    zero off the mask; ``trace`` holds the iterations run and the final rho.
    """
    if mode not in MODES:
        raise PatternError(f"unknown ADMM mode '{mode}'; available: {', '.join(MODES)}")
    w0 = weight.detach().float()
    target = w0 @ h.matrix
    rotate = h.eigenvectors
    rho = config.rho
    current = mask if mode == "fixed" else torch.ones_like(w0, dtype=torch.bool)
    z = w0 * current
    u = torch.zeros_like(w0)
    stable, iterations = 0, 0
    for step in range(config.iterations):
        iterations = step + 1
        w = ((target + rho * (z - u)) @ rotate / (h.eigenvalues + rho)) @ rotate.T
        candidate = w + u
        if mode == "gradual":
            progress = min(1.0, (step + 1) / config.ramp)
            level = [s * (1 - (1 - progress) ** 3) for s in sparsities]
            current = _select(mode, candidate, h.diagonal, pattern, level, segments, exact=False)
        elif mode == "alps":
            chosen = _select(mode, candidate, h.diagonal, pattern, sparsities, segments, exact=False)
            changed = int((chosen != current).sum()) // 2 if step else chosen.numel()
            current = chosen
        z = candidate * current
        u = candidate - z
        if mode == "alps":
            kept = max(1, int(current.sum()))
            # ALPS raises rho faster while the support still moves, and stops once it has settled
            rho *= 1.3 if changed > 0.001 * kept else 1.2 if changed > 0 else 1.1
            stable = stable + 1 if changed == 0 else 0
            if stable >= 3 and float((w - z).norm()) <= 1e-3 * float(z.norm()):
                break
        else:
            rho *= config.rho_growth
    if mode != "fixed":  # the pattern's exact mask (exact counts, stable ties) on the last iterate
        current = _select(mode, z + u, h.diagonal, pattern, sparsities, segments)
        z = (z + u) * current
    polished = pcg(w0, z, current, h, config.pcg_iterations)
    return polished, current, {"iterations": iterations, "final_rho": rho}
