"""The runtime layouts of a compressed [out, in] weight, as the native kernels read them.

These are not the export encodings (:mod:`sparseforge.export.formats`, made to be small on disk): they are made to
be decoded fast, a row at a time, by any thread starting at any row.

* :class:`BitmaskWeight`: per row, one little-endian 32-bit mask per 32 inputs (bit j of mask c = input 32c + j,
  so one AVX-512 VBMI2 expand places a chunk's kept 16-bit values) and the row's kept values, compacted, from
  ``values[offsets[row]]``. ``values`` ends with 32 zero elements so a full-width load never leaves the buffer.
* :class:`NMWeight`: N kept of every M inputs, values ``[out, in * n / m]`` and, per window of 32 inputs,
  ``ceil(k * log2(m) / 8)`` bytes of positions (k kept values in the window; kept value i at bits
  ``[i * log2(m), (i + 1) * log2(m))``, little-endian, its place in its group of m), ``pos_stride`` bytes per row.
  ``positions`` ends with 16 zero bytes for the same reason.
* :class:`DenseWeight`: the same-precision dense baseline, row-major ``[out, in]``.

Each has ``nbytes``: the bytes one matmul reads (padding excluded), the quantity the kernels are bound by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SparseforgeError

WINDOW = 32  # inputs per bitmask chunk and per N:M position window
VALUE_PAD = 32  # elements past the end of a bitmask's values
POSITION_PAD = 16  # bytes past the end of an N:M's positions
VALUE_DTYPES = (torch.float16, torch.bfloat16)
NM_GROUP_SIZES = (4, 8, 16)


class KernelInputError(SparseforgeError, ValueError):
    """A weight, mask, packed layout or input that the kernels cannot take, with the reason in one line."""


def check_value_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in VALUE_DTYPES:
        raise KernelInputError(f"values must be stored as torch.float16 or torch.bfloat16, not {dtype}")
    return dtype


def popcount32(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each 32-bit word (int32 read as unsigned), as int64."""
    v = words.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise KernelInputError(message)


def _check_contiguous(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        _check(isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.is_contiguous(),
               f"{name} must be a contiguous CPU tensor")


def _normalise_shape(layout) -> tuple[int, int]:
    shape = tuple(int(s) for s in layout.shape)
    _check(len(shape) == 2 and min(shape) > 0, f"shape must be (out, in) with both > 0, got {layout.shape}")
    object.__setattr__(layout, "shape", shape)
    return shape


@dataclass(frozen=True)
class BitmaskWeight:
    """Unstructured sparsity: a bitmask per row plus the kept values (see the module docstring)."""

    values: torch.Tensor  # [kept + 32] float16/bfloat16
    masks: torch.Tensor  # int32 [out, ceil(in / 32)]
    offsets: torch.Tensor  # int64 [out + 1]
    shape: tuple[int, int]

    def __post_init__(self):
        _check_contiguous(values=self.values, masks=self.masks, offsets=self.offsets)
        out, in_features = _normalise_shape(self)
        chunks = math.ceil(in_features / WINDOW)
        check_value_dtype(self.values.dtype)
        _check(self.masks.dtype == torch.int32 and tuple(self.masks.shape) == (out, chunks),
               f"masks must be int32 [{out}, {chunks}], got {self.masks.dtype} {list(self.masks.shape)}")
        _check(self.offsets.dtype == torch.int64 and tuple(self.offsets.shape) == (out + 1,),
               f"offsets must be int64 [{out + 1}], got {self.offsets.dtype} {list(self.offsets.shape)}")
        counts = popcount32(self.masks).sum(dim=1)
        _check(int(self.offsets[0]) == 0 and torch.equal(self.offsets[1:] - self.offsets[:-1], counts),
               "offsets disagree with the masks' kept counts")
        _check(self.values.dim() == 1 and self.values.numel() == int(self.offsets[-1]) + VALUE_PAD,
               f"values must hold the {int(self.offsets[-1])} kept values plus {VALUE_PAD} padding elements, "
               f"got {self.values.numel()}")
        if in_features % WINDOW:
            beyond = ~((1 << (in_features % WINDOW)) - 1) & 0xFFFFFFFF
            _check(not bool(((self.masks[:, -1].to(torch.int64) & 0xFFFFFFFF) & beyond).any()),
                   f"mask bits set past input {in_features}")

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return self.nnz * self.values.element_size() + self.masks.numel() * 4 + self.offsets.numel() * 8


def nm_bits(m: int) -> int:
    """Bits of one kept value's position in its group of m."""
    return int(math.log2(m))


def nm_pos_stride(n: int, m: int, in_features: int) -> int:
    """Position bytes per row: whole windows of 32 inputs, then the partial last window."""
    bits = nm_bits(m)
    return (in_features // WINDOW) * math.ceil(WINDOW // m * n * bits / 8) + math.ceil(
        in_features % WINDOW // m * n * bits / 8)


def pack_positions(pos: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    """Positions in their groups [out, in * n / m] (ascending within each group) -> position bytes
    [out, nm_pos_stride], in the window layout of the module docstring."""
    out, bits = pos.shape[0], nm_bits(m)
    kept, full = WINDOW // m * n, in_features // WINDOW
    fields = pos.to(torch.uint8).numpy()
    as_bits = (fields[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [out, kept values, bits], LSB first
    windows = [as_bits[:, : full * kept].reshape(out, full, kept * bits), as_bits[:, full * kept:].reshape(out, 1, -1)]
    packed = [np.packbits(w, axis=-1, bitorder="little").reshape(out, -1) for w in windows if w.shape[-1]]
    return torch.from_numpy(np.concatenate(packed, axis=1) if packed else np.zeros((out, 0), np.uint8))


def unpack_positions(rows: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_positions`: position bytes [out, stride] -> positions in groups [out, in * n / m]."""
    out, bits = rows.shape[0], nm_bits(m)
    kept, full = WINDOW // m * n, in_features // WINDOW
    tail_kept = in_features % WINDOW // m * n
    wbytes = math.ceil(kept * bits / 8)
    data = rows.numpy()
    parts = [(data[:, : full * wbytes].reshape(out, full, wbytes), kept),
             (data[:, full * wbytes:].reshape(out, 1, -1), tail_kept)]
    weights = 1 << np.arange(bits, dtype=np.int64)
    fields = [(np.unpackbits(d, axis=-1, bitorder="little")[..., : k * bits].reshape(out, -1, bits) * weights).sum(-1)
              for d, k in parts if k]
    return torch.from_numpy(np.concatenate(fields, axis=1) if fields else np.zeros((out, 0), np.int64))


@dataclass(frozen=True)
class NMWeight:
    """N:M semi-structured sparsity: n values per group of m inputs plus their positions (module docstring)."""

    values: torch.Tensor  # [out, in * n / m] float16/bfloat16
    positions: torch.Tensor  # uint8 [out * pos_stride + 16]
    n: int
    m: int
    shape: tuple[int, int]

    def __post_init__(self):
        _check_contiguous(values=self.values, positions=self.positions)
        out, in_features = _normalise_shape(self)
        _check(self.m in NM_GROUP_SIZES and 1 <= self.n <= self.m,
               f"N:M needs m in {NM_GROUP_SIZES} and 1 <= n <= m, got {self.n}:{self.m}")
        _check(in_features % self.m == 0, f"{in_features} inputs are not whole groups of {self.m}")
        check_value_dtype(self.values.dtype)
        _check(tuple(self.values.shape) == (out, in_features // self.m * self.n),
               f"values must be [{out}, {in_features // self.m * self.n}], got {list(self.values.shape)}")
        size = out * self.pos_stride + POSITION_PAD
        _check(self.positions.dtype == torch.uint8 and tuple(self.positions.shape) == (size,),
               f"positions must be uint8 [{size}], got {self.positions.dtype} {list(self.positions.shape)}")

    @property
    def pos_stride(self) -> int:
        return nm_pos_stride(self.n, self.m, self.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.shape[0] * self.pos_stride


@dataclass(frozen=True)
class DenseWeight:
    """The dense baseline at the same precision, decoded and multiplied by the same code as the sparse layouts."""

    values: torch.Tensor  # [out, in] float16/bfloat16

    def __post_init__(self):
        _check_contiguous(values=self.values)
        check_value_dtype(self.values.dtype)
        _check(self.values.dim() == 2, f"dense values must be [out, in], got {list(self.values.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


PackedWeight = BitmaskWeight | NMWeight | DenseWeight
