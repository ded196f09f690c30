"""Input statistics of linear layers, gathered by forward hooks during the layer-sequential calibration pass.

Each method declares which statistics it needs (``norms`` for Wanda and OWL, ``moments`` for DSnoT, ``hessian``
for SparseGPT), and only those are accumulated: a Hessian of a 1536-wide input costs as much as the layer's own
forward pass. Linears that read the same input tensor (q/k/v; gate/up; GPT-2's single fused qkv) share one
statistic object, found by tensor identity at run time, so no architecture needs to declare its sharing and the
shared Hessian is computed once instead of three times.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.adapters import LinearView

class AllInputsSeen(Exception):
    """Raised by the hooks once every linear of the block has seen its input: the rest of the forward is waste."""


GRAM_STRIP = 256


def _add_upper_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """Add the upper triangle (and diagonal blocks) of ``x^T x`` to ``gram``, one matmul per strip of rows.

    ``X^T X`` is symmetric, and BLAS has no symmetric rank-k update in torch; strips of ``GRAM_STRIP`` rows cut
    the work to about half (58% for a 1536-wide input), on strided views, without copies.
    """
    width = x.shape[1]
    for start in range(0, width, GRAM_STRIP):
        stop = min(start + GRAM_STRIP, width)
        gram[start:stop, start:].addmm_(x[:, start:stop].t(), x[:, start:])


_SQUARES_CHUNK_BYTES = 512 * 1024


@dataclass
class InputStatistics:
    """Running statistics of one input feature space (the input of one or more linears)."""

    features: int
    needs: frozenset[str]
    device: torch.device
    tokens: int = 0
    samples: int = 0
    sum: torch.Tensor | None = None
    sum_squares: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)  # results derived from complete statistics (e.g. a factorisation)

    def __post_init__(self) -> None:
        zeros = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=self.device)  # noqa: E731
        if self.needs & {"norms", "moments"} or "hessian" not in self.needs:
            self.sum_squares = zeros(self.features, dtype=torch.float64)
        if "moments" in self.needs:
            self.sum = zeros(self.features, dtype=torch.float64)
        if "hessian" in self.needs:
            self.hessian = zeros(self.features, self.features, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs shaped [batch, ..., features]."""
        self.samples += x.shape[0] if x.dim() > 2 else 1
        flat = x.reshape(-1, self.features).float()
        self.tokens += flat.shape[0]
        if self.hessian is not None:
            _add_upper_gram(self.hessian, flat)
        # reductions without a full-size temporary (a squared copy of a 32k x 1536 input is 200 MB): squares of
        # row chunks under 1 MiB (heap-served, see sparseforge.memory); vector_norm over dim 0 took 6-8x as long
        if self.sum_squares is not None:
            rows = max(1, _SQUARES_CHUNK_BYTES // (4 * self.features))
            for chunk in flat.split(rows):
                self.sum_squares += (chunk * chunk).sum(0).double()
        if self.sum is not None:
            self.sum += flat.sum(0).double()

    # --- derived quantities (all float32, on the statistics' device) --------------------------------------------
    def hessian_matrix(self) -> torch.Tensor:
        """The full symmetric ``X^T X`` (only its upper triangle is accumulated)."""
        return torch.triu(self.hessian) + torch.triu(self.hessian, 1).t()

    def squared_norms(self) -> torch.Tensor:
        """sum over calibration tokens of x_j^2 (the Hessian's diagonal when only the Hessian was kept)."""
        if self.sum_squares is not None:
            return self.sum_squares.float()
        return torch.diagonal(self.hessian).clone()

    def norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens: the Wanda feature norm."""
        return self.squared_norms().sqrt()

    def mean(self) -> torch.Tensor:
        return (self.sum / self.tokens).float()

    def variance(self) -> torch.Tensor:
        mean = self.sum / self.tokens
        return (self.sum_squares / self.tokens - mean.square()).clamp_min(0).float()

    def sample_sum_mean(self) -> torch.Tensor:
        """Mean over calibration windows of each window's token sum (DSnoT's expected contribution scale)."""
        return (self.sum / self.samples).float()


@dataclass
class StatisticsCollector:
    """Forward pre-hooks on a block's linears that accumulate :class:`InputStatistics`, shared by input."""

    views: dict[str, LinearView]
    needs: frozenset[str]
    device: torch.device
    stats: dict[str, InputStatistics] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    stop_when_complete: bool = True
    _seen: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    _called: set[str] = field(default_factory=set)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> "StatisticsCollector":
        for name, view in self.views.items():
            self._handles.append(view.module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.end_of_batch()

    def end_of_batch(self) -> None:
        """Forget the tensors of the last forward call (they only identify shared inputs within one call)."""
        self._seen.clear()
        self._called.clear()

    def _done(self, name: str) -> None:
        self._called.add(name)
        if self.stop_when_complete and len(self._called) == len(self.views):
            raise AllInputsSeen

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            shared_with = next((owner for seen, owner in self._seen if seen is x), None)
            if shared_with is not None:
                if self.owner.setdefault(name, shared_with) != shared_with:
                    raise RuntimeError(f"{name} changed which input it shares between calibration batches")
                return self._done(name)
            if self.owner.setdefault(name, name) != name:
                raise RuntimeError(f"{name} changed which input it shares between calibration batches")
            if name not in self.stats:
                self.stats[name] = InputStatistics(x.shape[-1], self.needs, self.device)
            self.stats[name].update(x.detach().to(self.device))
            self._seen.append((x, name))  # holding x keeps its identity unique for the rest of this call
            self._done(name)

        return hook

    def groups(self) -> list[list[str]]:
        """Names of the linears grouped by shared input, in forward order."""
        grouped: dict[str, list[str]] = {}
        for name in self.views:
            if name not in self.owner:
                raise RuntimeError(f"linear {name} was never called during calibration")
            grouped.setdefault(self.owner[name], []).append(name)
        return list(grouped.values())

    def of(self, name: str) -> InputStatistics:
        return self.stats[self.owner[name]]
