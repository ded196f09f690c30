"""The PyTorch path: decompress the packed weight to fp32 and multiply.

It is the fallback when the native kernels cannot be built and the reference the tests hold them to; it decodes
the same runtime layouts, so it also checks that packing is lossless (apart from the 16-bit rounding of values).
"""

from __future__ import annotations

import torch

from .layouts import WINDOW, BitmaskWeight, DenseWeight, NMWeight, PackedWeight, unpack_positions


def bitmask_mask(packed: BitmaskWeight) -> torch.Tensor:
    """The bool keep-mask [out, in] of a bitmask layout."""
    out, in_features = packed.shape
    bits = (packed.masks.to(torch.int64)[..., None] >> torch.arange(WINDOW)) & 1
    return bits.reshape(out, -1)[:, :in_features].bool()


def nm_mask(packed: NMWeight) -> torch.Tensor:
    """The bool keep-mask [out, in] of an N:M layout."""
    out, in_features = packed.shape
    rows = packed.positions[: out * packed.pos_stride].reshape(out, packed.pos_stride)
    pos = unpack_positions(rows, packed.n, packed.m, in_features).reshape(out, -1, packed.n)
    mask = torch.zeros(out, in_features // packed.m, packed.m, dtype=torch.bool)
    return mask.scatter_(-1, pos, True).reshape(out, in_features)


def dequantize(packed: PackedWeight) -> torch.Tensor:
    """The weight [out, in] in float32, zeros where pruned."""
    if isinstance(packed, DenseWeight):
        return packed.values.float()
    if isinstance(packed, BitmaskWeight):
        mask, values = bitmask_mask(packed), packed.values[: packed.nnz]
    else:
        mask, values = nm_mask(packed), packed.values.reshape(-1)
    weight = torch.zeros(packed.shape, dtype=torch.float32)
    weight[mask] = values.float()
    return weight


def matmul(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in] float32 @ W.T (+ bias) -> [rows, out] float32."""
    return torch.nn.functional.linear(x, dequantize(packed), bias)
