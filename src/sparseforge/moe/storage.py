"""The routers of a factorized model on disk, next to its (plain Hugging Face) weights.

``experts.json`` holds the settings, the training report and a fingerprint of the weights the routers were trained
with; ``experts.safetensors`` holds each layer's router and its partition (which original neurons form which
expert). Loading refuses a file that does not belong to the weights beside it (another model, or the same model
fine-tuned since) and one whose shapes do not fit, with one line each.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError

from ..atomic import atomic_write_text
from ..errors import CorruptCheckpointError, FactorizeError
from ..models.fingerprint import fingerprint_differences, model_fingerprint
from ..models.handle import LoadedModel
from ..calibration.checkpoint import load_tensors, save_tensors
from .factorize import install_experts, make_routers
from .routing import EXPERTS_KEY, ExpertRouting, ExpertSettings

SETTINGS_FILE = "experts.json"
ROUTERS_FILE = "experts.safetensors"


def save_experts(routing: ExpertRouting, directory: str | Path) -> None:
    directory = Path(directory)
    settings = routing.settings.model_copy(update={"model": model_fingerprint(routing.adapter)})
    tensors = {}
    for layer, (router, partition) in enumerate(zip(routing.routers, routing.partitions)):
        tensors[f"layers.{layer}.router.weight"] = router.weight
        tensors[f"layers.{layer}.router.bias"] = router.bias
        tensors[f"layers.{layer}.partition"] = partition
    save_tensors(tensors, directory / ROUTERS_FILE)
    atomic_write_text(directory / SETTINGS_FILE, json.dumps(settings.model_dump(mode="json"), indent=1))


def has_experts(directory: str | Path) -> bool:
    return (Path(directory) / SETTINGS_FILE).exists()


def read_settings(path: Path) -> ExpertSettings:
    try:
        return ExpertSettings.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise CorruptCheckpointError(f"{path} is not a valid experts file: {first}") from None


def restore_experts(handle: LoadedModel, directory: str | Path) -> None:
    """A factorized model comes back with its routers (checked against the weights), so it runs sparsely; one whose
    router files are missing is refused (transformers alone would load it as the dense model)."""
    if has_experts(directory):
        load_experts(handle, directory)
    elif getattr(handle.model.config, EXPERTS_KEY, None):
        raise CorruptCheckpointError(f"{directory} is a factorized model but its router files ({SETTINGS_FILE}) are "
                                     "missing; transformers alone loads it as the dense model")


def load_experts(handle: LoadedModel, directory: str | Path) -> None:
    """Install the routers saved in ``directory`` on ``handle`` (whose weights are already in expert order)."""
    directory = Path(directory)
    origin = directory / SETTINGS_FILE
    settings = read_settings(origin)
    differing = fingerprint_differences(settings.model, handle.adapter)
    if differing:
        raise FactorizeError(f"the routers in {directory} were trained for different weights ({', '.join(differing)}"
                             " differ): factorize this model again")
    tensors = load_tensors(directory / ROUTERS_FILE)
    adapter = handle.adapter
    routers = make_routers(adapter, settings.routed, settings.seed)
    partitions = []
    for layer, router in enumerate(routers):
        try:
            weight, bias = tensors[f"layers.{layer}.router.weight"], tensors[f"layers.{layer}.router.bias"]
            partition = tensors[f"layers.{layer}.partition"]
        except KeyError as exc:
            raise FactorizeError(f"the router checkpoint {directory / ROUTERS_FILE} has no {exc.args[0]}: it does "
                                 f"not match this {adapter.num_blocks}-layer model") from None
        width = adapter.ffn(layer).linears[adapter.spec.ffn_output_role].in_features
        if weight.shape != router.weight.shape or bias.shape != router.bias.shape or \
                partition.shape != (settings.experts, width // settings.experts):
            raise FactorizeError(f"the router checkpoint {directory / ROUTERS_FILE} does not match this model: layer "
                                 f"{layer} router {tuple(weight.shape)} vs {tuple(router.weight.shape)}, partition "
                                 f"{tuple(partition.shape)} for an FFN of width {width}")
        with torch.no_grad():
            router.weight.copy_(weight)
            router.bias.copy_(bias)
        partitions.append(partition.long())
    if len([k for k in tensors if k.endswith(".partition")]) != adapter.num_blocks:
        raise FactorizeError(f"the router checkpoint {directory / ROUTERS_FILE} has routers for a different number "
                             f"of layers than this {adapter.num_blocks}-layer model")
    install_experts(handle, settings, routers, partitions)
