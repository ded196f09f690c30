"""``matmul(x, packed)``: y = x @ W.T (+ bias) with W in a runtime layout, on the path :mod:`.dispatch` picks.

x may have any leading dimensions and any floating dtype; it is computed in float32 and y is float32. The kernels
are built for decode and small batches (1 to 16 rows: each weight chunk is decoded once per 4 rows); more rows
work, but a dense GEMM is the better tool there.
"""

from __future__ import annotations

import torch

from .build import native
from .dispatch import resolve_isa
from .layouts import WINDOW, BitmaskWeight, DenseWeight, KernelInputError, NMWeight, PackedWeight
from .reference import matmul as reference_matmul


def _checked_inputs(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None):
    if not isinstance(packed, (BitmaskWeight, NMWeight, DenseWeight)):
        raise KernelInputError(f"packed must be a BitmaskWeight, NMWeight or DenseWeight, not {type(packed).__name__}")
    out, in_features = packed.shape
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise KernelInputError("x must be a floating-point tensor [..., in]")
    if x.shape[-1] != in_features:
        raise KernelInputError(f"x has {x.shape[-1]} inputs per row but the weight takes {in_features}")
    if x.device.type != "cpu":
        raise KernelInputError(f"x must be on the CPU, not {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out,):
            raise KernelInputError(f"bias must be a tensor of shape [{out}], got {list(getattr(bias, 'shape', []))}")
        bias = bias.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return x.detach().reshape(-1, in_features).to(torch.float32), bias


def matmul(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, isa: str = "auto"
           ) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) -> [..., out] float32. ``isa``: "auto", a name in
    :data:`~.dispatch.NATIVE_ISAS` (forced), or "torch" (the PyTorch path)."""
    rows, bias = _checked_inputs(x, packed, bias)
    out, in_features = packed.shape
    target = resolve_isa(isa)
    if target is None:
        y = reference_matmul(rows, packed, bias)
    else:
        pad = -in_features % WINDOW  # the kernels read x in whole windows of 32 inputs
        xp = torch.nn.functional.pad(rows, (0, pad)) if pad else rows.contiguous()
        y = torch.empty(rows.shape[0], out, dtype=torch.float32)
        ops = native()
        if isinstance(packed, BitmaskWeight):
            ops.bitmask_matmul(xp, y, packed.values, packed.masks, packed.offsets, in_features, bias, target)
        elif isinstance(packed, NMWeight):
            ops.nm_matmul(xp, y, packed.values, packed.positions, packed.pos_stride, packed.n, packed.m,
                          in_features, bias, target)
        else:
            ops.dense_matmul(xp, y, packed.values, bias, target)
    return y.reshape(*x.shape[:-1], out)
