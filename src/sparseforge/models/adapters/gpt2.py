"""GPT-2: ``Conv1D`` layers (weights stored [in, out]) and a fused q/k/v projection, role ``qkv``."""

from .base import ArchSpec

GPT2 = ArchSpec(
    family="gpt2",
    model_types=("gpt2",),
    blocks="transformer.h",
    embed_tokens="transformer.wte",
    lm_head="lm_head",
    final_norm="transformer.ln_f",
    attention="attn",
    ffn="mlp",
    attention_linears={"qkv": "attn.c_attn", "o": "attn.c_proj"},
    ffn_linears={"fc1": "mlp.c_fc", "fc2": "mlp.c_proj"},
    attention_norms={"input": "ln_1"},
    ffn_norms={"input": "ln_2"},
    position_embeddings="transformer.wpe",
    num_heads_attrs=("n_head", "num_attention_heads"),
    num_kv_heads_attrs=(),
    hidden_attrs=("n_embd", "hidden_size"),
    ffn_width_attr="n_inner",
    head_dim_attr=None,
)
