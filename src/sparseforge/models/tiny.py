"""Tiny randomly initialised models, one per supported family, built in-process for fast tests.

They use a byte-level tokenizer built in memory (no download), a fixed seed, and sizes chosen so that every
pattern we test divides every layer (widths are multiples of 8).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from ..errors import ModelNotFoundError

TINY_SEED = 0
_SPECIALS = ("<pad>", "<s>", "</s>")
VOCAB_SIZE = 256 + len(_SPECIALS)
_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _tiny_configs() -> dict[str, PretrainedConfig]:
    return {
        "llama": LlamaConfig(**_COMMON, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**_COMMON),
        "mistral": MistralConfig(**_COMMON, sliding_window=None),
        # both attention kinds (a sliding-window layer, then a full-attention one), as real Gemma 3 models alternate them
        "gemma3": Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=64,
                                   layer_types=["sliding_attention", "full_attention"]),
        "opt": OPTConfig(vocab_size=VOCAB_SIZE, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                         num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=1024,
                           bos_token_id=1, eos_token_id=2),
    }


TINY_FAMILIES = tuple(_tiny_configs())


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with 256 byte tokens plus pad/bos/eos: lossless on any text, no download."""
    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[char] = len(_SPECIALS) + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_tiny(name: str, dtype: torch.dtype = torch.float32, num_layers: int | None = None):
    """Build ``tiny-<family>``: returns (model, tokenizer). ``num_layers`` deepens it (tests of per-layer policies)."""
    family = name.removeprefix("tiny-")
    configs = _tiny_configs()
    if family not in configs:
        raise ModelNotFoundError(f"unknown tiny model '{name}'; available: {', '.join('tiny-' + f for f in configs)}")
    config = configs[family]
    if num_layers:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(num_layers)]
    torch.manual_seed(TINY_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model, byte_tokenizer()
