"""``SparseLinear``: a linear layer whose weight is held in a kernel layout (bitmask, N:M or dense fp16/bf16).

It replaces an ``nn.Linear`` (or GPT-2's ``Conv1D``) in a loaded model for inference: ``forward`` calls
:func:`sparseforge.kernels.matmul`, which reads the compressed weight directly, accumulates in float32 and returns
float32, cast back to the activations' dtype. The module holds no dense copy of the weight, so the resident size of
a pruned model falls towards its export size. It is for inference only: it has no trainable parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import PackedWeight, dequantize, matmul


class SparseLinear(nn.Module):
    weight_is_out_in = True  # its ``weight`` (for statistics and views) is [out, in], as nn.Linear's

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, layout: str):
        super().__init__()
        self.packed = packed
        self.layout = layout  # "bitmask", "nm" or "dense": what the kernel reads
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)
        self.out_features, self.in_features = packed.shape

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
        nonzero = int(torch.count_nonzero(self.dense_weight()))
        biases = 0 if self.bias is None else self.bias.numel()
        return self.out_features * self.in_features + biases, nonzero + biases

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense [out, in] float32 tensor (for checks and for removing the runtime)."""
        return dequantize(self.packed).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.packed, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.layout} {self.packed.dtype}"
