"""A factorized model's experts as one object: settings, routers, per-layer dispatch, expert usage.

The routers live here, not in the model's module tree: the exported weights stay a plain Hugging Face checkpoint
(loaded by ``transformers`` alone it is the dense model, every expert active), and the routers travel in their own
file next to it (:mod:`.storage`), checked against a fingerprint of the weights they were trained with.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..models.adapters import ModelAdapter
from .dispatch import ExpertDispatch, ExpertLayout, RouterRecord

EXPERTS_KEY = "sparseforge_experts"  # in the model config: this model was factorized (and how)
ROUTER_GRADS = ("pa_only", "straight_through")


class ExpertSettings(BaseModel):
    """How a model was factorized. ``experts`` counts every expert, the shared one included: with
    ``shared_expert`` one of them always runs and the router picks ``topk`` of the other ``experts - 1``."""

    model_config = ConfigDict(extra="forbid")

    experts: int = Field(4, ge=1)
    topk: int = Field(1, ge=1)
    partition: str = "contiguous"
    shared_expert: bool = False
    seed: int = 0
    model: dict = Field(default_factory=dict, description="fingerprint of the weights the routers were trained with")
    training: dict = Field(default_factory=dict, description="what training did (steps, losses, seconds)")

    @property
    def routed(self) -> int:
        return self.experts - int(self.shared_expert)

    def describe(self) -> str:
        shared = " + 1 shared" if self.shared_expert else ""
        return f"{self.routed} routed experts{shared}, top-{self.topk}, {self.partition} partition"


class ExpertRouting:
    """Routers and dispatches of every FFN of a factorized model. ``partitions[layer]`` records which original
    neurons form each expert ([experts, size], the shared expert first when there is one). The model attachment of
    kind ``experts`` (saved as ``experts.json`` and ``experts.safetensors`` next to an export's weights)."""

    kind = "experts"
    takes_over_ffn = True

    def __init__(self, adapter: ModelAdapter, settings: ExpertSettings, routers: nn.ModuleList,
                 partitions: list[torch.Tensor]):
        self.adapter = adapter
        self.settings = settings
        self.routers = routers
        self.partitions = partitions
        width = partitions[0].numel()
        size = width // settings.experts
        self.layout = ExpertLayout(settings.routed, size, size if settings.shared_expert else 0)
        self.dispatches = [ExpertDispatch(adapter, layer, self.layout, router, settings.topk)
                           for layer, router in enumerate(routers)]

    def remove(self) -> None:
        for dispatch in self.dispatches:
            dispatch.remove()

    def save(self, directory: Path) -> None:
        from .storage import save_experts

        save_experts(self, directory)

    @contextlib.contextmanager
    def dense(self, router_grad: Literal[ROUTER_GRADS] = "pa_only") -> Iterator[list[ExpertDispatch]]:  # type: ignore[valid-type]
        """Router training: every expert computes (their outputs feed the PA labels), the output is still routed."""
        for dispatch in self.dispatches:
            dispatch.mode, dispatch.straight_through = "dense", router_grad == "straight_through"
        try:
            yield self.dispatches
        finally:
            for dispatch in self.dispatches:
                dispatch.mode, dispatch.straight_through, dispatch.record = "sparse", False, None

    def records(self) -> list[RouterRecord]:
        return [d.record for d in self.dispatches if d.record is not None]

    def reset_usage(self) -> None:
        for dispatch in self.dispatches:
            dispatch.usage = [0] * self.layout.routed

    def usage(self) -> list[list[float]]:
        """Per layer, the share of routed tokens each expert received since the last reset."""
        return [[count / max(1, sum(d.usage)) for count in d.usage] for d in self.dispatches]

    def usage_summary(self) -> dict:
        shares = self.usage()
        routed = self.layout.routed
        # 1 = perfectly balanced, 1/routed = one expert takes everything
        balance = [1 / (routed * max(s)) if any(s) else None for s in shares]
        return {"settings": self.settings.describe(), "per_layer": [[round(x, 4) for x in s] for s in shares],
                "balance": [None if b is None else round(b, 4) for b in balance],
                "tokens": sum(self.dispatches[0].usage) // self.settings.topk}

    def ffn_parameters(self) -> list[nn.Parameter]:
        """The experts' weights (every FFN projection's weight and bias)."""
        params = []
        for layer in range(self.adapter.num_blocks):
            for view in self.adapter.ffn(layer).linears.values():
                params.extend(p for p in (view.module.weight, view.bias) if p is not None)
        return params
