"""The column layout, for activation sparsity: ``y = x' @ W.T (+ bias)`` where ``x'`` is ``x`` with its entries of
magnitude below a threshold zeroed, reading only the weights of the inputs left.

Row layouts (:mod:`.layouts`) keep a weight row's inputs together, so a zero input saves nothing: its weights sit
in the same cache lines as its neighbours'. Here the weight is stored transposed, one row per input holding that
input's weights for every output, so the weights of a zeroed input are one contiguous block that is never read.
An earlier layout in tiles of 64 outputs (128 bytes per input) skipped too little: the hardware prefetchers pulled
the skipped neighbours in anyway, and 40% skipped inputs saved 10% of the time. :class:`ColumnWeight` is dense
when ``masks`` is None, else it keeps only a weight mask's kept values: per input a row of 64-bit masks over the
outputs and the values compacted, which stacks weight sparsity on activation sparsity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .build import native
from .dispatch import resolve_isa
from .layouts import KernelInputError, check_value_dtype
from .packing import _checked_mask, _checked_weight

PAD = 32  # readable elements past the values (kernels.h: kColumnPad)
WORD = 64  # outputs per mask word


@dataclass(frozen=True)
class ColumnWeight:
    values: torch.Tensor  # fp16/bf16; dense: [in * out + PAD] (row i = W[:, i]); bitmask: the kept values + PAD
    masks: torch.Tensor | None  # int64 [in * words]: bit j of word w of input i = output 64w + j kept
    bases: torch.Tensor | None  # int64 [in + 1]: where input i's kept values start
    shape: tuple[int, int]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def words(self) -> int:
        return math.ceil(self.shape[0] / WORD)

    @property
    def nbytes(self) -> int:
        """Bytes one product reads with every input active (padding excluded)."""
        if self.masks is None:
            return self.shape[0] * self.shape[1] * self.values.element_size()
        kept = int(self.bases[-1])
        return kept * self.values.element_size() + self.masks.numel() * 8 + self.bases.numel() * 8


def pack_columns(weight: torch.Tensor, mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float16,
                 masked: bool | None = None) -> ColumnWeight:
    """``weight`` [out, in] in the column layout; with a ``mask`` (or ``masked=True``: the nonzeros) only the kept
    values are stored."""
    check_value_dtype(dtype)
    weight = _checked_weight(weight)
    out, in_features = weight.shape
    columns = weight.t().to(dtype).contiguous()  # [in, out]
    pad = torch.zeros(PAD, dtype=dtype)
    if mask is None and not masked:
        return ColumnWeight(torch.cat([columns.reshape(-1), pad]), None, None, (out, in_features))
    keep = _checked_mask(weight, mask).t().contiguous()  # [in, out]
    words = math.ceil(out / WORD)
    padded = torch.nn.functional.pad(keep, (0, words * WORD - out)).reshape(in_features, words, WORD)
    bits = (padded.to(torch.int64) << torch.arange(WORD, dtype=torch.int64)).sum(dim=-1)  # wraps into the sign bit
    bases = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(dim=1).cumsum(0)])
    return ColumnWeight(torch.cat([columns[keep], pad]), bits.reshape(-1).contiguous(), bases, (out, in_features))


def column_dense(packed: ColumnWeight) -> torch.Tensor:
    """The [out, in] float32 weight a column layout holds (pruned weights zero)."""
    out, in_features = packed.shape
    if packed.masks is None:
        return packed.values[:in_features * out].float().reshape(in_features, out).t()
    bits = packed.masks.reshape(in_features, packed.words, 1)
    keep = ((bits >> torch.arange(WORD, dtype=torch.int64)) & 1).bool().reshape(in_features, -1)[:, :out]
    columns = torch.zeros(in_features, out)
    columns[keep] = packed.values[:int(packed.bases[-1])].float()
    return columns.t()


def zero_small(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` with the entries of magnitude below ``threshold`` set to zero (what activation sparsity computes)."""
    return x * (x.abs() >= threshold) if threshold > 0 else x


class PreparedColumns:
    """``zero_small(x, threshold) @ W.T (+ bias)`` for one column weight, with the checks and the instruction set
    settled once (the runtime's linears call it per token)."""

    def __init__(self, packed: ColumnWeight, bias: torch.Tensor | None = None, threshold: float = 0.0,
                 isa: str = "auto"):
        if threshold < 0:
            raise KernelInputError(f"the threshold must be at least 0, got {threshold:g}")
        self.packed, self.threshold = packed, float(threshold)
        self.out_features, self.in_features = packed.shape
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.target, self.ops = resolve_isa(isa), native()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise KernelInputError("x must be a floating-point tensor [..., in]")
        if x.shape[-1] != self.in_features:
            raise KernelInputError(f"x has {x.shape[-1]} inputs per row but the weight takes {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features).to(torch.float32).contiguous()
        packed = self.packed
        if self.target is None or self.ops is None:
            y = zero_small(rows, self.threshold) @ column_dense(packed).t()
            y = y + self.bias if self.bias is not None else y
        else:
            y = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
            self.ops.column_matmul(rows, y, packed.values, packed.masks, packed.bases,
                                   self.out_features, self.in_features, self.threshold, self.bias, self.target)
        return y.reshape(*x.shape[:-1], self.out_features)


def column_matmul(x: torch.Tensor, packed: ColumnWeight, threshold: float = 0.0, bias: torch.Tensor | None = None,
                  isa: str = "auto") -> torch.Tensor:
    """``zero_small(x, threshold) @ W.T (+ bias)`` -> float32 [..., out]; ``isa`` as :func:`~.matmul.matmul`. For
    many calls with one weight, build a :class:`PreparedColumns` once."""
    return PreparedColumns(packed, bias, threshold, isa)(x)
