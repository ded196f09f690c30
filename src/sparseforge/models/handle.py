"""The in-memory model object every stage reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import MissingTokenizerError
from .adapters import ModelAdapter, adapter_for
from .attachments import Attachment, AttachmentConflict


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
    attachments: dict[str, Attachment] = field(default_factory=dict, init=False, repr=False)  # kind -> attachment

    def __post_init__(self) -> None:
        self.adapter = adapter_for(self.model)

    def check_attachable(self, kind: str, takes_over_ffn: bool) -> None:
        """Refuse, before it is built, an attachment that would take over an FFN another one already runs."""
        other = self.ffn_taken_over_by()
        if takes_over_ffn and other is not None and other != kind:
            raise AttachmentConflict(f"this model already has {other} attached; {other} and {kind} both take over "
                                     "the FFN, so use one or the other")

    def attach(self, attachment: Attachment) -> None:
        """Install ``attachment``, replacing one of the same kind; two that take over the FFN are refused."""
        self.check_attachable(attachment.kind, attachment.takes_over_ffn)
        self.detach(attachment.kind)
        self.attachments[attachment.kind] = attachment

    def detach(self, kind: str) -> None:
        """Remove the attachment of ``kind`` (if any) from the model."""
        attachment = self.attachments.pop(kind, None)
        if attachment is not None:
            attachment.remove()

    def attachment(self, kind: str) -> Attachment | None:
        return self.attachments.get(kind)

    def ffn_taken_over_by(self) -> str | None:
        """The kind of the attachment that runs the FFN instead of the model, if any."""
        return next((a.kind for a in self.attachments.values() if a.takes_over_ffn), None)

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
