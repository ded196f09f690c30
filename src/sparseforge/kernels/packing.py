"""Pack a weight and its keep-mask into a runtime layout (:mod:`.layouts`).

Packing runs once per weight, at load time, in vectorised PyTorch/NumPy; the kernels then read only the packed
tensors. Values are rounded to the requested 16-bit type here, so every kernel and the PyTorch fallback multiply
exactly the same numbers.
"""

from __future__ import annotations

import math

import torch

from .layouts import (NM_GROUP_SIZES, POSITION_PAD, VALUE_PAD, WINDOW, BitmaskWeight, DenseWeight,
                      KernelInputError, NMWeight, check_value_dtype, pack_positions)


def _checked_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise KernelInputError("weight must be a floating-point [out, in] tensor")
    if min(weight.shape) == 0:
        raise KernelInputError(f"weight must have out > 0 and in > 0, got {list(weight.shape)}")
    return weight.detach().cpu()


def _checked_mask(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return weight != 0
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(weight.shape):
        raise KernelInputError(f"mask shape {list(getattr(mask, 'shape', []))} differs from weight shape "
                               f"{list(weight.shape)}")
    return mask.detach().cpu().bool()


def bitmask_words(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask [out, in] -> int32 [out, ceil(in / 32)]: bit j of word c is input 32c + j."""
    out, in_features = mask.shape
    chunks = math.ceil(in_features / WINDOW)
    padded = torch.nn.functional.pad(mask, (0, chunks * WINDOW - in_features)).reshape(out, chunks, WINDOW)
    words = (padded.to(torch.int64) << torch.arange(WINDOW)).sum(dim=-1)
    return (words - (words >> 31 << 32)).to(torch.int32)  # reinterpret as signed


def offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.to(torch.int64).cumsum(0)])


def with_value_pad(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.reshape(-1), values.new_zeros(VALUE_PAD)])


def pack_bitmask(weight: torch.Tensor, mask: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float16) -> BitmaskWeight:
    """Keep ``weight[mask]`` (``mask=None``: the nonzeros) in the bitmask layout, values as ``dtype``."""
    check_value_dtype(dtype)
    weight = _checked_weight(weight)
    mask = _checked_mask(weight, mask)
    return BitmaskWeight(values=with_value_pad(weight[mask].to(dtype)), masks=bitmask_words(mask),
                         offsets=offsets_from_counts(mask.sum(dim=1)), shape=tuple(weight.shape))


def nm_weight(values: torch.Tensor, pos: torch.Tensor, n: int, m: int, shape: tuple[int, int]) -> NMWeight:
    """NMWeight from kept values [out, in * n / m] and their positions in their groups (same shape)."""
    positions = pack_positions(pos, n, m, shape[1]).reshape(-1)
    return NMWeight(values=values.contiguous(), positions=torch.cat([positions, positions.new_zeros(POSITION_PAD)]),
                    n=n, m=m, shape=shape)


def pack_nm(weight: torch.Tensor, mask: torch.Tensor | None, n: int, m: int,
            dtype: torch.dtype = torch.float16) -> NMWeight:
    """Keep exactly ``n`` of every ``m`` consecutive inputs of each row (``mask=None``: the nonzeros, which must
    then be exactly n per group) in the N:M layout, values as ``dtype``."""
    check_value_dtype(dtype)
    if m not in NM_GROUP_SIZES or not 1 <= n <= m:
        raise KernelInputError(f"N:M needs m in {NM_GROUP_SIZES} and 1 <= n <= m, got {n}:{m}")
    weight = _checked_weight(weight)
    mask = _checked_mask(weight, mask)
    out, in_features = weight.shape
    if in_features % m:
        raise KernelInputError(f"{in_features} inputs are not whole groups of {m}")
    groups = mask.reshape(out, in_features // m, m)
    counts = groups.sum(dim=-1)
    if not bool((counts == n).all()):
        row, group = (counts != n).nonzero()[0].tolist()
        raise KernelInputError(f"mask is not {n}:{m}: row {row}, group {group} keeps {int(counts[row, group])}")
    lane = torch.arange(m)
    pos = torch.where(groups, lane, m + lane).sort(dim=-1).values[..., :n]  # kept lanes, ascending
    values = weight.reshape(out, -1, m).gather(-1, pos).reshape(out, -1).to(dtype)
    return nm_weight(values, pos.reshape(out, -1), n, m, (out, in_features))


def pack_dense(weight: torch.Tensor, dtype: torch.dtype = torch.float16) -> DenseWeight:
    """The dense weight as ``dtype``: the same-precision baseline the sparse layouts are measured against."""
    check_value_dtype(dtype)
    return DenseWeight(values=_checked_weight(weight).to(dtype).contiguous())
