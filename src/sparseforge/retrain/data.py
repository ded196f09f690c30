"""Training text for recovery: packed windows of the training side of the corpus, in a seeded order per epoch.

The default corpus splits its passages by hash into a calibration/training side and an evaluation side, so
recovery never trains on the text its perplexity is measured on. Windows are consecutive, non-overlapping slices
of the tokenised text (packing: no padding, every token is a target). The batch of step ``s`` is a pure function of
``s`` and the seed: epochs are reshuffled with ``seed + epoch``, and a resumed run sees the same batches.
"""

from __future__ import annotations

import torch

from ..data.sources import load_corpus
from ..data.windows import consecutive_windows, tokenize_corpus
from ..errors import DataError
from ..models.handle import LoadedModel


def training_windows(handle: LoadedModel, data: str | torch.Tensor, seqlen: int) -> torch.Tensor:
    """[n, seqlen] packed windows from ``data`` (a corpus spec; its training side) or given token windows."""
    if torch.is_tensor(data):
        if data.dim() != 2 or data.shape[1] < 2:
            raise DataError(f"training windows must be a [n, seqlen] tensor, got {tuple(data.shape)}")
        return data.long()
    ids = tokenize_corpus(handle.require_tokenizer("retraining"), load_corpus(data, "calibration"))
    windows = consecutive_windows(ids, seqlen, handle.window_bos("retraining"))
    if windows.shape[0] < 1:
        raise DataError(f"training text has {ids.numel()} tokens, too few for one window of {seqlen} tokens")
    return windows


def batch_for_step(windows: torch.Tensor, step: int, batch: int, seed: int) -> torch.Tensor:
    """The ``batch`` windows of step ``step``: position ``step * batch + j`` of an endless, per-epoch shuffled stream."""
    n = windows.shape[0]
    rows = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(order[offset])
    return windows[torch.stack(rows)]
