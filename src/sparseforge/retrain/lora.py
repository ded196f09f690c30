"""Low-rank adapters on pruned linears, and merging them back without losing the sparsity pattern.

Four variants (PERP's names in brackets), for a pruned frozen weight ``W``, its mask ``M``, ``A`` [r, in],
``B`` [out, r] and ``s = alpha / r``:

* ``mask`` (MaskLoRA): trains ``W + s * (B A ⊙ M)`` and merges exactly that: pruned weights stay zero.
* ``scale`` (ScaleLoRA): trains ``W ⊙ (B A)`` with every entry of A and B at ``1/sqrt(r)`` (so ``B A`` starts as
  all ones and the model starts unchanged) and merges exactly that; ``alpha`` is not used.
* ``plain`` (LoRA): trains ``W + s * B A`` through ``peft``. Merging it makes the weights dense: it is the dense
  comparison, and the merged model's masks are dropped (its measured sparsity shows the loss).
* ``prune_at_merge`` (LoRA-Prune): trained like ``plain``, merged as ``W + s * (B A ⊙ M)``: sparse again, but the
  merged model is not the trained one.

``mask`` and ``scale`` are ``torch.nn.utils.parametrize`` parametrizations of the layer's weight (``peft`` has no
such variant): they materialise ``B A`` (out x in) in every forward, which costs more activation memory than
``plain``'s factored path, and merging is removing the parametrization with its value kept, so the merged weight is
bit-for-bit the weight that was trained. The LM head, when included, always gets a standard ``peft`` LoRA.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import RetrainError
from ..models.adapters import LinearView
from ..models.adapters.base import get_path, set_path
from ..models.handle import LoadedModel

LORA_VARIANTS = ("mask", "scale", "plain", "prune_at_merge")
SPARSE_VARIANTS = ("mask", "scale", "prune_at_merge")  # merged weights keep the pruning pattern
_ADAPTER = "default"


@dataclass
class LoRAConfig:
    variant: str = "mask"
    rank: int = 16
    alpha: float = 32.0

    def __post_init__(self) -> None:
        if self.variant not in LORA_VARIANTS:
            raise RetrainError(f"unknown LoRA variant '{self.variant}'; available: {', '.join(LORA_VARIANTS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise RetrainError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise RetrainError(f"LoRA alpha must be positive, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class _LowRank(nn.Module):
    """``B A`` in the storage orientation of the layer, computed in fp32 (the trainable tensors are fp32)."""

    def __init__(self, view: LinearView, rank: int, mask: torch.Tensor | None):
        super().__init__()
        device = view.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, view.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(view.out_features, rank, device=device, dtype=torch.float32))
        self.transposed = view.transposed
        storage_mask = None if mask is None else view.to_storage(mask).to(device)
        self.register_buffer("mask", storage_mask, persistent=False)

    def product(self) -> torch.Tensor:
        delta = self.lora_B @ self.lora_A
        return delta.t() if self.transposed else delta


class MaskLoRA(_LowRank):
    """``W + s * (B A ⊙ M)``; initialised like LoRA (A Kaiming-uniform, B zero), so training starts at ``W``."""

    def __init__(self, view: LinearView, rank: int, mask: torch.Tensor, scale: float):
        super().__init__(view, rank, mask)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight + self.scale * (self.product() * self.mask)).to(weight.dtype)


class ScaleLoRA(_LowRank):
    """``W ⊙ (B A)``; every entry of A and B is ``1/sqrt(r)`` so ``B A`` starts as all ones."""

    def __init__(self, view: LinearView, rank: int):
        super().__init__(view, rank, None)
        nn.init.constant_(self.lora_A, 1.0 / math.sqrt(rank))
        nn.init.constant_(self.lora_B, 1.0 / math.sqrt(rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight * self.product()).to(weight.dtype)


def _peft_lora(model: nn.Module, names: list[str], config: LoRAConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    with warnings.catch_warnings():  # peft warns about tied LM heads; Adapters.merge unties them explicitly
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: peft handles it
        inject_adapter_in_model(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                           target_modules=names, bias="none"), model, adapter_name=_ADAPTER)


def _peft_delta(wrapper: nn.Module) -> torch.Tensor:
    """``s * B A`` of a peft LoRA layer, in [out, in] orientation."""
    a = wrapper.lora_A[_ADAPTER].weight
    b = wrapper.lora_B[_ADAPTER].weight
    return (wrapper.scaling[_ADAPTER] * (b.float() @ a.float())).detach()


class Adapters:
    """The adapters attached to one model: their trainable parameters, and merging them back.

    ``views`` are the linears that get block adapters; ``lm_head`` adds a standard LoRA on the LM head. With tied
    embeddings the LM head is **untied** at merge: it gets its own weight ``E + s B A`` and the input embedding
    stays unchanged (merging into the shared tensor would silently change the embedding too).
    """

    def __init__(self, handle: LoadedModel, views: list[LinearView], config: LoRAConfig, lm_head: bool = False):
        self.handle, self.config, self.lm_head = handle, config, lm_head
        self.views = views
        for view in views:
            limit = min(view.out_features, view.in_features)
            if config.rank > limit:
                raise RetrainError(f"LoRA rank {config.rank} is larger than layer {view.name} allows "
                                   f"({view.out_features}x{view.in_features}: at most {limit})")
        model = handle.model
        self.peft_names = [v.name for v in views] if config.variant in ("plain", "prune_at_merge") else []
        if lm_head:
            self.peft_names.append(handle.adapter.spec.lm_head)
        self.lm_head_tied = lm_head and handle.adapter.tied_embeddings()
        if self.peft_names:
            _peft_lora(model, self.peft_names, config)
        self.modules: list[nn.Module] = []
        if config.variant in ("mask", "scale"):
            for view in views:
                mask = handle.masks.get(view.name)
                if mask is None:
                    mask = torch.ones(view.out_features, view.in_features, dtype=torch.bool)
                module = MaskLoRA(view, config.rank, mask, config.scale) if config.variant == "mask" \
                    else ScaleLoRA(view, config.rank)
                parametrize.register_parametrization(view.module, "weight", module, unsafe=True)
                self.modules.append(module)

    def parameters(self) -> list[nn.Parameter]:
        params = [p for m in self.modules for p in m.parameters()]
        for name in self.peft_names:
            wrapper = get_path(self.handle.model, name)
            params += [p for n, p in wrapper.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params

    def merge(self) -> dict:
        """Fold every adapter into its layer's weight and remove it; returns what happened (for the report)."""
        for view in self.views if self.config.variant in ("mask", "scale") else []:
            parametrize.remove_parametrizations(view.module, "weight", leave_parametrized=True)
        model = self.handle.model
        densified = []
        for name in self.peft_names:
            wrapper = get_path(model, name)
            base = wrapper.get_base_layer()
            delta = _peft_delta(wrapper)
            is_head = name == self.handle.adapter.spec.lm_head
            with torch.no_grad():
                if is_head:
                    merged = base.weight.detach().float() + delta
                    if self.lm_head_tied:
                        model.config.tie_word_embeddings = False
                    base.weight = nn.Parameter(merged.to(base.weight.dtype), requires_grad=False)
                else:
                    view = LinearView(name, "", -1, base)
                    mask = self.handle.masks.get(name)
                    if self.config.variant == "prune_at_merge" and mask is not None:
                        delta = delta * mask.to(delta.device)
                    elif mask is not None:
                        densified.append(name)
                    view.weight.add_(delta.to(view.weight.dtype))  # the [out, in] view writes through to storage
            set_path(model, name, base)
        for name in densified:  # plain LoRA: these weights are dense now, and their masks would be a lie
            self.handle.masks.pop(name)
        return {"variant": self.config.variant, "layers": len(self.views), "lm_head": self.lm_head,
                "lm_head_untied": self.lm_head_tied, "densified_layers": len(densified)}
