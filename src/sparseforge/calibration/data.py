"""Calibration windows for any method that calibrates: from a corpus spec, or validated when given as token ids."""

from __future__ import annotations

import torch

from ..data.sources import load_corpus
from ..data.windows import calibration_windows, tokenize_corpus
from ..errors import DataError
from ..models.handle import LoadedModel


def calibration_data(handle: LoadedModel, calibration: str | torch.Tensor, nsamples: int, seqlen: int,
                     seed: int) -> torch.Tensor:
    """Calibration windows [nsamples, seqlen] from a corpus spec (or validated, if given as token ids)."""
    if torch.is_tensor(calibration):
        if calibration.dim() != 2 or calibration.shape[0] < 1 or calibration.shape[1] < 2:
            raise DataError(f"calibration windows must be a [nsamples, seqlen] tensor, got {tuple(calibration.shape)}")
        return calibration.long()
    corpus = load_corpus(calibration, "calibration")
    return calibration_windows(tokenize_corpus(handle.require_tokenizer("calibration"), corpus), seqlen, nsamples, seed,
                               handle.window_bos("calibration"))
