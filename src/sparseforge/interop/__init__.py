"""Other tools' checkpoints in (compressed-tensors' legacy sparse layouts, llm-compressor's dense output with its
recipe) and other runtimes' formats out (GGUF for llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path


def describe_checkpoint(directory: Path) -> str | None:
    """One line on where a foreign checkpoint's masks come from (for ``info``), or None for any other directory."""
    from . import compressed_tensors, llmcompressor

    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    block = compressed_tensors.compression_config(config) if isinstance(config, dict) else None
    fmt = (block.get("sparsity_config") or {}).get("format") if block else None
    if fmt in compressed_tensors.SPARSE_FORMATS:
        return f"compressed-tensors {fmt} checkpoint (masks: its stored bitmasks)"
    modifiers = llmcompressor.read_recipe(directory)
    if modifiers:
        names = ", ".join(sorted({m.name for m in modifiers}))
        return f"llm-compressor output (masks: the linears its recipe.yaml targets with {names})"
    return None
