"""Storage encodings for one weight tensor and its mask, in a registry.

Each encoding turns a (weight, mask) pair into a few tensors for a safetensors file and back, bit-exactly:

* ``dense``: the weight as is, zeros included (what transformers alone can load).
* ``bitmask``: the kept values in row-major order plus one bit per weight.
* ``nm``: for a mask with exactly N kept in every group of M consecutive inputs, N values per group plus the
  group's layout as its rank among the C(M, N) possible ones, packed in ceil(log2 C(M, N)) bits.

Encodings work in the [out, in] orientation (the mask's); the caller transposes Conv1D weights. Decoding lives in
:mod:`sparseforge.export.reader`, the standalone reader anyone can copy (``docs/formats.md`` specifies the layouts),
so the loader and that reader cannot disagree.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..sparsity.patterns import nm_group_counts
from .reader import decode_bitmask, decode_nm, layout_codes, rank_bits


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy().astype(np.uint8)))


def _pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers (< 2**bits) into a dense big-endian bit stream."""
    shifts = torch.arange(bits - 1, -1, -1)
    as_bits = (values.reshape(-1, 1).to(torch.int64) >> shifts) & 1
    return torch.from_numpy(np.packbits(as_bits.to(torch.uint8).numpy().reshape(-1)))


@dataclass(frozen=True)
class Encoding:
    name: str
    applicable: Callable[[torch.Tensor], dict | None]  # mask -> parameters, or None if not exact for this mask
    nbytes: Callable[[torch.Tensor, int, dict], int]  # (mask, element size, params) -> payload bytes
    encode: Callable[[torch.Tensor, torch.Tensor, dict], dict[str, torch.Tensor]]
    # (tensors, shape, params, dtype) -> (weight, mask)
    decode: Callable[[dict[str, torch.Tensor], tuple[int, int], dict, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


# ---- dense ---------------------------------------------------------------------------------------------------
DENSE = Encoding(
    name="dense",
    applicable=lambda mask: {},
    nbytes=lambda mask, esize, p: mask.numel() * esize,
    encode=lambda w, mask, p: {"": w.contiguous()},
    decode=lambda t, shape, p, dtype: (t[""], t[""] != 0),
)


# ---- bitmask -------------------------------------------------------------------------------------------------
def _bitmask_encode(w: torch.Tensor, mask: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
    return {"values": w[mask].contiguous(), "bitmask": _pack_bits(mask)}


BITMASK = Encoding(
    name="bitmask",
    applicable=lambda mask: {},
    nbytes=lambda mask, esize, p: int(mask.sum()) * esize + math.ceil(mask.numel() / 8),
    encode=_bitmask_encode,
    decode=lambda t, shape, p, dtype: decode_bitmask(t["values"], t["bitmask"], shape, dtype),
)


# ---- N:M -----------------------------------------------------------------------------------------------------
# A group of M with exactly N kept has C(M, N) possible layouts; storing the layout's rank takes
# ceil(log2 C(M, N)) bits per group (3 bits for 2:4, 7 for 4:8) instead of one bit per weight.
_NM_GROUP_SIZES = (4, 8, 16)


@functools.lru_cache(maxsize=None)
def _rank_of_code(n: int, m: int) -> torch.Tensor:
    """The rank of each M-bit layout code [2**M] (-1 for codes that do not keep exactly N)."""
    codes = layout_codes(n, m)
    rank_of = torch.full((1 << m,), -1, dtype=torch.int64)
    rank_of[codes] = torch.arange(len(codes))
    return rank_of


def _nm_params(mask: torch.Tensor) -> dict | None:
    """The N:M (largest saving) under which this mask is exact: exactly N kept in every group, or None."""
    best = None
    for m in _NM_GROUP_SIZES:
        if mask.shape[1] % m:
            continue
        counts = nm_group_counts(mask, m)
        n = int(counts[0, 0])
        if n == 0 or n == m or not bool((counts == n).all()):
            continue
        cost = rank_bits(n, m) / m  # mask bits per weight; the values cost the same for every M
        if best is None or cost < best[0]:
            best = (cost, {"n": n, "m": m})
    return None if best is None else best[1]


def _nm_nbytes(mask: torch.Tensor, esize: int, p: dict) -> int:
    groups = mask.numel() // p["m"]
    return groups * p["n"] * esize + math.ceil(groups * rank_bits(p["n"], p["m"]) / 8)


def _nm_encode(w: torch.Tensor, mask: torch.Tensor, p: dict) -> dict[str, torch.Tensor]:
    n, m = p["n"], p["m"]
    codes = (mask.reshape(-1, m).to(torch.int64) << torch.arange(m)).sum(dim=1)
    ranks = _rank_of_code(n, m)[codes]
    # values of each row in ascending column order: N per group, so the tensor is [out, in * N / M]
    return {"values": w[mask].reshape(mask.shape[0], -1).contiguous(), "layouts": _pack_uint(ranks, rank_bits(n, m))}


NM = Encoding(name="nm", applicable=_nm_params, nbytes=_nm_nbytes, encode=_nm_encode,
              decode=lambda t, shape, p, dtype: decode_nm(t["values"], t["layouts"], shape, p["n"], p["m"], dtype))

ENCODINGS: dict[str, Encoding] = {e.name: e for e in (DENSE, BITMASK, NM)}
