"""Which parameters recovery training may change, and how many they are.

PERP's point is that a tiny, well-chosen subset recovers most of what pruning lost. The groups:

* ``bias``: every bias outside the norms (OPT and GPT-2 have them; Llama-style models have none, and asking for
  them there trains nothing, which the report shows as zero parameters);
* ``norm``: every normalisation layer's parameters (LayerNorm weight and bias, RMSNorm weight), found by the
  adapter, including extras such as Gemma's q/k norms and the final norm;
* ``lm_head``: a standard LoRA on the LM head (see :class:`~.lora.Adapters` for tied embeddings);
* ``lora``: low-rank adapters on every pruned block linear, of the chosen variant.

The trainable fraction is reported against the model's parameter count before any adapter is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import RetrainError
from ..models.handle import LoadedModel
from .lora import Adapters, LoRAConfig

PARAM_GROUPS = ("bias", "norm", "lm_head", "lora")


def check_groups(groups: list[str] | tuple[str, ...]) -> list[str]:
    unknown = [g for g in groups if g not in PARAM_GROUPS]
    if unknown:
        raise RetrainError(f"unknown parameter group(s) {', '.join(unknown)}; available: {', '.join(PARAM_GROUPS)}")
    if not groups:
        raise RetrainError(f"choose at least one parameter group to retrain: {', '.join(PARAM_GROUPS)}")
    return list(dict.fromkeys(groups))


def count(params) -> int:
    return sum(p.numel() for p in params)


@dataclass
class Selection:
    """The trainable parameters, by group, and the adapters to merge afterwards."""

    params: dict[str, list[nn.Parameter]]
    base_parameters: int
    adapters: Adapters | None = None
    notes: list[str] = field(default_factory=list)

    def all(self) -> list[nn.Parameter]:
        return [p for group in self.params.values() for p in group]

    def describe(self) -> dict:
        trainable = count(self.all())
        return {"trainable": trainable, "base_parameters": self.base_parameters,
                "fraction": trainable / self.base_parameters,
                "by_group": {name: count(group) for name, group in self.params.items()}, "notes": self.notes}


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def select_parameters(handle: LoadedModel, groups: list[str], lora: LoRAConfig | None = None,
                      blocks: list[int] | None = None) -> Selection:
    """Freeze the model, then make only ``groups`` trainable (restricted to ``blocks`` when given).

    Restricting to blocks is what layer-wise reconstruction needs: only the current block's parameters move.
    """
    groups = check_groups(groups)
    adapter = handle.adapter
    base = count(handle.model.parameters())
    freeze(handle.model)
    prefixes = None if blocks is None else tuple(f"{adapter.spec.blocks}.{i}." for i in blocks)

    def wanted(name: str) -> bool:
        return prefixes is None or name.startswith(prefixes)

    selected: dict[str, list[nn.Parameter]] = {}
    notes = []
    adapters = None
    if "lora" in groups or "lm_head" in groups:
        views = [v for v in adapter.linears() if wanted(f"{v.name}.")] if "lora" in groups else []
        if "lora" in groups and not any(v.name in handle.masks for v in views):
            notes.append("no pruned linears: LoRA adapters go on dense layers")
        adapters = Adapters(handle, views, lora or LoRAConfig(), lm_head="lm_head" in groups and blocks is None)
        if adapters.lm_head_tied:
            notes.append("LM head LoRA on tied embeddings: the LM head is untied at merge, the input embedding "
                         "is unchanged")
        adapter_params = adapters.parameters()
        head = handle.adapter.spec.lm_head
        selected["lm_head"] = [p for n, p in handle.model.named_parameters()
                               if p.requires_grad and n.startswith(f"{head}.")] if "lm_head" in groups else []
        head_ids = {id(p) for p in selected["lm_head"]}
        selected["lora"] = [p for p in adapter_params if id(p) not in head_ids]
    if "norm" in groups:
        selected["norm"] = [p for name, module in adapter.norms().items() if wanted(f"{name}.")
                            for p in module.parameters()]
    if "bias" in groups:
        selected["bias"] = [p for name, p in adapter.biases().items() if wanted(name)]
        if not selected["bias"]:
            notes.append(f"{handle.model_type} has no biases: group 'bias' trains nothing")
    for group in selected.values():
        for p in group:
            p.requires_grad_(True)
    order = [g for g in PARAM_GROUPS if g in selected]
    return Selection({g: selected[g] for g in order}, base, adapters, notes)
