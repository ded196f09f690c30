"""FactorLLM's router objectives: the Prior-Approximate (PA) loss and the load-balancing term.

PA: the dense FFN's output divided by N/k is what one selected expert "should" output; the k experts whose outputs
are closest to it (mean squared error over the hidden size) form a multi-hot label; the router is pulled towards
the softmax of that label. The label is a hard choice, so only the router receives gradient. Computed on the layer's
own FFN input (the reference code chains the previous layer's teacher output into later layers, a bug not
reproduced), and averaged over every token of every sequence (the reference code's helper keeps only the first
sequence of a 3-D batch).
"""

from __future__ import annotations

import torch

from ..errors import FactorizeError

DIRECTIONS = ("reverse_kl", "cross_entropy")
_CLIP = 1e-7


def pa_labels(expert_outputs: torch.Tensor, teacher: torch.Tensor, topk: int) -> torch.Tensor:
    """Multi-hot [tokens, N]: the ``topk`` experts whose outputs are closest to ``teacher / (N / topk)``."""
    experts = expert_outputs.shape[-2]
    share = teacher.detach().unsqueeze(-2) / (experts / topk)
    error = (expert_outputs.detach() - share).pow(2).mean(-1)
    chosen = error.topk(topk, dim=-1, largest=False).indices
    return torch.zeros_like(error).scatter_(-1, chosen, 1.0)


def pa_loss(router_logits: torch.Tensor, expert_outputs: torch.Tensor, teacher: torch.Tensor, topk: int,
            direction: str = "reverse_kl") -> torch.Tensor:
    """Mean over tokens of KL(router || softmax(label)) (the code's direction) or the cross-entropy with it.

    Shapes: logits [..., N], expert outputs [..., N, hidden], teacher [..., hidden]; leading dimensions are tokens.
    """
    if direction not in DIRECTIONS:
        raise FactorizeError(f"unknown PA loss direction '{direction}'; available: {', '.join(DIRECTIONS)}")
    experts = router_logits.shape[-1]
    logits = router_logits.reshape(-1, experts)
    label = pa_labels(expert_outputs.reshape(logits.shape[0], experts, -1), teacher.reshape(logits.shape[0], -1),
                      topk)
    target = torch.softmax(label, dim=-1).clamp(_CLIP, 1 - _CLIP)
    if direction == "cross_entropy":
        return -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    router = torch.softmax(logits, dim=-1).clamp(_CLIP, 1 - _CLIP)
    return (router * (router.log() - target.log())).sum(-1).mean()


def balance_loss(router_logits: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """Mean over tokens and experts of the router probability placed on the selected experts (minimising it
    flattens the router distribution). ``selection``: [..., k] expert ids."""
    experts = router_logits.shape[-1]
    router = torch.softmax(router_logits.reshape(-1, experts), dim=-1)
    selected = torch.zeros_like(router).scatter_(-1, selection.reshape(router.shape[0], -1), 1.0)
    return (router * selected).mean()
