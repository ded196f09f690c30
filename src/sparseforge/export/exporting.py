"""``export_model``: one entry for every output format, sparseforge's own directories and GGUF files for llama.cpp.

Pipelines export their result in a sparseforge format as they finish; this converts any loaded model afterwards
(``sparseforge export``): an export into another format, llm-compressor's or a compressed-tensors checkpoint into a
compact one, a shrunk model into GGUF.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SparseforgeError
from ..interop.gguf import TENSOR_TYPES, write_gguf
from .saving import EXPORT_FORMATS, Exportable, save_model

FORMATS = (*EXPORT_FORMATS, "gguf")


def export_model(handle: Exportable, out: str | Path, format: str = "auto", dtype: str | None = None,
                 gguf_type: str = "f16", overwrite: bool = False) -> dict:
    """Write ``handle`` to ``out`` in ``format``: a directory for auto/dense/bitmask/nm (``dtype`` of the weights),
    a single file for gguf (``gguf_type`` of its 2-D tensors: f16, bf16, f32 or q8_0). Returns what was written."""
    if format not in FORMATS:
        raise SparseforgeError(f"unknown export format '{format}'; use one of {', '.join(FORMATS)}")
    if format != "gguf":
        return save_model(handle, out, format=format, dtype=dtype, overwrite=overwrite)
    if dtype is not None:
        raise SparseforgeError("--export-dtype applies to sparseforge formats; a GGUF file takes --gguf-type "
                               f"({', '.join(TENSOR_TYPES)})")
    out = Path(out)
    if out.is_dir():
        raise SparseforgeError(f"{out} is a directory; a GGUF export is one file (for example {out / 'model.gguf'})")
    if out.exists() and not overwrite:
        raise SparseforgeError(f"{out} already exists; pass --overwrite to replace it")
    return {"format": "gguf", **write_gguf(handle, out, gguf_type)}
