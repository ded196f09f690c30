"""Perplexity under the pinned protocol: token-level exp(mean NLL) over non-overlapping windows.

Every window predicts its tokens 2..seqlen from the ones before, so each window contributes seqlen - 1 tokens; the
mean is over all predicted tokens (token-level), not a mean of per-window perplexities. The protocol travels with
the number so that a report can never show a perplexity without saying how it was measured.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm



@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
               bos: str = "none") -> dict:
    """Return ``{"perplexity", "nll", "tokens", "windows", "seqlen", "bos", "stride"}`` for ``windows`` [n, seqlen].

    ``bos`` says whether the windows start with the BOS token (``first``: then it is given, never predicted, and
    the first text token is predicted from it) or are plain slices of text (``none``)."""
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
    mean_nll = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "bos": bos,
        "stride": int(windows.shape[1]),
    }
