"""OPT: learned positions, biases everywhere, and FFN linears (fc1/fc2) that sit directly on the block."""

from .base import ArchSpec

OPT = ArchSpec(
    family="opt",
    model_types=("opt",),
    blocks="model.decoder.layers",
    embed_tokens="model.decoder.embed_tokens",
    lm_head="lm_head",
    final_norm="model.decoder.final_layer_norm",
    attention="self_attn",
    ffn="",  # no enclosing FFN module
    attention_linears={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj"},
    ffn_linears={"fc1": "fc1", "fc2": "fc2"},
    attention_norms={"input": "self_attn_layer_norm"},
    ffn_norms={"input": "final_layer_norm"},
    position_embeddings="model.decoder.embed_positions",
    final_projection="model.decoder.project_out",
    ffn_width_attr="ffn_dim",
    head_dim_attr=None,
)
