"""A model rebuilt from a config and a state dict that plain ``from_pretrained`` cannot load as is.

GGUF files and compressed-tensors checkpoints both carry a ``quantization_config`` that makes transformers hand
loading to an integration (which refuses ``save_pretrained``, or needs a package sparseforge does not pin). Their
weights decode to an ordinary dense state dict, so the model is built from the config without that block and the
state loaded strictly, tied weights excepted.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..errors import CorruptCheckpointError

LOADER_KEYS = ("quantization_config", "compression_config", "_name_or_path")


def plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` without the blocks that route loading to a quantization integration."""
    clean = config.to_dict()
    for key in LOADER_KEYS:
        clean.pop(key, None)
    return type(config).from_dict(clean)


def model_from_state(config: PretrainedConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                     source: str) -> torch.nn.Module:
    """Build the model of ``config`` in ``dtype`` and load ``state``: every parameter must come from ``state``,
    except tied ones (an LM head tied to the embedding is stored once)."""
    model = AutoModelForCausalLM.from_config(plain_config(config), dtype=dtype)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CorruptCheckpointError(f"{source}: weights do not fit the config: "
                                     f"{(str(exc).strip().splitlines() or ['?'])[0]}") from None
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k not in result.missing_keys}
    untied = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        problem = f"missing {untied[:3]}" if untied else f"unexpected {result.unexpected_keys[:3]}"
        raise CorruptCheckpointError(f"{source}: weights do not match the config ({problem})")
    return model.eval()
