"""A lean decode step for Llama-style blocks in the runtime: the same arithmetic as transformers' decoder layer
for one new token, without its per-call machinery.

For a single new token per sequence, with a KV cache and no attention mask (batch-1 greedy decoding or sampling),
each decoder layer runs as one Python function. It normalises, takes q, k and v from the fused product in one
kernel call, rotates, updates the cache, runs attention (``scaled_dot_product_attention`` with grouped KV heads),
projects, then takes gate and up from one fused product. The operations and their order are those of the
transformers layer, so the logits are bit-identical (tested). Anything else (prefill, masks, other families, and
any hook or forward override on a module the step would bypass, such as an FFN-skip policy's) goes through the
original forward. On the default model this saves about 4-6 ms per token of Python overhead
(bench/runtime.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers

from .linear import SliceLinear

LEAN_FAMILIES = ("llama", "qwen2")  # RMSNorm, rotary q/k, no q/k norms, no sliding window by default


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """transformers' LlamaRMSNorm, step for step."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def leanable(layer) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (attn is not None and mlp is not None
            and all(isinstance(getattr(attn, n, None), SliceLinear) for n in ("q_proj", "k_proj", "v_proj"))
            and all(isinstance(getattr(mlp, n, None), SliceLinear) for n in ("gate_proj", "up_proj"))
            and attn.q_proj.fused is attn.v_proj.fused and mlp.gate_proj.fused is mlp.up_proj.fused
            and hasattr(layer.input_layernorm, "variance_epsilon"))


def _untouched(modules) -> bool:
    """No hook or forward override on any of ``modules`` (nor a global hook): what the lean step may bypass. An
    FFN-skip policy, for one, hooks the FFN's norm and overrides its projections; then the original layer runs."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in modules)


def _lean_forward(layer, original):
    attn, mlp = layer.self_attn, layer.mlp
    q_proj, k_proj, v_proj, o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    gate, up, down, act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
    first_norm, second_norm = layer.input_layernorm, layer.post_attention_layernorm
    bypassed = (first_norm, second_norm, attn, mlp, q_proj, k_proj, v_proj, gate, up)  # called directly below
    head_dim, scaling, index = attn.head_dim, attn.scaling, attn.layer_idx
    gqa = getattr(attn, "num_key_value_groups", 1) > 1

    def forward(hidden_states, *args, attention_mask=None, position_embeddings=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if args or hidden_states.shape[1] != 1 or attention_mask is not None or cache is None \
                or position_embeddings is None or not _untouched(bypassed):
            return original(hidden_states, *args, attention_mask=attention_mask,
                            position_embeddings=position_embeddings, **kwargs)
        batch = hidden_states.shape[0]
        qkv = q_proj.fused.output_for(_rms_norm(hidden_states, first_norm))
        q = qkv[..., q_proj.start:q_proj.stop].view(batch, 1, -1, head_dim).transpose(1, 2)
        k = qkv[..., k_proj.start:k_proj.stop].view(batch, 1, -1, head_dim).transpose(1, 2)
        v = qkv[..., v_proj.start:v_proj.stop].view(batch, 1, -1, head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = cache.update(k, v, index)
        attended = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
        hidden_states = hidden_states + o_proj(attended.transpose(1, 2).reshape(batch, 1, -1))
        gate_up = gate.fused.output_for(_rms_norm(hidden_states, second_norm))
        return hidden_states + down(act(gate_up[..., gate.start:gate.stop]) * gate_up[..., up.start:up.stop])

    forward.lean = True  # the native step (native_decode.py) knows this override computes what the layer does
    return forward


def install_lean_decode(handle) -> list:
    """Give every eligible decoder layer the lean decode step; returns the layers changed (to undo it)."""
    if handle.model_type not in LEAN_FAMILIES or getattr(handle.model.config, "use_sliding_window", False) \
            or int(transformers.__version__.split(".")[0]) < 5:  # 4.x decoder layers return tuples
        return []
    changed = []
    for layer in handle.adapter.blocks():
        if leanable(layer):
            layer.forward = _lean_forward(layer, layer.forward)
            changed.append(layer)
    return changed


def remove_lean_decode(layers: list) -> None:
    for layer in layers:
        del layer.forward  # the instance attribute hid the class's forward
