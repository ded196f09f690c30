"""Tokenise a corpus once and cut it into windows of an explicit length.

Calibration: ``nsamples`` random windows drawn with a seeded generator. Evaluation: consecutive non-overlapping
windows from the start, the remainder dropped. The window length is always given explicitly; it is never taken
from ``max_position_embeddings`` (which would make a 135M model and a 7B model silently use different protocols).
Texts are joined with blank lines and tokenised without special tokens. The BOS policy follows the tokenizer
(``auto``): a model whose tokenizer puts BOS first when it encodes text (Gemma, Llama 3, Mistral) never sees a
window without it in use, so each window is then BOS followed by ``seqlen - 1`` tokens of text; a tokenizer that
adds no BOS (SmolLM2, GPT-2) gets plain slices of the token stream. ``always`` and ``never`` force either, for
comparisons with published numbers. The window length always counts the BOS.
"""

from __future__ import annotations

import torch

from ..errors import DataError
from .sources import Corpus

JOINER = "\n\n"
# Evaluation windows by default: 24 x 512 tokens, about 90 s per evaluation of the default model on 2 CPU cores and
# a standard error of the perplexity well under 1%; every window of a long text (148 with Gemma's tokenizer on the
# default text) takes ten minutes and more. 0 (or None in the API) means every window.
DEFAULT_EVAL_WINDOWS = 24
CALIBRATION_WINDOWS = 64  # calibration windows of every calibrated stage unless it says otherwise
BOS_POLICIES = ("auto", "always", "never")


def resolve_bos(tokenizer, policy: str = "auto") -> int | None:
    """The token id to put first in every window under ``policy``, or None for plain slices."""
    if policy not in BOS_POLICIES:
        raise DataError(f"unknown BOS policy '{policy}'; use one of {', '.join(BOS_POLICIES)}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if policy == "never":
        return None
    if policy == "always":
        if bos is None:
            raise DataError("BOS policy 'always' asked for, but this tokenizer has no BOS token")
        return bos
    if bos is None:
        return None
    encoded = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if encoded[:1] == [bos] else None


def bos_label(bos: int | None) -> str:
    """How the protocol line names the policy that was applied: ``first`` (BOS, then text) or ``none``."""
    return "none" if bos is None else "first"


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def tokenize_corpus(tokenizer, corpus: Corpus) -> torch.Tensor:
    ids = tokenizer(JOINER.join(corpus.texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_length(ids: torch.Tensor, seqlen: int, needed: int, what: str) -> None:
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    if ids.numel() < needed:
        raise DataError(f"{what} text has {ids.numel()} tokens, too few for windows of {seqlen} tokens "
                        f"(needs at least {needed})")


def calibration_windows(ids: torch.Tensor, seqlen: int, nsamples: int, seed: int,
                        bos: int | None = None) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (BOS first when ``bos`` is given); the same seed gives the
    same windows."""
    if nsamples < 1:
        raise DataError(f"nsamples must be at least 1, got {nsamples}")
    text = seqlen - (bos is not None)
    _check_length(ids, seqlen, text + 1, "calibration")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - text, (nsamples,), generator=generator)
    return _with_bos(torch.stack([ids[s:s + text] for s in starts.tolist()]), bos)


def consecutive_windows(ids: torch.Tensor, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """Every non-overlapping window of ``seqlen`` tokens from the start (BOS first when given), remainder dropped."""
    text = seqlen - (bos is not None)
    count = ids.numel() // text
    return _with_bos(ids[: count * text].reshape(count, text), bos)


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                       bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start (at most ``max_windows``; BOS first when
    ``bos`` is given, so each holds ``seqlen - 1`` tokens of text)."""
    _check_length(ids, seqlen, seqlen - (bos is not None), "evaluation")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"the number of evaluation windows must be at least 1, got {max_windows}")
    windows = consecutive_windows(ids, seqlen, bos)
    return windows if max_windows is None else windows[:max_windows]
