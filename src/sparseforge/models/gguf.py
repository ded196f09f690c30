"""GGUF files: de-quantised through transformers into a plain float model that can be saved as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import CorruptCheckpointError
from .adapters import check_supported
from .rebuild import model_from_state


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Load a GGUF file as an ordinary (de-quantised) model plus its tokenizer.

    transformers marks GGUF-loaded models with a ``quantization_config`` and then refuses ``save_pretrained``; we
    rebuild the model from a clean config and copy the de-quantised weights in (:mod:`.rebuild`), which gives
    identical logits.
    """
    path = Path(path)
    kwargs = dict(gguf_file=path.name)
    try:
        config = AutoConfig.from_pretrained(path.parent, **kwargs)
        check_supported(config.model_type)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (ValueError, OSError, KeyError) as exc:
        raise CorruptCheckpointError(f"cannot read GGUF file {path}: {exc}") from None
    return model_from_state(gguf_model.config, gguf_model.state_dict(), dtype, str(path)), tokenizer


def converted_gguf_directory(path: Path) -> Path:
    """A Hugging Face directory holding the de-quantised model of ``path``, converted once and cached under the
    file's SHA-256 (a conversion takes about a minute for a 270M model; a changed file gets a new entry)."""
    from ..assets import cache_dir
    from ..atomic import atomic_directory
    from ..export.integrity import sha256_of

    target = cache_dir() / "gguf" / sha256_of(path)[:32]
    if (target / "config.json").exists():
        return target
    model, tokenizer = load_gguf(path)
    with atomic_directory(target, overwrite=True, owned=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
