"""Splitting every dense FFN of a model into experts, without changing what the model computes.

Each layer's intermediate neurons are partitioned (:mod:`.partition`); the neurons are then physically reordered
so each expert is a contiguous slice (gate/up rows and the matching down columns move together, and any pruning
masks with them). Reordering neurons changes no weight's value and the dense model's output stays exactly the same,
but it lets sparse dispatch use views of the weights instead of gathering them every token, which would cost as
much memory traffic as the computation it saves.

Refused: a model factorized already, a structurally shrunk one (widths differ per layer; factorize first, or not
at all), one with a removed FFN, one with an FFN-skip policy installed (both take over the FFN projections).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FactorizeError
from ..models.handle import LoadedModel
from ..models.structure import structure_of
from ..models.surgery import ffn_width, keep_ffn_neurons
from .partition import DATA_PARTITIONS, PARTITIONS, activation_features, check_experts, neuron_features, \
    partition_neurons
from .routing import EXPERTS_KEY, ExpertRouting, ExpertSettings


def check_factorize_request(handle: LoadedModel, experts: int, topk: int, partition: str,
                            shared_expert: bool = False) -> None:
    """Every refusal in one place, so a recipe fails before any evaluation."""
    adapter = handle.adapter
    if handle.attachment(ExpertRouting.kind) is not None or getattr(adapter.config, EXPERTS_KEY, None):
        raise FactorizeError("this model is factorized into experts already; factorize the dense model instead")
    if structure_of(adapter) is not None:
        raise FactorizeError("this model was structurally shrunk (its FFN widths were cut); factorize the "
                             "dense model, before shrinking")
    handle.check_attachable(ExpertRouting.kind, ExpertRouting.takes_over_ffn)
    if partition not in PARTITIONS:
        raise FactorizeError(f"unknown partition '{partition}'; available: {', '.join(PARTITIONS)}")
    if shared_expert and experts < 2:
        raise FactorizeError("a shared expert needs at least 2 experts (1 shared + routed ones)")
    routed = experts - int(shared_expert)
    if not 1 <= topk <= routed:
        raise FactorizeError(f"top-k must be between 1 and the number of routed experts ({routed}), got {topk}")
    widths = {ffn_width(adapter, layer) for layer in range(adapter.num_blocks)}
    if 0 in widths:
        raise FactorizeError("a block of this model has no FFN (it was removed); factorize the dense model")
    for width in widths:
        check_experts(width, experts)


def _order(features: torch.Tensor, settings: ExpertSettings, norms: torch.Tensor) -> torch.Tensor:
    """[experts, size] original neuron ids: the shared expert (the neurons with the largest weight-norm product,
    always worth running) first when asked, then the routed experts by the partition rule."""
    size = features.shape[0] // settings.experts
    if not settings.shared_expert:
        return partition_neurons(features, settings.experts, settings.partition, settings.seed)
    shared = norms.topk(size).indices.sort().values
    rest = torch.ones(features.shape[0], dtype=torch.bool)
    rest[shared] = False
    remaining = torch.nonzero(rest).flatten()
    routed = remaining[partition_neurons(features[remaining], settings.routed, settings.partition, settings.seed)]
    return torch.cat([shared[None], routed])


def _neuron_norms(handle: LoadedModel, layer: int) -> torch.Tensor:
    """Product of each neuron's input-row norms and output-column norm: how large its contribution can be."""
    adapter = handle.adapter
    output_role = adapter.spec.ffn_output_role
    norms = None
    for role, view in adapter.ffn(layer).linears.items():
        weight = view.weight.detach().float()
        norm = weight.norm(dim=0) if role == output_role else weight.norm(dim=1)
        norms = norm if norms is None else norms * norm
    return norms


def _permute_masks(handle: LoadedModel, layer: int, order: torch.Tensor) -> None:
    adapter = handle.adapter
    for role, view in adapter.ffn(layer).linears.items():
        if view.name in handle.masks:
            dim = 1 if role == adapter.spec.ffn_output_role else 0
            handle.masks[view.name] = handle.masks[view.name].index_select(dim, order.to(
                handle.masks[view.name].device))


def make_routers(adapter, routed: int, seed: int) -> nn.ModuleList:
    """One linear router (with bias) per layer, on that layer's device and in its dtype; weights ~ N(0, 0.02),
    bias 0 (the reference initialisation)."""
    hidden = adapter.embed_tokens().weight.shape[1]
    generator = torch.Generator().manual_seed(seed)
    routers = nn.ModuleList()
    for layer in range(adapter.num_blocks):
        like = adapter.ffn(layer).linears[adapter.spec.ffn_output_role].weight
        router = nn.Linear(hidden, routed, bias=True)
        with torch.no_grad():
            router.weight.copy_(torch.randn(routed, hidden, generator=generator) * 0.02)
            router.bias.zero_()
        routers.append(router.to(like.device, like.dtype))
    return routers


def install_experts(handle: LoadedModel, settings: ExpertSettings, routers: nn.ModuleList,
                    partitions: list[torch.Tensor]) -> ExpertRouting:
    """Attach routers to a model whose neurons are already in expert order (after :func:`factorize`, or loading)."""
    handle.check_attachable(ExpertRouting.kind, ExpertRouting.takes_over_ffn)
    routing = ExpertRouting(handle.adapter, settings, routers, partitions)
    handle.attach(routing)
    setattr(handle.adapter.config, EXPERTS_KEY, {"experts": settings.experts, "topk": settings.topk,
                                                 "shared_expert": settings.shared_expert,
                                                 "partition": settings.partition})
    return routing


def factorize(handle: LoadedModel, experts: int = 4, topk: int = 1, partition: str = "contiguous",
              shared_expert: bool = False, seed: int = 0, calibration: torch.Tensor | None = None) -> ExpertRouting:
    """Split every FFN of ``handle`` into ``experts`` experts and route ``topk`` per token (untrained routers).

    ``calibration`` ([n, seqlen] token ids) is what ``partition="coactivation"`` clusters neurons on.

    The returned routing is installed: the model now runs sparsely. Train the routers and experts with
    :func:`sparseforge.moe.train.train_factorized` (or use :func:`sparseforge.factorize`, which does all of it).
    """
    check_factorize_request(handle, experts, topk, partition, shared_expert)
    settings = ExpertSettings(experts=experts, topk=topk, partition=partition, shared_expert=shared_expert, seed=seed)
    adapter = handle.adapter
    activations = None
    if partition in DATA_PARTITIONS:
        if calibration is None or calibration.numel() == 0:
            raise FactorizeError(f"partition '{partition}' clusters neurons by their activations: give calibration "
                                 "tokens")
        activations = activation_features(handle, calibration)
    partitions = []
    for layer in range(adapter.num_blocks):
        features = activations[layer] if activations is not None else neuron_features(adapter, layer)
        groups = _order(features, settings, _neuron_norms(handle, layer))
        order = groups.flatten()
        keep_ffn_neurons(adapter, layer, order)
        _permute_masks(handle, layer, order)
        partitions.append(groups)
    routers = make_routers(adapter, settings.routed, seed)
    return install_experts(handle, settings, routers, partitions)


def unfactorize(handle: LoadedModel) -> None:
    """Remove the routers: every expert runs again (the dense model, neurons in expert order)."""
    handle.detach(ExpertRouting.kind)
    if hasattr(handle.adapter.config, EXPERTS_KEY):
        delattr(handle.adapter.config, EXPERTS_KEY)
