"""Tokenise a corpus once and cut it into windows of an explicit length.

Calibration: ``nsamples`` random windows drawn with a seeded generator. Evaluation: consecutive non-overlapping
windows from the start, the remainder dropped. The window length is always given explicitly; it is never taken
from ``max_position_embeddings`` (which would make a 135M model and a 7B model silently use different protocols).
BOS policy "none": texts are joined with blank lines and tokenised without special tokens, so every window is a
plain slice of the token stream, identical for every tokenizer.
"""

from __future__ import annotations

import torch

from ..errors import DataError
from .sources import Corpus

JOINER = "\n\n"
BOS_POLICY = "none"


def tokenize_corpus(tokenizer, corpus: Corpus) -> torch.Tensor:
    ids = tokenizer(JOINER.join(corpus.texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_length(ids: torch.Tensor, seqlen: int, needed: int, what: str) -> None:
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    if ids.numel() < needed:
        raise DataError(f"{what} text has {ids.numel()} tokens, too few for windows of {seqlen} tokens "
                        f"(needs at least {needed})")


def calibration_windows(ids: torch.Tensor, seqlen: int, nsamples: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens; the same seed gives the same windows."""
    if nsamples < 1:
        raise DataError(f"nsamples must be at least 1, got {nsamples}")
    _check_length(ids, seqlen, seqlen + 1, "calibration")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start (at most ``max_windows``)."""
    _check_length(ids, seqlen, seqlen, "evaluation")
    count = ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"the number of evaluation windows must be at least 1, got {max_windows}")
        count = min(count, max_windows)
    return ids[: count * seqlen].reshape(count, seqlen)
