"""Registry of architecture families. Adding a family: one ArchSpec file here, one line below, one test."""

from __future__ import annotations

from torch import nn

from ...errors import UnsupportedArchitectureError
from .base import ArchSpec, HeadGeometry, LinearView, ModelAdapter, SubLayer
from .gemma3 import GEMMA3
from .gpt2 import GPT2
from .llama import LLAMA
from .opt import OPT

FAMILIES: dict[str, ArchSpec] = {spec.family: spec for spec in (LLAMA, GEMMA3, OPT, GPT2)}
_BY_MODEL_TYPE: dict[str, ArchSpec] = {mt: spec for spec in FAMILIES.values() for mt in spec.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def check_supported(model_type: str | None) -> ArchSpec:
    """Return the family spec for a config's ``model_type`` or raise a readable error naming what is supported."""
    spec = _BY_MODEL_TYPE.get(model_type or "")
    if spec is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}'; supported model types: {', '.join(supported_model_types())}"
        )
    return spec


def adapter_for(model: nn.Module) -> ModelAdapter:
    return ModelAdapter(model, check_supported(getattr(model.config, "model_type", None)))


__all__ = [
    "ArchSpec", "HeadGeometry", "LinearView", "ModelAdapter", "SubLayer",
    "FAMILIES", "adapter_for", "check_supported", "supported_model_types",
]
