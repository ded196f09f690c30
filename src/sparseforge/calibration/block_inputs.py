"""Calibration windows captured at the input of decoder block 0, and running one block over them in batches.

Every block keeps the keyword arguments the model itself passes to it, per batch size, so a block replayed here
computes exactly what it computes inside the model (Gemma 3's sliding and full-attention layers included).
"""

from __future__ import annotations

import torch

from ..memory import release_freed_memory
from ..models.handle import LoadedModel
from .statistics import AllInputsSeen, StatisticsCollector


def _to(obj, device: torch.device, moved: dict[int, torch.Tensor]):
    """``obj`` with its tensors on ``device``; a tensor shared between blocks is moved once (``moved`` by id)."""
    if torch.is_tensor(obj):
        if id(obj) not in moved:
            moved[id(obj)] = obj.to(device)
        return moved[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, moved) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, moved) for k, v in obj.items()}
    return obj


class BlockInputs:
    """Captured block inputs in batches, and running one block over them (on the working device).

    Every block keeps the keyword arguments the model itself passes to it (see
    :meth:`~sparseforge.models.adapters.base.ModelAdapter.capture_inputs_per_block`), per batch size.
    """

    def __init__(self, handle: LoadedModel, windows: torch.Tensor, batch_size: int, device: torch.device):
        self.adapter = handle.adapter
        self.device = device
        self.batch_size = batch_size
        self.kwargs: dict[int, list[dict]] = {}  # batch size -> keyword arguments of each block
        self.ranges: list[tuple[int, int]] = []
        model_device = next(handle.model.parameters()).device
        hidden = []
        moved: dict[int, torch.Tensor] = {}
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(model_device)
            if batch.shape[0] not in self.kwargs:
                h, per_block = self.adapter.capture_inputs_per_block(batch)
                self.kwargs[batch.shape[0]] = _to(per_block, device, moved)
            else:
                h, _ = self.adapter.capture_block_inputs(batch, 0)
            hidden.append(h.to(device))
            self.ranges.append((start, start + batch.shape[0]))
        self.hidden = torch.cat(hidden)
        self.model_device = model_device

    def kwargs_of(self, index: int) -> dict[int, dict]:
        """Block ``index``'s keyword arguments by batch size."""
        return {size: per_block[index] for size, per_block in self.kwargs.items()}

    def run(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run block ``index`` over all windows in batches, in place: each batch's output replaces its input."""
        kwargs = self.kwargs_of(index)
        with torch.no_grad():
            for start, stop in self.ranges:
                hidden[start:stop] = self.adapter.run_block(index, hidden[start:stop], kwargs[stop - start])
        return hidden

    def calibrate(self, index: int, hidden: torch.Tensor, needs: frozenset[str]) -> StatisticsCollector:
        """Gather the input statistics of block ``index``'s linears; the forward stops after the last linear's input."""
        views = {v.name: v for v in self.adapter.block_linears(index).values()}
        kwargs = self.kwargs_of(index)
        with StatisticsCollector(views, needs, self.device) as collector, torch.no_grad():
            for start, stop in self.ranges:
                try:
                    self.adapter.run_block(index, hidden[start:stop], kwargs[stop - start])
                except AllInputsSeen:
                    pass
                collector.end_of_batch()
        return collector

    def on_device(self, index: int):
        block = self.adapter.blocks()[index]
        block.to(self.device)
        return block

    def release(self, index: int) -> None:
        self.adapter.blocks()[index].to(self.model_device)
        release_freed_memory()
