"""Routed execution of one factorized FFN: only the selected experts' neurons run.

Factorization (:mod:`.factorize`) permutes each FFN's intermediate neurons so that every expert is a contiguous
slice: the optional shared expert first, then routed expert ``e`` at ``[shared + e * size, shared + (e + 1) * size)``.
An expert's weights are then plain views of the dense weights (rows of the input projections, a column block of
the output projection), so nothing is copied per token and the state dict stays the model's own. The projections'
forwards are overridden on the instance (as for FFN skipping), so every family works the same way, OPT's
block-level fc1/fc2 included:

1. the first input projection runs the router on the FFN input and keeps each token's top-k routed experts;
2. each input projection computes the shared expert for every token and, per routed expert, only the tokens that
   chose it, laid out as ``[tokens, shared + k * size]`` (the activation is element-wise, so it applies unchanged);
3. the output projection multiplies each slot by its expert's columns, sums a token's k experts, rescales them by
   ``routed / k`` (a float: the reference code's integer division gives x1 for N=4, k=3), adds the shared expert and
   the output bias once.

At batch-1 decoding the chosen experts are read as Python ints and computed directly (no grouping). In ``dense``
mode (router training) every expert runs and its output is kept, for the Prior-Approximate labels; the forward
still returns the routed output, with a straight-through gate if asked so the language-modelling loss reaches the
router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapters import ModelAdapter
from ..models.adapters.base import LinearView, get_path
from ..models.overrides import ForwardOverrides

MODES = ("sparse", "dense")


@dataclass(frozen=True)
class ExpertLayout:
    """Where the experts sit in a permuted FFN: ``shared`` neurons first, then ``routed`` experts of ``size``."""

    routed: int
    size: int
    shared: int = 0

    def bounds(self, expert: int) -> tuple[int, int]:
        start = self.shared + expert * self.size
        return start, start + self.size

    @property
    def width(self) -> int:
        return self.shared + self.routed * self.size


@dataclass
class RouterRecord:
    """What one dense-mode forward leaves for the router losses (detached except the logits)."""

    logits: torch.Tensor  # [tokens, routed]
    expert_outputs: torch.Tensor  # [tokens, routed, hidden]
    selection: torch.Tensor  # [tokens, k]


class ExpertDispatch:
    """One block's FFN run as routed experts, ``topk`` per token."""

    def __init__(self, adapter: ModelAdapter, layer: int, layout: ExpertLayout, router: nn.Module, topk: int):
        self.layout = layout
        self.router = router
        self.topk = topk
        self.scale = layout.routed / topk
        self.mode = "sparse"
        self.straight_through = False
        self.record: RouterRecord | None = None  # dense mode: the last forward's logits and expert outputs
        self.usage = [0] * layout.routed  # tokens routed to each expert since the last reset
        self._chosen: list[int] = []  # batch-1 fast path: the token's experts
        self._groups: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (expert, tokens, slots), once per forward
        self._logits: torch.Tensor | None = None
        self._selection: torch.Tensor | None = None
        self._overrides = ForwardOverrides()
        block = adapter.blocks()[layer]
        output_role = adapter.spec.ffn_output_role
        for position, (role, view) in enumerate(adapter.ffn(layer).linears.items()):
            module = get_path(block, adapter.spec.ffn_linears[role])
            method = self._output if role == output_role else self._input
            self._overrides.replace(module, self._bind(method, view, first=position == 0))

    @staticmethod
    def _bind(method, view: LinearView, first: bool):
        return lambda original: lambda x, *args, **kwargs: method(view, first, original, x)

    def remove(self) -> None:
        self._overrides.restore()

    # ---- routing ----------------------------------------------------------------------------------------------
    def _route(self, flat: torch.Tensor) -> None:
        """Router logits and the top-k experts of each token; the router reads a detached input (it probes the
        stream, it does not shape it). Tokens are grouped by expert once, for every projection of the FFN."""
        router = self.router
        if router.weight.requires_grad:  # router training
            with torch.enable_grad():
                logits = F.linear(flat.detach(), router.weight, router.bias)
        else:
            logits = F.linear(flat.detach(), router.weight, router.bias)
        if flat.shape[0] == 1 and self.mode == "sparse":  # batch-1 decoding: as few tensor ops as possible
            self._chosen = [int(logits.argmax())] if self.topk == 1 else logits[0].topk(self.topk).indices.tolist()
            for expert in self._chosen:
                self.usage[expert] += 1
            return
        selection = logits.topk(self.topk, dim=-1).indices
        self._logits, self._selection = logits, selection
        counts = torch.bincount(selection.flatten(), minlength=self.layout.routed).tolist()
        self.usage = [u + c for u, c in zip(self.usage, counts)]
        if self.mode == "sparse":
            self._groups = [(expert, *torch.nonzero(selection == expert, as_tuple=True))
                            for expert, count in enumerate(counts) if count]

    # ---- projections ------------------------------------------------------------------------------------------
    def _input(self, view: LinearView, first: bool, original, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if first:
            self._route(flat)
        if self.mode == "dense":
            return original(x)
        weight, bias, layout = view.weight, view.bias, self.layout
        if flat.shape[0] == 1:
            spans = ([(0, layout.shared)] if layout.shared else []) + [layout.bounds(e) for e in self._chosen]
            parts = [F.linear(x, weight[start:end], None if bias is None else bias[start:end]) for start, end in spans]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        routed = flat.new_zeros(flat.shape[0], self.topk, layout.size)
        for expert, tokens, slots in self._groups:
            start, end = layout.bounds(expert)
            routed[tokens, slots] = F.linear(flat[tokens], weight[start:end], None if bias is None else bias[start:end])
        routed = routed.flatten(1)
        if layout.shared:
            shared = F.linear(flat, weight[:layout.shared], None if bias is None else bias[:layout.shared])
            routed = torch.cat([shared, routed], dim=-1)
        return routed.reshape(*x.shape[:-1], -1)

    def _output(self, view: LinearView, first: bool, original, h: torch.Tensor) -> torch.Tensor:
        if self.mode == "sparse" and h.shape[:-1].numel() == 1:
            out = self._single_output(view, h)
            return out if view.bias is None else out + view.bias
        flat = h.reshape(-1, h.shape[-1])
        if self.mode == "dense":
            out = self._dense_output(view, flat)
        else:
            out = self._grouped_output(view, flat)
        if view.bias is not None:
            out = out + view.bias
        return out.reshape(*h.shape[:-1], view.out_features)

    def _shared_output(self, view: LinearView, flat: torch.Tensor) -> torch.Tensor | None:
        shared = self.layout.shared
        return F.linear(flat[:, :shared], view.weight[:, :shared]) if shared else None

    def _single_output(self, view: LinearView, h: torch.Tensor) -> torch.Tensor:
        """One token: its k experts' columns times its slots, kept in the caller's shape."""
        layout, weight = self.layout, view.weight
        out = None
        for slot, expert in enumerate(self._chosen):
            start, end = layout.bounds(expert)
            offset = layout.shared + slot * layout.size
            part = F.linear(h[..., offset:offset + layout.size] if len(self._chosen) > 1 or layout.shared else h,
                            weight[:, start:end])
            out = part if out is None else out + part
        if self.scale != 1:
            out = out * self.scale
        if layout.shared:
            out = out + F.linear(h[..., :layout.shared], weight[:, :layout.shared])
        return out

    def _grouped_output(self, view: LinearView, flat: torch.Tensor) -> torch.Tensor:
        layout, weight = self.layout, view.weight
        routed = flat[:, layout.shared:].reshape(flat.shape[0], self.topk, layout.size)
        out = flat.new_zeros(flat.shape[0], view.out_features)
        for expert, tokens, slots in self._groups:
            start, end = layout.bounds(expert)
            out = out.index_add(0, tokens, F.linear(routed[tokens, slots], weight[:, start:end]))
        out = out * self.scale
        shared = self._shared_output(view, flat)
        return out if shared is None else out + shared

    def _dense_output(self, view: LinearView, flat: torch.Tensor) -> torch.Tensor:
        """Every routed expert's output ([tokens, routed, hidden]); the routed combination of the selected ones."""
        layout = self.layout
        hidden = flat[:, layout.shared:].reshape(flat.shape[0], layout.routed, layout.size)
        columns = view.weight[:, layout.shared:].reshape(view.out_features, layout.routed, layout.size)
        experts = torch.einsum("tns,dns->tnd", hidden, columns)
        gate = torch.zeros_like(self._logits).scatter_(-1, self._selection, 1.0)
        if self.straight_through:
            soft = torch.softmax(self._logits, dim=-1)
            gate = gate - soft.detach() + soft
        self.record = RouterRecord(self._logits, experts.detach(), self._selection)
        out = torch.einsum("tn,tnd->td", gate.to(experts.dtype), experts) * self.scale
        shared = self._shared_output(view, flat)
        return out if shared is None else out + shared
