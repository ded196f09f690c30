"""``SparseLinear``: a linear layer whose weight is held in a kernel layout (bitmask, N:M or dense fp16/bf16).

It replaces an ``nn.Linear`` (or GPT-2's ``Conv1D``) in a loaded model for inference: ``forward`` calls
:class:`sparseforge.kernels.PreparedMatmul`, which reads the compressed weight directly, accumulates in float32 and returns
float32, cast back to the activations' dtype. The module holds no dense copy of the weight, so the resident size of
a pruned model falls towards its export size. It is for inference only: it has no trainable parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import ColumnWeight, PackedWeight, PreparedMatmul, dequantize
from ..kernels.columns import PreparedColumns, column_dense


class SparseLinear(nn.Module):
    weight_is_out_in = True  # its ``weight`` (for statistics and views) is [out, in], as nn.Linear's

    def __init__(self, packed: PackedWeight | ColumnWeight, bias: torch.Tensor | None, layout: str,
                 threshold: float = 0.0):
        super().__init__()
        self.packed = packed
        self.layout = layout  # "bitmask", "nm", "dense", "column" or "column bitmask": what the kernel reads
        # column layouts only: inputs of smaller magnitude are zeroed first (activation sparsity)
        self.threshold = threshold
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)
        self.out_features, self.in_features = packed.shape
        # checks and dispatch settled once, not per token
        self._product = PreparedColumns(packed, self.bias, threshold) if isinstance(packed, ColumnWeight) \
            else PreparedMatmul(packed, self.bias)

    @property
    def read_bytes(self) -> int:
        """Bytes of weights (and bias) one forward reads: what bounds decoding speed."""
        return self.packed.nbytes + (0 if self.bias is None else self.bias.numel() * 4)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, computed on demand (statistics and views read it; inference never does)."""
        return self.dense_weight()

    def weight_counts(self) -> tuple[int, int]:
        """(weights, nonzero weights) held in the packed layout, bias included: for parameter statistics."""
        nonzero = int(torch.count_nonzero(self.packed.values))  # kept values (their padding is zeros)
        biases = 0 if self.bias is None else self.bias.numel()
        return self.out_features * self.in_features + biases, nonzero + biases

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense [out, in] float32 tensor (for checks and for removing the runtime)."""
        if isinstance(self.packed, ColumnWeight):
            return column_dense(self.packed)
        return dequantize(self.packed).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x).to(x.dtype)

    def extra_repr(self) -> str:
        threshold = f", inputs below {self.threshold:.4g} zeroed" if self.threshold > 0 else ""
        return f"{self.in_features} -> {self.out_features}, {self.layout} {self.packed.dtype}{threshold}"


class FusedLinear(SparseLinear):
    """Several projections that read the same input (q, k, v; gate, up) as one packed weight: one kernel call
    instead of several, each member a :class:`SliceLinear` of the output.

    The output of the last input is kept: the members are called one after another with the same tensor object,
    so the second and third get their slice without computing. A different tensor, or the same one changed in
    place (its version counter moves), is computed afresh, so a member called on another input is still right."""

    def __init__(self, packed: PackedWeight | ColumnWeight, bias: torch.Tensor | None, layout: str,
                 threshold: float = 0.0):
        super().__init__(packed, bias, layout, threshold)
        self._last: tuple | None = None

    def output_for(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        y = super().forward(x)
        self._last = (x, x._version, y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_for(x)


class SliceLinear(nn.Module):
    """One member of a :class:`FusedLinear`: output features ``start:stop`` of the fused product."""

    weight_is_out_in = True

    def __init__(self, fused: FusedLinear, start: int, stop: int, has_bias: bool):
        super().__init__()
        self.fused, self.start, self.stop, self.has_bias = fused, start, stop, has_bias
        self.in_features, self.out_features = fused.in_features, stop - start

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.dense_weight()[self.start:self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.fused.bias[self.start:self.stop] if self.has_bias else None

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output_for(x)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of the fused {self.fused.layout} weight"


class HalfEmbedding(nn.Module):
    """Token embeddings read from fp16/bf16 values, returned in the model's dtype. With a tied LM head the values
    are the head's own packed weight, so the matrix is resident once, in half precision."""

    def __init__(self, values: torch.Tensor, dtype: torch.dtype, tied: bool):
        super().__init__()
        self.values, self.dtype, self.tied = values, dtype, tied
        self.num_embeddings, self.embedding_dim = values.shape

    def weight_counts(self) -> tuple[int, int]:
        """For parameter statistics; a matrix shared with the LM head is counted there."""
        return (0, 0) if self.tied else (self.values.numel(), int(torch.count_nonzero(self.values)))

    @property
    def weight(self) -> torch.Tensor:
        return self.values

    @property
    def read_bytes(self) -> int:
        return self.embedding_dim * self.values.element_size()  # one row per token

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.values).to(self.dtype)
