"""The streamed block store: a decoder block is in memory only while the pipeline works on it.

The model is a skeleton whose block parameters live on the ``meta`` device (shapes, no storage). Loading block
``i`` reads its tensors from the source checkpoint (or, for a block an interrupted run already finished, from the
checkpoint); when the pipeline is done with it, its finished state is checkpointed *encoded exactly as the export
stores it* (export dtype, bitmask / N:M / dense), so the checkpoint doubles as the export's pieces and a resumed
run writes the same bytes; then the block goes back to ``meta`` and its masks are dropped from memory.
"""

from __future__ import annotations

import torch
from accelerate.utils import set_module_tensor_to_device

from ..calibration.block_inputs import BlockStore, block_parameters
from ..errors import SparseforgeError
from ..export.formats import ENCODINGS
from ..export.reader import decode_state
from ..export.saving import encode_tensor
from ..models.handle import LoadedModel
from .source import WeightSource


def materialize(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    set_module_tensor_to_device(model, name, value.device, value=value)


def dematerialize(model: torch.nn.Module, name: str) -> None:
    set_module_tensor_to_device(model, name, "meta")


class StreamedBlocks(BlockStore):
    """Blocks read from ``source`` in ``compute_dtype`` and checkpointed encoded as ``fmt`` in ``export_dtype``."""

    streamed = True

    def __init__(self, handle: LoadedModel, source: WeightSource, compute_dtype: torch.dtype, fmt: str,
                 export_dtype: torch.dtype, encoded: dict | None = None, capture_only: list[str] = ()):
        """``capture_only``: tensors outside the blocks that only capturing block 0's inputs needs (embeddings):
        materialised now, released once the inputs are captured (113 MB on the default model, fp32)."""
        self.handle, self.source, self.compute_dtype = handle, source, compute_dtype
        self.capture_only = list(capture_only)
        for name in self.capture_only:
            materialize(handle.model, name, source.tensor(name, compute_dtype))
        self.fmt, self.export_dtype = fmt, export_dtype
        self.encoded: dict[str, dict] = dict(encoded or {})  # manifest entries of the finished blocks' tensors
        self.finished_blocks: dict[int, object] = {}  # index -> checkpoint it can be restored from
        self.loaded: set[int] = set()

    def load(self, index: int) -> None:
        if index in self.loaded:
            return
        model = self.handle.model
        names = block_parameters(self.handle.adapter, index)
        if index in self.finished_blocks:  # finished by an interrupted run: its encoded checkpoint, decoded
            raw = self.finished_blocks[index].block_tensors(index)
            described = {k: v for k, v in self.encoded.items() if k in names}
            state, _ = decode_state(raw, {"dtype": str(self.export_dtype).removeprefix("torch."),
                                          "tensors": described}, f"checkpoint of block {index}")
            for name in names:
                materialize(model, name, state[name].to(self.compute_dtype))
        else:
            for name in names:
                materialize(model, name, self.source.tensor(name, self.compute_dtype))
        self.loaded.add(index)

    def evict(self, index: int) -> None:
        if index not in self.loaded:
            return
        for name in block_parameters(self.handle.adapter, index):
            dematerialize(self.handle.model, name)
        for view in self.handle.adapter.block_linears(index).values():
            self.handle.masks.pop(view.name, None)
        self.loaded.discard(index)

    def inputs_captured(self) -> None:
        for name in self.capture_only:
            dematerialize(self.handle.model, name)
        self.capture_only = []

    def restore(self, handle: LoadedModel, index: int, checkpoint) -> None:
        self.finished_blocks[index] = checkpoint  # read again only if a later block's inputs must be rebuilt

    def finished(self, handle: LoadedModel, index: int) -> dict[str, torch.Tensor]:
        views = {f"{v.name}.weight": v for v in handle.adapter.block_linears(index).values()}
        stored: dict[str, torch.Tensor] = {}
        for name, param in block_parameters(handle.adapter, index).items():
            view = views.get(name)
            layer_mask = (handle.masks[view.name], view.transposed) if view is not None and \
                view.name in handle.masks else None
            encoding, params = None, None
            if layer_mask is not None and self.fmt != "dense":
                encoding, params = self.fmt, ENCODINGS[self.fmt].applicable(layer_mask[0])
                if params is None:
                    raise SparseforgeError(f"format {self.fmt} cannot store the mask of {view.name} exactly")
            parts, info = encode_tensor(name, param.detach(), self.export_dtype, layer_mask, encoding, params)
            stored.update(parts)
            if info is not None:
                self.encoded[name] = info
        return stored

    def state(self) -> dict:
        return {"encoded": self.encoded}
