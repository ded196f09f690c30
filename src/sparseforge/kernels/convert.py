"""Runtime layouts straight from the export encodings (:mod:`sparseforge.export.formats`), never building the
dense weight: a saved ``bitmask`` or ``nm`` tensor becomes a :class:`~.layouts.BitmaskWeight` or
:class:`~.layouts.NMWeight` in memory proportional to the compressed size.

* ``bitmask`` export: kept values in row-major order plus ``np.packbits`` of the whole mask, most significant bit
  first, rows not byte-aligned. Each 32-bit runtime word is read as 5 bytes of that stream at its bit offset and
  bit-reversed, so the conversion costs O(out * in / 32) integer operations.
* ``nm`` export: kept values ``[out, in * n / m]`` plus each group's layout rank in ``ceil(log2 C(m, n))`` bits.
  Ranks are decoded with the export's own ``unpack_uint`` and ``layout_codes``, a block of rows at a time.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..export.reader import layout_codes, rank_bits, unpack_uint
from .layouts import (NM_GROUP_SIZES, WINDOW, BitmaskWeight, KernelInputError, NMWeight, check_value_dtype,
                      popcount32)
from .packing import nm_weight, offsets_from_counts, with_value_pad

_BYTE_REVERSED = np.array([int(f"{b:08b}"[::-1], 2) for b in range(256)], dtype=np.uint8)
_NM_ROWS_PER_BLOCK = 1024  # a multiple of 8, so every block of rows starts on a byte of the rank stream


def _values_dtype(values: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        if values.dtype not in (torch.float16, torch.bfloat16):
            raise KernelInputError(f"values are {values.dtype}; pass dtype=torch.float16 or torch.bfloat16")
        return values.dtype
    return check_value_dtype(dtype)


def _shape(shape) -> tuple[int, int]:
    if len(shape) != 2 or min(int(s) for s in shape) <= 0:
        raise KernelInputError(f"shape must be (out, in) with both > 0, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _reverse_bits32(words: np.ndarray) -> np.ndarray:
    as_bytes = words.astype("<u4").view(np.uint8).reshape(*words.shape, 4)
    return np.ascontiguousarray(_BYTE_REVERSED[as_bytes][..., ::-1]).view("<u4").reshape(words.shape)


def bitmask_export_words(packed_bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The export's MSB-first bit stream of an [out, in] mask -> runtime int32 words [out, ceil(in / 32)]."""
    out, in_features = shape
    stream = packed_bits.detach().cpu().numpy()
    if stream.dtype != np.uint8 or stream.ndim != 1 or stream.size != math.ceil(out * in_features / 8):
        raise KernelInputError(f"bitmask must be {math.ceil(out * in_features / 8)} packed uint8 bytes for shape "
                               f"{shape}, got {packed_bits.dtype} {list(packed_bits.shape)}")
    chunks = math.ceil(in_features / WINDOW)
    column = np.arange(chunks, dtype=np.int64) * WINDOW
    start = np.arange(out, dtype=np.int64)[:, None] * in_features + column  # first bit of every word
    stream = np.concatenate([stream, np.zeros(5, np.uint8)]).astype(np.uint64)
    byte, skip = start >> 3, (start & 7).astype(np.uint64)
    window = sum(stream[byte + k] << np.uint64(8 * (4 - k)) for k in range(5))  # 40 bits, big-endian
    first_bit_high = (window >> (np.uint64(8) - skip)) & np.uint64(0xFFFFFFFF)
    valid = np.minimum(WINDOW, in_features - column).astype(np.uint64)  # bits of the row in each word
    first_bit_high &= ~((np.uint64(1) << (np.uint64(32) - valid)) - np.uint64(1)) & np.uint64(0xFFFFFFFF)
    return torch.from_numpy(_reverse_bits32(first_bit_high.astype(np.uint32)).view(np.int32))


def from_bitmask_export(values: torch.Tensor, packed_bits: torch.Tensor, shape: tuple[int, int],
                        dtype: torch.dtype | None = None) -> BitmaskWeight:
    """A ``bitmask`` export (its ``values`` and ``bitmask`` tensors, the weight's [out, in] shape) as a
    :class:`BitmaskWeight`; ``dtype`` defaults to the values' own 16-bit type."""
    shape = _shape(shape)
    dtype = _values_dtype(values, dtype)
    masks = bitmask_export_words(packed_bits, shape)
    offsets = offsets_from_counts(popcount32(masks).sum(dim=1))
    if int(offsets[-1]) != values.numel():
        raise KernelInputError(f"the bitmask keeps {int(offsets[-1])} weights but {values.numel()} values were given")
    return BitmaskWeight(values=with_value_pad(values.detach().cpu().to(dtype)), masks=masks, offsets=offsets,
                         shape=shape)


def from_nm_export(values: torch.Tensor, layouts: torch.Tensor, shape: tuple[int, int], n: int, m: int,
                   dtype: torch.dtype | None = None) -> NMWeight:
    """An ``nm`` export (its ``values`` and ``layouts`` tensors, the weight's shape and its n:m) as an
    :class:`NMWeight`; ``dtype`` defaults to the values' own 16-bit type."""
    out, in_features = _shape(shape)
    dtype = _values_dtype(values, dtype)
    if m not in NM_GROUP_SIZES or not 1 <= n < m or in_features % m:
        raise KernelInputError(f"an nm export has m in {NM_GROUP_SIZES}, 1 <= n < m and whole groups; got {n}:{m} "
                               f"with {in_features} inputs")
    groups, bits = in_features // m, rank_bits(n, m)
    kept = out * groups * n
    if values.numel() != kept:
        raise KernelInputError(f"{n}:{m} of shape {(out, in_features)} keeps {kept} weights but {values.numel()} "
                               "values were given")
    if layouts.dtype != torch.uint8 or layouts.numel() != math.ceil(out * groups * bits / 8):
        raise KernelInputError(f"layouts must be {math.ceil(out * groups * bits / 8)} packed uint8 bytes, got "
                               f"{layouts.dtype} {list(layouts.shape)}")
    codes = layout_codes(n, m)
    in_group = ((codes[:, None] >> torch.arange(m)) & 1).nonzero()[:, 1].reshape(-1, n)  # rank -> kept lanes
    stream = layouts.detach().cpu().reshape(-1)
    pos = []
    for r0 in range(0, out, _NM_ROWS_PER_BLOCK):
        rows = min(_NM_ROWS_PER_BLOCK, out - r0)
        first = r0 * groups * bits // 8
        ranks = unpack_uint(stream[first:first + math.ceil(rows * groups * bits / 8)], bits, rows * groups)
        if bool((ranks >= len(codes)).any()):
            raise KernelInputError(f"layouts hold a rank >= C({m}, {n}) = {len(codes)}: not an {n}:{m} export")
        pos.append(in_group[ranks].reshape(rows, groups * n))
    return nm_weight(values.detach().cpu().reshape(out, -1).to(dtype), torch.cat(pos), n, m, (out, in_features))
