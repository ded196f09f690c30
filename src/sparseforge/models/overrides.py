"""Computing a module differently without changing the model: instance-level ``forward`` replacements.

FFN skipping and expert dispatch change how FFN projections (and, for early exit, attention) compute, but the model
must stay the model: same module tree, same state dict, so exports, adapters, peft and ``transformers`` code see
nothing unusual. Replacing ``forward`` on the instance does that, and ``restore`` puts the class's forward back.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


class ForwardOverrides:
    """The modules whose ``forward`` was replaced, so they can be restored together."""

    def __init__(self) -> None:
        self._modules: list[nn.Module] = []

    def replace(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """``module.forward = make(original_forward)``."""
        module.forward = make(module.forward)
        self._modules.append(module)

    def restore(self) -> None:
        for module in self._modules:
            del module.forward
        self._modules = []
