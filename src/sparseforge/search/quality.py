"""Measuring a candidate allocation: the objectives the searches minimise.

* ``kl``: KL(dense || candidate) of next-token distributions, averaged over every position of a fixed set of
  calibration windows (EvoPress's default fitness). Several *fidelities* (token sets of different sizes) serve
  multi-fidelity selection; the dense model's side of each is computed once (:class:`Reference`).
* ``local``: a group of consecutive blocks' output reconstruction error on its *dense* inputs, relative to the
  dense output's energy: ||f_pruned(Z_in) - Z_out||^2 / ||Z_out||^2. It needs only the group's blocks, which is
  what makes searching a sub-network cheap (the decomposition's local proxy).
* ``perplexity``: held-out perplexity under the pinned protocol, for the final comparison.

Results are exact functions of the allocation: the same allocation gives bit-identical numbers in any process
(checked for 1 vs 2 threads), which is what lets Ray workers reproduce a serial search exactly.
"""

from __future__ import annotations

import torch

from ..evaluation.perplexity import perplexity
from ..calibration.block_inputs import BlockInputs
from ..structured.divergence import Reference
from .bank import VariantBank


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch.to(device), use_cache=False).logits[:, :-1]


class QualityMeter:
    def __init__(self, bank: VariantBank, fidelities: dict[str, torch.Tensor], local_windows: torch.Tensor,
                 batch_size: int = 4):
        self.bank = bank
        self.model = bank.handle.model
        self.fidelities = fidelities
        self.local_windows = local_windows
        self.batch_size = batch_size
        self._references: dict[str, list[tuple[Reference, int]]] = {}
        self._boundaries: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._blocks: BlockInputs | None = None

    @torch.no_grad()
    def _reference(self, fidelity: str) -> list[tuple[Reference, int]]:
        if fidelity not in self._references:
            saved = list(self.bank.current)
            self.bank.apply([0.0] * len(saved))
            references = []
            for batch in self.fidelities[fidelity].split(self.batch_size):
                logits = _logits(self.model, batch)
                references.append((Reference("kl", logits), logits.shape[0] * logits.shape[1]))
            self._references[fidelity] = references
            self.bank.apply([s if s is not None else 0.0 for s in saved])
        return self._references[fidelity]

    @torch.no_grad()
    def kl(self, sparsities: list[float], fidelity: str) -> float:
        references = self._reference(fidelity)
        self.bank.apply(sparsities)
        total, count = 0.0, 0
        for (reference, positions), batch in zip(references, self.fidelities[fidelity].split(self.batch_size)):
            total += reference.distance(_logits(self.model, batch)) * positions
            count += positions
        return total / count

    @torch.no_grad()
    def _group_io(self, first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense inputs of block ``first`` and the dense outputs of block ``stop - 1`` on the local windows."""
        if (first, stop) not in self._boundaries:
            saved = list(self.bank.current)
            self.bank.apply([0.0] * len(saved))
            if self._blocks is None:
                device = next(self.model.parameters()).device
                self._blocks = BlockInputs(self.bank.handle, self.local_windows, self.batch_size, device)
            hidden = self._blocks.hidden.clone()
            for index in range(first):
                hidden = self._blocks.run(index, hidden)
            inputs = hidden.clone()
            for index in range(first, stop):
                hidden = self._blocks.run(index, hidden)
            self._boundaries[(first, stop)] = (inputs, hidden)
            self.bank.apply([s if s is not None else 0.0 for s in saved])
        return self._boundaries[(first, stop)]

    @torch.no_grad()
    def local_error(self, first: int, group_sparsities: list[float]) -> float:
        stop = first + len(group_sparsities)
        inputs, targets = self._group_io(first, stop)
        for offset, sparsity in enumerate(group_sparsities):
            self.bank.apply_block(first + offset, sparsity)
        hidden = inputs.clone()
        for index in range(first, stop):
            hidden = self._blocks.run(index, hidden)
        return float((hidden - targets).double().square().sum() / targets.double().square().sum())

    def perplexity(self, sparsities: list[float], windows: torch.Tensor) -> dict:
        self.bank.apply(sparsities)
        return perplexity(self.model, windows, batch_size=self.batch_size, progress=False)
