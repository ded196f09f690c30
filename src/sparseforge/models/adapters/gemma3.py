"""Gemma 3 (text): Llama-like linears, but four norms per block (pre and post each sub-layer) and q/k norms."""

from .base import ArchSpec

GEMMA3 = ArchSpec(
    family="gemma3",
    model_types=("gemma3_text",),
    blocks="model.layers",
    embed_tokens="model.embed_tokens",
    lm_head="lm_head",
    final_norm="model.norm",
    attention="self_attn",
    ffn="mlp",
    attention_linears={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
    ffn_linears={"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    attention_norms={
        "input": "input_layernorm",
        "output": "post_attention_layernorm",
        "q": "self_attn.q_norm",
        "k": "self_attn.k_norm",
    },
    ffn_norms={"input": "pre_feedforward_layernorm", "output": "post_feedforward_layernorm"},
)
