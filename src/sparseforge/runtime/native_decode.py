"""The native decode step: a batch-1 decoding step of a Llama-style model in one call into the kernels' library.

The lean step of :mod:`.decode` still runs each layer's dozen operators from Python; on a 135M model that costs
more per token than reading the weights (``bench/runtime.py``: overhead beyond streaming). Here the model's
forward is given a path for the one case that decoding repeats: one new token, batch 1, a transformers
``DynamicCache`` behind it, no mask beyond all-ones, no hook anywhere. That call embeds the token, takes the
rotary angles from the model's own rotary module (so every RoPE scaling variant is the model's), runs every
decoder layer in ``decoder_step`` (``kernels/csrc/decode.cpp``), then the model's final norm and LM head. Any other
call (prefill, batches, masks, sliding windows, an FFN-skip policy's hooks) goes through the original forward.

The keys and values live in the native decoder's buffers; the model's cache layers are kept as views of them,
so the cache object the caller holds stays a correct transformers cache (a later prefill or a dense forward can
continue from it). A cache the decoder has not seen (after a prefill, or another sequence) is copied in first; a
cache that was being served is given its own copy before the buffers serve another one.

Arithmetic: float32 activations, the same weights and kernels as the runtime's linears, sums in another order
than PyTorch's (RMSNorm, attention): the logits agree with the Python path to float32 rounding, not bit for bit
(tested: greedy tokens identical, logits within 1e-4 relative).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..kernels import BitmaskWeight, ColumnWeight, NMWeight
from ..kernels.build import native
from ..kernels.dispatch import resolve_isa
from .decode import LEAN_FAMILIES, leanable
from .linear import SparseLinear

# keyword arguments the native path understands; any other one sends the call to the original forward
_ACCEPTED = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                       "cache_position", "logits_to_keep", "return_dict", "output_attentions",
                       "output_hidden_states"})
_OUTPUT_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"
_CAPACITY_STEP = 256


def _linear_parts(module: SparseLinear) -> tuple[list, list[int], float]:
    """The 5 tensors, 5 integers and the activation threshold ``decoder_new`` takes per linear."""
    packed = module.packed
    if isinstance(packed, ColumnWeight):
        tensors = [packed.values, packed.masks, None, packed.bases]
        ints = [3, module.in_features, module.out_features, 0, 0]
    elif isinstance(packed, BitmaskWeight):
        tensors, ints = [packed.values, packed.masks, packed.offsets, None], [1, module.in_features, 0, 0, 0]
    elif isinstance(packed, NMWeight):
        tensors = [packed.values, packed.positions, None, None]
        ints = [2, module.in_features, packed.pos_stride, packed.n, packed.m]
    else:
        tensors, ints = [packed.values, None, None, None], [0, module.in_features, 0, 0, 0]
    return tensors + [module.bias], ints, module.threshold


def _why_not(handle) -> str | None:
    """Why the native step cannot serve this model (None when it can)."""
    model = handle.model
    if handle.model_type not in LEAN_FAMILIES:
        return f"family {handle.model_type} (native step: {', '.join(LEAN_FAMILIES)})"
    if int(transformers.__version__.split(".")[0]) < 5:
        return "transformers 4.x"
    config = model.config
    if getattr(config, "use_sliding_window", False) or getattr(config, "hidden_act", "silu") != "silu":
        return "sliding-window attention or an activation other than SiLU"
    layers = list(handle.adapter.blocks())
    if not all(leanable(layer) and isinstance(layer.self_attn.o_proj, SparseLinear)
               and isinstance(layer.mlp.down_proj, SparseLinear) for layer in layers):
        return "layers not fully held in the runtime's layouts"
    if getattr(model.get_decoder(), "rotary_emb", None) is None:
        return "no shared rotary embedding module"
    if native() is None or resolve_isa("auto") is None:
        return "native kernels unavailable"
    return None


class NativeDecode:
    """The native decoder of one model in the runtime, and the forward that uses it. ``remove()`` undoes it."""

    def __init__(self, handle):
        model = handle.model
        self.model, self.ops, self.adapter = model, native(), handle.adapter
        self.layers = list(handle.adapter.blocks())
        first = self.layers[0]
        attn, mlp = first.self_attn, first.mlp
        self.head_dim = attn.head_dim
        heads = attn.q_proj.out_features // self.head_dim
        kv_heads = attn.k_proj.out_features // self.head_dim
        shape = [len(self.layers), model.config.hidden_size, heads, kv_heads, self.head_dim,
                 mlp.down_proj.in_features, attn.q_proj.start, attn.k_proj.start, attn.v_proj.start,
                 mlp.gate_proj.start, mlp.up_proj.start]
        tensors, ints, thresholds = [], [], []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            if (a.q_proj.start, a.k_proj.start, a.v_proj.start, m.gate_proj.start, m.up_proj.start) != tuple(shape[6:]) \
                    or a.scaling != attn.scaling \
                    or layer.input_layernorm.variance_epsilon != first.input_layernorm.variance_epsilon:
                raise ValueError("decoder layers differ in geometry")
            tensors += [layer.input_layernorm.weight.detach().float().contiguous(),
                        layer.post_attention_layernorm.weight.detach().float().contiguous()]
            for module in (a.q_proj.fused, a.o_proj, m.gate_proj.fused, m.down_proj):
                parts, numbers, threshold = _linear_parts(module)
                tensors += parts
                ints += numbers
                thresholds.append(threshold)
        self._norm_weights = tensors  # the norms' float32 copies must outlive the decoder
        self.handle = self.ops.decoder_new(tensors, ints, thresholds, shape,
                                           float(first.input_layernorm.variance_epsilon),
                                           float(attn.scaling), resolve_isa("auto"))
        self.buffers: list[torch.Tensor] = []
        self.capacity = 0
        self.owner: weakref.ref | None = None  # the cache whose layers view the buffers now
        self.embed, self.norm, self.head = handle.adapter.embed_tokens(), handle.adapter.final_norm(), \
            handle.adapter.lm_head()
        self.rotary = model.get_decoder().rotary_emb
        self.modules = [m for m in model.modules()]
        self.steps = 0  # tokens decoded natively (tests and reports read it)
        self.original = model.forward
        self.bound = self._forward  # one bound method: what _untouched recognises as ours
        model.forward = self.bound

    # ---- eligibility ------------------------------------------------------------------------------------------
    def _untouched(self) -> bool:
        hooks = torch.nn.modules.module
        if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
            return False
        for module in self.modules:
            if module._forward_hooks or module._forward_pre_hooks:
                return False
            forward = module.__dict__.get("forward")
            if forward is not None and forward is not self.bound and not getattr(forward, "lean", False):
                return False
        return True

    def _cache_of_call(self, kwargs: dict):
        ids, cache = kwargs.get("input_ids"), kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(ids, torch.Tensor) or ids.shape != (1, 1) or type(cache) is not DynamicCache \
                or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False \
                or kwargs.get("output_attentions") or kwargs.get("output_hidden_states") \
                or not kwargs.keys() <= _ACCEPTED:
            return None
        if len(cache.layers) != len(self.layers) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None
        length = cache.get_seq_length()
        if length == 0:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.shape != (1, length + 1) or not bool(mask.all())):
            return None
        for name in ("position_ids", "cache_position"):
            given = kwargs.get(name)
            if given is not None and (given.numel() != 1 or int(given) != length):
                return None
        return cache if self._untouched() else None

    # ---- the cache ---------------------------------------------------------------------------------------------
    def _serving(self, cache, length: int) -> bool:
        if self.owner is None or self.owner() is not cache or not self.buffers:
            return False
        keys = cache.layers[0].keys
        return keys.data_ptr() == self.buffers[0].data_ptr() and keys.shape[-2] == length

    def _adopt(self, cache, length: int) -> None:
        """Copy ``cache``'s keys and values into the buffers; the cache served before gets its own copy."""
        previous = self.owner() if self.owner is not None else None
        if previous is not None and previous is not cache:
            for i, layer in enumerate(previous.layers):
                if layer.keys is not None and self.buffers and layer.keys.untyped_storage().data_ptr() \
                        == self.buffers[2 * i].untyped_storage().data_ptr():
                    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        self._reserve(length + 1)
        for i, layer in enumerate(cache.layers):
            self.buffers[2 * i][:, :length].copy_(layer.keys[0])
            self.buffers[2 * i + 1][:, :length].copy_(layer.values[0])
        self.owner = weakref.ref(cache)

    def _reserve(self, needed: int) -> None:
        if needed > self.capacity:
            self.capacity = -(-max(needed, 2 * self.capacity) // _CAPACITY_STEP) * _CAPACITY_STEP
            self.buffers = list(self.ops.decoder_reserve(self.handle, self.capacity))

    # ---- the step ----------------------------------------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        cache = None if args else self._cache_of_call(kwargs)
        if cache is None:
            return self.original(*args, **kwargs)
        length = cache.get_seq_length()
        if not self._serving(cache, length):
            self._adopt(cache, length)
        self._reserve(length + 1)  # growing keeps the contents
        with torch.no_grad():
            hidden = self.embed(kwargs["input_ids"]).to(torch.float32).reshape(-1).clone()
            cos, sin = self.rotary(hidden.view(1, 1, -1), torch.tensor([[length]]))
            self.ops.decoder_step(self.handle, hidden, cos.reshape(-1).float().contiguous(),
                                  sin.reshape(-1).float().contiguous(), length)
            logits = self.head(self.norm(hidden.view(1, 1, -1)))
        stop = length + 1
        for i, layer in enumerate(cache.layers):
            layer.keys = self.buffers[2 * i][None, :, :stop]
            layer.values = self.buffers[2 * i + 1][None, :, :stop]
        self.steps += 1
        return CausalLMOutputWithPast(logits=logits, **{_OUTPUT_CACHE: cache})

    def remove(self) -> None:
        """Back to the model's own forward; a cache being served keeps its contents (copied out)."""
        owner = self.owner() if self.owner is not None else None
        if owner is not None:
            for layer in owner.layers:
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        self.owner = None
        del self.model.forward
        self.ops.decoder_free(self.handle)
        self.buffers = []


def install_native_decode(handle, log=None) -> NativeDecode | None:
    """Give ``handle``'s model the native decode step when it can take it; returns it (None otherwise, with the
    reason passed to ``log``)."""
    reason = _why_not(handle)
    if reason is not None:
        if log is not None:
            log(f"› native decode step not used: {reason}")
        return None
    return NativeDecode(handle)
