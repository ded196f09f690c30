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

    def __init__(self, handle: LoadedModel, windows: torch.Tensor, batch_size: int, device: torch.device,
                 store: "BlockStore | None" = None):
        self.adapter = handle.adapter
        self.device = device
        self.batch_size = batch_size
        self.store = store or BlockStore()
        self.kwargs: dict[int, list[dict]] = {}  # batch size -> keyword arguments of each block
        self.ranges: list[tuple[int, int]] = []
        model_device = self.adapter.embed_tokens().weight.device
        hidden = []
        moved: dict[int, torch.Tensor] = {}
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(model_device)
            if batch.shape[0] not in self.kwargs:
                h, per_block = self.adapter.capture_inputs_per_block(batch, bypass_blocks=self.store.streamed)
                self.kwargs[batch.shape[0]] = _to(per_block, device, moved)
            else:
                h, _ = self.adapter.capture_block_inputs(batch, 0)
            hidden.append(h.to(device))
            self.ranges.append((start, start + batch.shape[0]))
        self.hidden = torch.cat(hidden)
        self.model_device = model_device
        self.store.inputs_captured()

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

    def kwargs_bytes(self) -> int:
        """Bytes of the captured keyword arguments (attention masks, position embeddings), shared ones once."""
        seen: dict[int, int] = {}

        def visit(obj) -> None:
            if torch.is_tensor(obj):
                seen[id(obj)] = obj.nbytes
            elif isinstance(obj, (tuple, list)):
                for item in obj:
                    visit(item)
            elif isinstance(obj, dict):
                for item in obj.values():
                    visit(item)

        visit(self.kwargs)
        return sum(seen.values())

    def on_device(self, index: int):
        self.store.load(index)
        block = self.adapter.blocks()[index]
        block.to(self.device)
        return block

    def release(self, index: int) -> None:
        """Done with block ``index`` for now: back where the model lives (or, streamed, out of memory)."""
        self.adapter.blocks()[index].to(self.model_device)
        self.store.evict(index)
        release_freed_memory()


def block_parameters(adapter, index: int) -> dict[str, torch.nn.Parameter]:
    """Every parameter of one block by its model-level name: what a checkpoint must restore (weights, and the norms
    and biases that reconstruction trains)."""
    prefix = f"{adapter.spec.blocks}.{index}"
    return {f"{prefix}.{name}": p for name, p in adapter.blocks()[index].named_parameters()}


class BlockStore:
    """Where the pipeline's blocks live between uses, and what a finished block's checkpoint holds.

    This one keeps every block in memory (pruning a loaded model): a checkpoint holds a block's weights and masks,
    and resuming copies them back. The streamed store (:mod:`sparseforge.streaming.blocks`) reads each block from
    disk when it is needed, checkpoints it encoded as it will be exported, and lets it go.
    """

    streamed = False

    def load(self, index: int) -> None:
        """Make block ``index``'s weights resident (a no-op when they always are)."""

    def evict(self, index: int) -> None:
        """Block ``index`` is not needed in memory any more (a no-op when every block stays)."""

    def inputs_captured(self) -> None:
        """Block 0's inputs are captured: what only the capture needed (embeddings) may go (kept here)."""

    def restore(self, handle: LoadedModel, index: int, checkpoint) -> None:
        """Put finished block ``index`` back as the checkpoint recorded it (weights and masks)."""
        saved = checkpoint.block_tensors(index)
        with torch.no_grad():
            for name, param in block_parameters(handle.adapter, index).items():
                param.copy_(saved[name].to(param.device, param.dtype))
        for view in handle.adapter.block_linears(index).values():
            handle.masks[view.name] = saved[f"{view.name}.mask"]

    def finished(self, handle: LoadedModel, index: int) -> dict[str, torch.Tensor]:
        """What the checkpoint keeps of finished block ``index``."""
        tensors = {name: param.detach() for name, param in block_parameters(handle.adapter, index).items()}
        for view in handle.adapter.block_linears(index).values():
            tensors[f"{view.name}.mask"] = handle.masks[view.name]
        return tensors

    def state(self) -> dict:
        """Run-level records the checkpoint's state must carry for this store (none here)."""
        return {}

    def resident_weight_bytes(self, handle: LoadedModel) -> int:
        """Bytes of model weights in memory now (each shared tensor once)."""
        tensors = {id(p): p for p in handle.model.parameters() if p.device.type != "meta"}
        return sum(p.nbytes for p in tensors.values())
