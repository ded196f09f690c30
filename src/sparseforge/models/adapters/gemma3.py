"""Gemma 3 (text): Llama's linears, but four norms per block (before and after each sub-layer) and q/k norms."""

from dataclasses import replace

from .llama import LLAMA

GEMMA3 = replace(
    LLAMA,
    family="gemma3",
    model_types=("gemma3_text",),
    attention_norms={
        "input": "input_layernorm",
        "output": "post_attention_layernorm",
        "q": "self_attn.q_norm",
        "k": "self_attn.k_norm",
    },
    ffn_norms={"input": "pre_feedforward_layernorm", "output": "post_feedforward_layernorm"},
)
