"""Llama-style decoders (Llama, Qwen2, Mistral): pre-norm blocks with q/k/v/o attention and a gated SwiGLU FFN."""

from .base import ArchSpec

LLAMA = ArchSpec(
    family="llama",
    model_types=("llama", "qwen2", "mistral"),
    blocks="model.layers",
    embed_tokens="model.embed_tokens",
    lm_head="lm_head",
    final_norm="model.norm",
    attention="self_attn",
    ffn="mlp",
    attention_linears={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
    ffn_linears={"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    attention_norms={"input": "input_layernorm"},
    ffn_norms={"input": "post_attention_layernorm"},
)
