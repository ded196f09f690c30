"""lm-evaluation-harness scoring of an in-memory model, with shared contexts computed once.

Everything task-related (prompts, few-shot handling, metrics, aggregation, generation with stop sequences) is
lm-eval's own: the model is wrapped in a subclass of lm-eval's ``HFLM``, which accepts an in-memory (pruned,
skipped, factorized) ``PreTrainedModel``. One method is replaced, ``_loglikelihood_tokens``,
because lm-eval cannot serve a need there: ``HFLM`` feeds ``context + continuation`` once per answer choice, so a
four-choice question computes its context four times (lm-eval's source leaves grouping requests by context for
later; it only reuses logits for one-token continuations), and it computes the full-vocabulary log-softmax at every
position of every row. On a 2-core CPU, where the forward pass is bound by matrix multiplies, that makes it 1.7-2.9x
slower on the default model (``bench/harness_speed.py``; 470k tokens instead of 265k for eight tasks at 500 items).

``SharedContextLM`` (built by :func:`lm_eval_model`) scores exactly the same token sequences:

1. requests are grouped by their *prefix* (the context minus its last token);
2. each batch of distinct prefixes runs once, right-padded, filling a KV cache;
3. the cache rows are repeated for every request of a group, and each request's *suffix* (the last context token
   followed by the continuation minus its last token) runs on top of it, with explicit position ids and an
   attention mask that hides the padding slots of shorter prefixes;
4. log-probabilities are taken only at the suffix positions.

Results equal a direct forward pass of ``context + continuation`` to float tolerance (tested on tiny models of every
supported family). Truncation to the model's maximum length is the same as ``HFLM``'s (context cut on the left).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models.cache import cache_argument, cache_of
from ..models.handle import LoadedModel
from .runner import quiet_lm_eval

LOGIT_ROWS = 2048  # suffix positions per forward: bounds the [rows, vocab] logits held at once
SHORTER_SPLITS = 0.8  # a suffix shorter than this fraction of its chunk's longest starts a new chunk


@dataclass
class _Request:
    index: int
    prefix: tuple[int, ...]  # tokens whose KV cache is shared by every request with the same prefix
    suffix: list[int]  # tokens fed on top of the cache; their logits predict ``targets``
    targets: list[int]


def _split_request(context: list[int], continuation: list[int], max_length: int, index: int) -> _Request:
    window = (context + continuation)[-(max_length + 1):]
    n_targets = min(len(continuation), len(window) - 1)
    fed = window[:-1]
    return _Request(index, tuple(fed[:len(fed) - n_targets]), fed[len(fed) - n_targets:], window[-n_targets:])


def _plan_batches(groups: list[tuple[tuple[int, ...], list[_Request]]], batch_tokens: int):
    """Consecutive groups (longest prefix first) whose padded prefixes and cached suffix rows fit ``batch_tokens``."""
    batch: list = []
    for prefix, requests in groups:
        candidate = batch + [(prefix, requests)]
        longest = len(candidate[0][0]) + max(len(r.suffix) for _, reqs in candidate for r in reqs)
        rows = sum(len(reqs) for _, reqs in candidate)
        empty_boundary = batch and (len(prefix) == 0) != (len(batch[0][0]) == 0)
        if batch and (empty_boundary or len(candidate) * len(candidate[0][0]) > batch_tokens
                      or rows * longest > 4 * batch_tokens):
            yield batch
            candidate = [(prefix, requests)]
        batch = candidate
    if batch:
        yield batch


def lm_eval_model(handle: LoadedModel, batch_size: int = 32, batch_tokens: int = 2048, max_length: int | None = None):
    """``handle`` as an lm-eval model (an ``HFLM`` whose log-likelihoods share contexts); lm-eval is imported here,
    only when an evaluation needs it. ``batch_size`` applies to generation, ``batch_tokens`` bounds a scoring batch."""
    tokenizer = handle.require_tokenizer("task evaluation")
    from lm_eval.models.huggingface import HFLM

    class SharedContextLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            return _score_requests(self, requests, batch_tokens, disable_tqdm)

    device = str(next(handle.model.parameters()).device)
    with quiet_lm_eval():  # it warns that an in-memory model skips its loading options: that is the point here
        return SharedContextLM(pretrained=handle.model, tokenizer=tokenizer, batch_size=batch_size,
                               device=device, max_length=max_length)


@torch.no_grad()
def _score_requests(lm, requests, batch_tokens: int, disable_tqdm: bool) -> list[tuple[float, bool]]:
    split = [_split_request(list(ctx), list(cont), lm.max_length, i) for i, (_, ctx, cont) in enumerate(requests)]
    by_prefix: dict[tuple[int, ...], list[_Request]] = {}
    for request in split:
        by_prefix.setdefault(request.prefix, []).append(request)
    groups = sorted(by_prefix.items(), key=lambda item: (-len(item[0]), item[0]))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    progress = tqdm(total=len(requests), desc="log-likelihoods (shared contexts)", disable=disable_tqdm, leave=False)
    for batch in _plan_batches(groups, batch_tokens):
        for request, answer in _score_batch(lm.model, batch, lm.device):
            results[request.index] = answer
            lm.cache_hook.add_partial("loglikelihood", requests[request.index][0], answer)
        progress.update(sum(len(reqs) for _, reqs in batch))
    progress.close()
    return results  # type: ignore[return-value]


def _pad(rows: list, width: int, value: int = 0) -> torch.Tensor:
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _score_batch(model, batch, device):
    prefix_len = torch.tensor([len(p) for p, _ in batch])
    width = int(prefix_len.max())
    cache = None
    if width:
        prefix_mask = (torch.arange(width)[None] < prefix_len[:, None]).long()
        out = model(input_ids=_pad([p for p, _ in batch], width).to(device), attention_mask=prefix_mask.to(device),
                    use_cache=True, logits_to_keep=1)
        cache = cache_of(out)
    else:
        prefix_mask = torch.zeros(len(batch), 0, dtype=torch.long)
    # longest suffix first, so each chunk pads its suffixes only to similar lengths
    rows = sorted(((g, r) for g, (_, reqs) in enumerate(batch) for r in reqs), key=lambda row: -len(row[1].suffix))
    for part in _suffix_chunks(rows):
        suffix_width = len(part[0][1].suffix)
        owner = torch.tensor([g for g, _ in part])
        suffix_len = torch.tensor([len(r.suffix) for _, r in part])
        suffix_mask = (torch.arange(suffix_width)[None] < suffix_len[:, None]).long()
        mask = torch.cat([prefix_mask[owner], suffix_mask], dim=1)
        positions = prefix_len[owner][:, None] + torch.arange(suffix_width)[None]
        part_cache = None
        if cache is not None:
            part_cache = _select_rows(cache, owner.to(device))
        logits = model(input_ids=_pad([r.suffix for _, r in part], suffix_width).to(device),
                       attention_mask=mask.to(device), position_ids=positions.to(device),
                       **cache_argument(model, part_cache), use_cache=cache is not None).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        for row, (_, request) in enumerate(part):
            n = len(request.targets)
            targets = torch.tensor(request.targets, device=logits.device)
            span = logits[row, len(request.suffix) - n:len(request.suffix)]
            # log-softmax at the targets only: no [rows, positions, vocab] tensor of log-probabilities
            total = float((span.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(span, dim=-1)).sum())
            greedy = bool((span.argmax(-1) == targets).all())
            yield request, (total, greedy)


def _suffix_chunks(rows):
    """Consecutive rows (sorted by suffix length, longest first) padded to the first row's length: a chunk ends at
    ``LOGIT_ROWS`` positions, or where suffixes get much shorter (padding them would cost more than a forward)."""
    start = 0
    while start < len(rows):
        width = len(rows[start][1].suffix)
        stop = start + 1
        while (stop < len(rows) and (stop - start + 1) * width <= LOGIT_ROWS
               and len(rows[stop][1].suffix) > SHORTER_SPLITS * width):
            stop += 1
        yield rows[start:stop]
        start = stop


def _select_rows(cache, owner: torch.Tensor):
    """A copy of ``cache`` holding row ``owner[i]`` at row ``i`` (the transformers Cache API, any architecture)."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]  # new tensors on the copies; original kept
    selected.reorder_cache(owner)
    return selected
