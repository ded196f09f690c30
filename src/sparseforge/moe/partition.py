"""Which FFN neurons form which expert.

An FFN's intermediate neurons are independent of each other (the activation is element-wise), so any partition of
them into N groups gives experts whose sum is exactly the dense FFN. The rule decides which neurons sit together,
and so how well a router can pick a few experts per token:

* ``contiguous``: neurons in index order (FactorLLM's released code);
* ``random``: a seeded random permutation (the paper's text: "permute and partition");
* ``kmeans``: balanced k-means on each neuron's normalised weight vectors (its rows of the input projections and
  its column of the output projection), neurons with similar weights in one expert (MoEfication's parameter
  clustering; the reference code has this only commented out);
* ``coactivation``: balanced k-means on each neuron's activation magnitudes over calibration tokens, so neurons
  that fire for the same tokens share an expert and a token needs few experts (MoEfication found this better than
  parameter clustering). Needs calibration text.

Experts are equal in size: a width that the number of experts does not divide is refused with the nearest
divisors named, because equal experts keep one stacked weight tensor per projection and batched dispatch simple.
"""

from __future__ import annotations

import torch

from ..errors import FactorizeError
from ..models.adapters import ModelAdapter

PARTITIONS = ("contiguous", "random", "kmeans", "coactivation")
DATA_PARTITIONS = ("coactivation",)  # rules that read calibration text


def check_experts(width: int, experts: int) -> int:
    """The expert size, or a one-line error for a count that cannot split ``width`` into equal experts."""
    if experts < 1:
        raise FactorizeError(f"number of experts must be at least 1, got {experts}")
    if width % experts:
        divisors = [d for d in range(1, min(width, 4 * experts) + 1) if width % d == 0]
        nearest = sorted(divisors, key=lambda d: abs(d - experts))[:2]
        raise FactorizeError(f"{experts} experts do not divide the FFN width {width} into equal experts; "
                             f"nearest that do: {', '.join(map(str, sorted(nearest)))}")
    return width // experts


def neuron_features(adapter: ModelAdapter, layer: int) -> torch.Tensor:
    """[width, features]: each intermediate neuron's rows of the FFN input projections and its column of the
    output projection, each part normalised to unit length (so gate, up and down count alike)."""
    linears = adapter.ffn(layer).linears
    if not linears:
        raise FactorizeError(f"block {layer} has no FFN to factorize (it was removed)")
    output_role = adapter.spec.ffn_output_role
    parts = [view.weight.detach().float() for role, view in linears.items() if role != output_role]
    parts.append(linears[output_role].weight.detach().float().t())
    return torch.cat([torch.nn.functional.normalize(p, dim=1) for p in parts], dim=1)


@torch.no_grad()
def activation_features(handle, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, [width, tokens]: each intermediate neuron's |activation| (the output projection's input) on the
    calibration tokens ``ids`` ([n, seqlen])."""
    adapter = handle.adapter
    captured: list[list[torch.Tensor]] = [[] for _ in range(adapter.num_blocks)]
    hooks = []
    for layer in range(adapter.num_blocks):
        module = adapter.ffn(layer).linears[adapter.spec.ffn_output_role].module
        hooks.append(module.register_forward_pre_hook(
            lambda module, args, layer=layer: captured[layer].append(args[0].reshape(-1, args[0].shape[-1]).abs()
                                                                     .float().cpu())))
    device = next(handle.model.parameters()).device
    try:
        for row in ids:
            handle.model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(parts).t().contiguous() for parts in captured]


def partition_neurons(features: torch.Tensor, experts: int, rule: str = "contiguous", seed: int = 0) -> torch.Tensor:
    """[experts, size] neuron indices, each expert's sorted; every neuron in exactly one expert."""
    if rule not in PARTITIONS:
        raise FactorizeError(f"unknown partition '{rule}'; available: {', '.join(PARTITIONS)}")
    width = features.shape[0]
    size = check_experts(width, experts)
    if rule == "contiguous":
        return torch.arange(width).reshape(experts, size)
    if rule == "random":
        order = torch.randperm(width, generator=torch.Generator().manual_seed(seed))
        return order.reshape(experts, size).sort(dim=1).values
    return _balanced_kmeans(features, experts, size, seed)  # kmeans (weights) and coactivation (activations)


def _balanced_kmeans(features: torch.Tensor, experts: int, size: int, seed: int) -> torch.Tensor:
    """k-means centres (scikit-learn), then each neuron to its nearest centre with room, closest pairs first."""
    from sklearn.cluster import KMeans

    points = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    centres = KMeans(n_clusters=experts, n_init=4, random_state=seed).fit(points).cluster_centers_
    distances = torch.cdist(torch.from_numpy(points), torch.from_numpy(centres).float())
    order = torch.argsort(distances.flatten())
    members: list[list[int]] = [[] for _ in range(experts)]
    assigned = torch.zeros(features.shape[0], dtype=torch.bool)
    for flat in order.tolist():
        neuron, expert = divmod(flat, experts)
        if not assigned[neuron] and len(members[expert]) < size:
            members[expert].append(neuron)
            assigned[neuron] = True
    return torch.tensor(members).sort(dim=1).values
