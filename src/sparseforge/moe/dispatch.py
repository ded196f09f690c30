"""Routed execution of a factorized FFN with real sparse dispatch: only the selected experts' neurons run.

The dense weights are not copied or changed: expert ``e`` is the set of intermediate neurons ``partition[e]``, i.e.
those rows of the FFN input projections (gate/up, fc1) and those columns of the output projection (down, fc2).
The projections' forwards are overridden on the instance (the module tree and state dict stay the model's own, as
for FFN skipping), so every family works the same way, OPT's block-level fc1/fc2 included:

1. the first input projection runs the router on the FFN input and keeps each token's top-k experts;
2. each input projection computes, per expert, only the tokens that selected it (one matmul per active expert on
   that expert's rows) and lays them out as ``[tokens, k, expert size]`` (the activation is element-wise, so it
   applies unchanged);
3. the output projection multiplies each slot by its expert's columns, sums a token's k experts, rescales by
   ``N / k`` (a float: the reference code's integer division gives x1 for N=4, k=3) and adds the output bias once.

With k = N every neuron runs once and the output equals the dense FFN (tested for every family).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FactorizeError
from ..models.adapters import ModelAdapter
from ..models.adapters.base import LinearView, get_path
from ..models.overrides import ForwardOverrides


class ExpertDispatch:
    """One block's FFN run as ``partition.shape[0]`` routed experts, ``topk`` per token."""

    def __init__(self, adapter: ModelAdapter, layer: int, partition: torch.Tensor, router: nn.Module, topk: int):
        experts = partition.shape[0]
        if not 1 <= topk <= experts:
            raise FactorizeError(f"top-k must be between 1 and the number of experts ({experts}), got {topk}")
        views = adapter.ffn(layer).linears
        if not views:
            raise FactorizeError(f"block {layer} has no FFN to factorize (it was removed)")
        self.partition = partition
        self.router = router
        self.topk = topk
        self.scale = experts / topk
        self.selection: torch.Tensor | None = None  # [tokens, k] expert ids of the current forward
        self._groups: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (expert, tokens, slots), once per forward
        self._overrides = ForwardOverrides()
        block = adapter.blocks()[layer]
        output_role = adapter.spec.ffn_output_role
        for position, (role, view) in enumerate(views.items()):
            module = get_path(block, adapter.spec.ffn_linears[role])
            method = self._output if role == output_role else self._input
            self._overrides.replace(module, self._bind(method, view, first=position == 0))

    @staticmethod
    def _bind(method, view: LinearView, first: bool):
        return lambda original: lambda x, *args, **kwargs: method(view, first, x)

    def remove(self) -> None:
        self._overrides.restore()

    def _route(self, flat: torch.Tensor) -> None:
        """Top-k experts per token, and for each active expert the (tokens, slots) that chose it: computed once,
        used by every projection of the FFN."""
        self.selection = self.router(flat).topk(self.topk, dim=-1).indices
        self._groups = [(expert, *torch.nonzero(self.selection == expert, as_tuple=True))
                        for expert in self.selection.unique().tolist()]

    def _input(self, view: LinearView, first: bool, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if first:
            self._route(flat)
        size = self.partition.shape[1]
        out = flat.new_zeros(flat.shape[0], self.topk, size)
        for expert, tokens, slots in self._groups:
            rows = self.partition[expert].to(flat.device)
            computed = flat[tokens] @ view.weight[rows].t()
            if view.bias is not None:
                computed = computed + view.bias[rows]
            out[tokens, slots] = computed
        return out.reshape(*x.shape[:-1], self.topk * size)

    def _output(self, view: LinearView, first: bool, h: torch.Tensor) -> torch.Tensor:
        size = self.partition.shape[1]
        flat = h.reshape(-1, self.topk, size)
        out = flat.new_zeros(flat.shape[0], view.out_features)
        for expert, tokens, slots in self._groups:
            columns = self.partition[expert].to(flat.device)
            out.index_add_(0, tokens, flat[tokens, slots] @ view.weight[:, columns].t())
        out = out * self.scale
        if view.bias is not None:
            out = out + view.bias
        return out.reshape(*h.shape[:-1], view.out_features)
