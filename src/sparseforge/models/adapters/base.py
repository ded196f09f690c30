"""The model adapter: the only place that knows where things live inside a model.

Algorithms ask the adapter for decoder blocks, their attention and FFN sub-layers, linear layers by role, norms,
head geometry and embeddings; they never reach into ``model.model.layers``. A family is described declaratively by
an :class:`ArchSpec` (attribute paths), so adding one is a small file plus a test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..cache import without_cache
from ..removed import RemovedAttention, is_removed


def get_path(root: nn.Module, path: str) -> Any:
    """Resolve a dotted attribute path ('' is the root itself)."""
    obj: Any = root
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted attribute path (shape surgery, adapter merging)."""
    parent, _, child = path.rpartition(".")
    setattr(get_path(root, parent), child, module)


def _unwrapped(module: nn.Module) -> nn.Module:
    """The layer itself when an adapter library (peft) has wrapped it, so views always see the real weight."""
    return getattr(module, "base_layer", module)


class LinearView:
    """One linear layer seen in the [out_features, in_features] orientation.

    ``nn.Linear`` stores its weight as [out, in]; GPT-2's ``Conv1D`` stores [in, out]. Every algorithm works on the
    [out, in] view, and :meth:`to_storage` maps a tensor in that orientation back to how the module stores it, so a
    mask or an update computed once applies to both kinds of layer.
    """

    def __init__(self, name: str, role: str, block: int, module: nn.Module):
        self.name = name
        self.role = role
        self.block = block
        self.module = module
        # [in, out] storage (GPT-2's Conv1D) unless the module is a Linear or says it stores [out, in]
        self.transposed = not (isinstance(module, nn.Linear) or getattr(module, "weight_is_out_in", False))

    @property
    def weight(self) -> torch.Tensor:
        """The weight in [out, in] orientation (a view sharing storage with the module's parameter)."""
        w = self.module.weight
        return w.t() if self.transposed else w

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    def to_storage(self, tensor_out_in: torch.Tensor) -> torch.Tensor:
        """Map a tensor shaped like :attr:`weight` to the module's storage orientation."""
        return tensor_out_in.t() if self.transposed else tensor_out_in

    def __repr__(self) -> str:
        return f"LinearView({self.name}, role={self.role}, {self.out_features}x{self.in_features})"


@dataclass
class SubLayer:
    """An attention or FFN sub-layer of one block: its linears by role and its norms.

    ``module`` is the enclosing module when the architecture has one (OPT keeps its FFN linears directly on the
    block, so there it is ``None``).
    """

    kind: str  # "attention" or "ffn"
    module: nn.Module | None
    linears: dict[str, LinearView]
    norms: dict[str, nn.Module]


@dataclass
class HeadGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass
class ArchSpec:
    """Where a family keeps its parts, as attribute paths relative to the model / to one block."""

    family: str
    model_types: tuple[str, ...]
    blocks: str
    embed_tokens: str
    lm_head: str
    final_norm: str
    attention: str
    ffn: str
    attention_linears: dict[str, str]
    ffn_linears: dict[str, str]
    attention_norms: dict[str, str] = field(default_factory=dict)
    ffn_norms: dict[str, str] = field(default_factory=dict)
    position_embeddings: str | None = None
    final_projection: str | None = None  # a projection between the final norm and the LM head (OPT-350m)
    # config attribute names, first one present wins
    num_heads_attrs: tuple[str, ...] = ("num_attention_heads",)
    num_kv_heads_attrs: tuple[str, ...] = ("num_key_value_heads",)
    hidden_attrs: tuple[str, ...] = ("hidden_size",)
    ffn_width_attr: str = "intermediate_size"
    head_dim_attr: str | None = "head_dim"  # None: head_dim is derived (hidden / heads), so heads cannot change in config

    @property
    def ffn_output_role(self) -> str:
        """The FFN linear that maps the intermediate width back to the hidden size (listed last)."""
        return list(self.ffn_linears)[-1]

    @property
    def attention_output_role(self) -> str:
        return list(self.attention_linears)[-1]


def _pass_through(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A decoder block's forward that changes nothing (what a bypassed block computes)."""
    return hidden_states


class ModelAdapter:
    """Uniform access to a causal LM of a supported family."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.model = model
        self.spec = spec

    # ---- structure -------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def config(self) -> Any:
        return self.model.config

    def blocks(self) -> nn.ModuleList:
        return get_path(self.model, self.spec.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks())

    def _block_prefix(self, index: int) -> str:
        return f"{self.spec.blocks}.{index}"

    def _linear_views(self, index: int, paths: dict[str, str]) -> dict[str, LinearView]:
        block = self.blocks()[index]
        return {
            role: LinearView(f"{self._block_prefix(index)}.{path}", role, index, _unwrapped(get_path(block, path)))
            for role, path in paths.items()
        }

    def is_removed(self, index: int, kind: str) -> bool:
        """Whether the attention or FFN sub-layer of block ``index`` was removed (see :mod:`..removed`)."""
        block = self.blocks()[index]
        if kind == "attention":
            return isinstance(get_path(block, self.spec.attention), RemovedAttention)
        return all(is_removed(get_path(block, path)) for path in self.spec.ffn_linears.values())

    def attention(self, index: int) -> SubLayer:
        """The attention sub-layer of block ``index``; a removed one has no linears and no norms."""
        block = self.blocks()[index]
        if self.is_removed(index, "attention"):
            return SubLayer("attention", get_path(block, self.spec.attention), {}, {})
        return SubLayer(
            "attention",
            get_path(block, self.spec.attention),
            self._linear_views(index, self.spec.attention_linears),
            {role: get_path(block, p) for role, p in self.spec.attention_norms.items()},
        )

    def ffn(self, index: int) -> SubLayer:
        block = self.blocks()[index]
        module = get_path(block, self.spec.ffn) if self.spec.ffn else None
        if self.is_removed(index, "ffn"):
            return SubLayer("ffn", module, {}, {})
        return SubLayer(
            "ffn",
            module,
            self._linear_views(index, self.spec.ffn_linears),
            {role: get_path(block, p) for role, p in self.spec.ffn_norms.items()},
        )

    def block_linears(self, index: int) -> dict[str, LinearView]:
        """All prunable linears of one block, keyed by role."""
        return {**self.attention(index).linears, **self.ffn(index).linears}

    def linears(self) -> Iterator[LinearView]:
        """Every prunable linear of every block, in forward order."""
        for i in range(self.num_blocks):
            yield from self.block_linears(i).values()

    def embed_tokens(self) -> nn.Module:
        return get_path(self.model, self.spec.embed_tokens)

    def lm_head(self) -> nn.Module:
        return get_path(self.model, self.spec.lm_head)

    def final_norm(self) -> nn.Module:
        return get_path(self.model, self.spec.final_norm)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from the last block's output: final norm, optional projection, LM head, and the
        final logit soft-capping of families that have it (Gemma). Lets a search rerun only the tail of a model."""
        hidden = self.final_norm()(hidden)
        projection = get_path(self.model, self.spec.final_projection) if self.spec.final_projection else None
        if projection is not None:
            hidden = projection(hidden)
        logits = self.lm_head()(hidden)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def norms(self) -> dict[str, nn.Module]:
        """Every normalisation module of the model (block, final and extra norms such as Gemma's q/k norms), by name.

        Found by class name rather than listed per family, so a new architecture's extra norms are never missed.
        """
        return {name: module for name, module in self.model.named_modules()
                if "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False))}

    def biases(self) -> dict[str, nn.Parameter]:
        """Every bias parameter outside the norms (OPT and GPT-2 have them; Llama-style models have none)."""
        in_norms = {f"{name}.{p}" for name, module in self.norms().items() for p, _ in module.named_parameters()}
        return {name: p for name, p in self.model.named_parameters()
                if name.rsplit(".", 1)[-1] == "bias" and name not in in_norms}

    def tied_embeddings(self) -> bool:
        """True when the LM head shares its weight tensor with the token embedding."""
        return self.lm_head().weight.data_ptr() == self.embed_tokens().weight.data_ptr()

    def _config_value(self, attrs: tuple[str, ...]) -> int | None:
        for attr in attrs:
            value = getattr(self.config, attr, None)
            if value is not None:
                return int(value)
        return None

    def head_geometry(self) -> HeadGeometry:
        num_heads = self._config_value(self.spec.num_heads_attrs)
        num_kv = self._config_value(self.spec.num_kv_heads_attrs) or num_heads
        head_dim = getattr(self.config, "head_dim", None) or self._config_value(self.spec.hidden_attrs) // num_heads
        return HeadGeometry(num_heads, num_kv, int(head_dim))

    # ---- running one block on captured inputs ---------------------------------------------------------------
    def _capture_through(self, input_ids: torch.Tensor, last: int, hidden_of: int,
                         bypass_blocks: bool = False) -> tuple[torch.Tensor, list[dict]]:
        """Block ``hidden_of``'s hidden-state input and the keyword arguments of blocks ``0..last``, as the model
        itself passes them (only one hidden state is kept: a model's worth of them would be large).

        The forward pass is cut short by an exception from block ``last``'s pre-hook, so nothing after it is
        computed. Keyword arguments lose the cache and gain ``use_cache=False``, ready for :meth:`run_block`.
        ``bypass_blocks`` passes the hidden state through the blocks unchanged instead of running them: the
        arguments do not depend on the blocks' weights, which streamed pruning has not loaded yet.
        """
        hidden: list[torch.Tensor] = []
        arguments: list[dict] = []

        class _Stop(Exception):
            pass

        def hook(module, args, kwargs):
            if len(arguments) == hidden_of:
                hidden.append(args[0] if args else kwargs["hidden_states"])
            arguments.append({k: v for k, v in without_cache(kwargs).items() if k != "hidden_states"} |
                             {"use_cache": False})
            if len(arguments) > last:
                raise _Stop

        blocks = self.blocks()[:last + 1]
        handles = [block.register_forward_pre_hook(hook, with_kwargs=True) for block in blocks]
        if bypass_blocks:
            for block in blocks:
                block.forward = _pass_through
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
            if bypass_blocks:
                for block in blocks:
                    del block.forward
        return hidden[0], arguments

    def capture_block_inputs(self, input_ids: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, dict]:
        """Run the model up to block ``index`` and return that block's hidden-state input and keyword arguments.

        The keyword arguments (attention mask, position embeddings, ...) are what the model itself passes, so
        :meth:`run_block` reproduces the model's own computation for any architecture.
        """
        hidden, arguments = self._capture_through(input_ids, index, index)
        return hidden, arguments[index]

    def capture_inputs_per_block(self, input_ids: torch.Tensor,
                                 bypass_blocks: bool = False) -> tuple[torch.Tensor, list[dict]]:
        """Block 0's hidden-state input and the keyword arguments the model passes to *each* block.

        Models with per-layer attention types pass different arguments to different blocks: Gemma 3 gives its
        sliding-window layers a local rotary base (10k) and a windowed mask, its full-attention layers the global
        base (1M) and a causal mask. Replaying every block with block 0's arguments would calibrate the
        full-attention layers at the wrong positions, so block-by-block replays use this. Arguments that the model
        shares between blocks stay shared objects.
        """
        return self._capture_through(input_ids, self.num_blocks - 1, 0, bypass_blocks)

    def run_block(self, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run block ``index`` on captured inputs and return its output hidden states."""
        out = self.blocks()[index](hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

