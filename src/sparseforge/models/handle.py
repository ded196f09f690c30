"""The in-memory model object every stage reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import MissingTokenizerError
from .adapters import ModelAdapter, adapter_for


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, its adapter, and the masks of its pruned linears.

    ``masks`` maps a linear's module name to a boolean tensor in [out, in] orientation (True = kept). In memory a
    pruned weight is a dense tensor with zeros plus its mask; storage formats and kernels consume the masks.
    ``history`` records what each stage did, for reports. ``bos`` is the BOS policy of every window drawn for
    this model (calibration, training, evaluation): ``auto`` follows the tokenizer, ``always``/``never`` force it.
    """

    model: nn.Module
    tokenizer: object
    source: str
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one report per stage applied (method, settings, events)
    bos: str = "auto"
    adapter: ModelAdapter = field(init=False)
    skip: object | None = field(default=None, init=False, repr=False)  # installed FFN-skip policy (skip.runtime)
    experts: object | None = field(default=None, init=False, repr=False)  # routers of a factorized model (moe.routing)

    def __post_init__(self) -> None:
        self.adapter = adapter_for(self.model)

    def require_tokenizer(self, purpose: str):
        """The tokenizer, or a clear error: a weights-only directory loads, but cannot read text."""
        if self.tokenizer is None:
            raise MissingTokenizerError(f"{self.source} has no tokenizer, which {purpose} needs; put the tokenizer "
                                        "files (tokenizer.json, tokenizer_config.json) next to the weights")
        return self.tokenizer

    def window_bos(self, purpose: str) -> int | None:
        """The token that starts every window of text for this model (None: windows are plain slices)."""
        from ..data.windows import resolve_bos

        return resolve_bos(self.require_tokenizer(purpose), self.bos)

    @property
    def position_limit(self) -> int | None:
        """How many positions the model was built for (None when its config does not say)."""
        config = self.model.config
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
