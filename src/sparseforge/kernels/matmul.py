"""``matmul(x, packed)``: y = x @ W.T (+ bias) with W in a runtime layout, on the path :mod:`.dispatch` picks.

x may have any leading dimensions and any floating dtype; it is computed in float32 and y is float32. The kernels
are built for decode and small batches (1 to 63 rows: each weight chunk is decoded once per 4 rows); from 64 rows
on (prefill), the native path decodes the weight once to float32 and hands the product to PyTorch's blocked GEMM,
which is the better tool once the product is compute-bound.
"""

from __future__ import annotations

import torch

from .build import native
from .dispatch import resolve_isa
from .layouts import WINDOW, BitmaskWeight, DenseWeight, KernelInputError, NMWeight, PackedWeight
from .reference import matmul as reference_matmul


class PreparedMatmul:
    """``y = x @ W.T (+ bias)`` for one packed weight, with everything that does not depend on ``x`` settled once:
    the layout and bias checked, the bias in float32, the instruction set chosen and the native call bound. A
    model layer calls it once per token, so per-call work is only what ``x`` needs (flatten, float32, padding)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, isa: str = "auto"):
        if not isinstance(packed, (BitmaskWeight, NMWeight, DenseWeight)):
            raise KernelInputError(f"packed must be a BitmaskWeight, NMWeight or DenseWeight, not {type(packed).__name__}")
        self.packed = packed
        self.out_features, self.in_features = packed.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                raise KernelInputError(f"bias must be a tensor of shape [{self.out_features}], "
                                       f"got {list(getattr(bias, 'shape', []))}")
            bias = bias.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.bias = bias
        self.pad = -self.in_features % WINDOW  # the kernels read x in whole windows of 32 inputs
        target = resolve_isa(isa)
        self._native = None if target is None else self._bind(native(), target)

    def _bind(self, ops, target: str):
        packed, bias, in_features = self.packed, self.bias, self.in_features
        if isinstance(packed, BitmaskWeight):
            return lambda x, y: ops.bitmask_matmul(x, y, packed.values, packed.masks, packed.offsets, in_features,
                                                   bias, target)
        if isinstance(packed, NMWeight):
            return lambda x, y: ops.nm_matmul(x, y, packed.values, packed.positions, packed.pos_stride, packed.n,
                                              packed.m, in_features, bias, target)
        return lambda x, y: ops.dense_matmul(x, y, packed.values, bias, target)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise KernelInputError("x must be a floating-point tensor [..., in]")
        if x.shape[-1] != self.in_features:
            raise KernelInputError(f"x has {x.shape[-1]} inputs per row but the weight takes {self.in_features}")
        if x.device.type != "cpu":
            raise KernelInputError(f"x must be on the CPU, not {x.device}")
        rows = x.detach().reshape(-1, self.in_features).to(torch.float32)
        if self._native is None:
            y = reference_matmul(rows, self.packed, self.bias)
        else:
            rows = torch.nn.functional.pad(rows, (0, self.pad)) if self.pad else rows.contiguous()
            y = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
            self._native(rows, y)
        return y.reshape(*x.shape[:-1], self.out_features)


def matmul(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, isa: str = "auto"
           ) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) -> [..., out] float32. ``isa``: "auto", a name in
    :data:`~.dispatch.NATIVE_ISAS` (forced), or "torch" (the PyTorch path). For many calls with one weight, build
    a :class:`PreparedMatmul` once."""
    return PreparedMatmul(packed, bias, isa)(x)
