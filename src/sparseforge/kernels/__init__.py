"""CPU kernels for sparse weights: y = x @ W.T (+ bias) with W held compressed, for decode and small batches.

::

    from sparseforge import kernels
    packed = kernels.pack_bitmask(weight, mask, torch.float16)   # or pack_nm(weight, mask, 2, 4), pack_dense(weight)
    y = kernels.matmul(x, packed, bias)                          # x [..., in] -> y [..., out], float32
    kernels.isa_info()                                           # what this CPU supports, what was compiled

Layouts are in :mod:`.layouts`, the export-format converters in :mod:`.convert`, the native build (just in time,
cached, with a PyTorch fallback) in :mod:`.build` and the choice of instruction set in :mod:`.dispatch`.
See ``docs/kernels.md`` for the design and the measured speed.
"""

from .columns import ColumnWeight, column_matmul, pack_columns
from .convert import from_bitmask_export, from_nm_export
from .dispatch import ISA_CHOICES, NATIVE_ISAS, isa_info
from .layouts import BitmaskWeight, DenseWeight, KernelInputError, NMWeight, PackedWeight
from .matmul import PreparedMatmul, matmul
from .packing import pack_bitmask, pack_dense, pack_nm
from .reference import dequantize

__all__ = ["BitmaskWeight", "ColumnWeight", "DenseWeight", "ISA_CHOICES", "KernelInputError", "NATIVE_ISAS", "NMWeight",
           "PackedWeight", "PreparedMatmul", "column_matmul", "dequantize", "from_bitmask_export", "from_nm_export", "isa_info", "matmul",
           "pack_bitmask", "pack_columns", "pack_dense", "pack_nm"]
