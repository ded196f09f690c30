"""The lm-eval wrapper: shared-context scoring gives the log-likelihoods of a direct forward pass."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import MissingTokenizerError
from sparseforge.evaluation import harness
from sparseforge.evaluation.harness import _split_request, lm_eval_model
from sparseforge.models.handle import LoadedModel
from sparseforge.models.tiny import TINY_FAMILIES, build_tiny

WORDS = ["alpha", "beta", "gamma", "the", "cat", "sat", "on", "a", "mat", "zebra", "!"]


def _requests(seed: int, items: int = 10):
    """Multiple-choice-like requests: several continuations per context, contexts of very different lengths."""
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    requests = []
    for doc in range(items):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40)))
        for _ in range(rng.randint(1, 4)):
            continuation = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
            requests.append(Instance("loglikelihood", {}, (context, continuation), doc))
    return requests


def _direct(lm, model, context: str, continuation: str) -> tuple[float, bool]:
    """The reference: one forward pass of context + continuation, as lm-eval's HFLM scores it."""
    context_ids, continuation_ids = (lm._encode_pair(context, continuation) if context
                                     else ([lm.prefix_token_id], lm.tok_encode(continuation)))
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids[:, :-1]).logits.double().log_softmax(-1)[0, -len(continuation_ids):]
    targets = torch.tensor(continuation_ids)
    return float(logprobs.gather(-1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_shared_context_loglikelihoods_equal_a_direct_forward(family):
    model, tokenizer = build_tiny(f"tiny-{family}", dtype=torch.float64)
    lm = lm_eval_model(LoadedModel(model, tokenizer, family), batch_tokens=64)  # small: many batches and chunks
    requests = _requests(seed=len(family))
    scored = lm.loglikelihood(requests, disable_tqdm=True)
    for request, (logprob, greedy) in zip(requests, scored):
        expected, expected_greedy = _direct(lm, model, *request.args)
        assert logprob == pytest.approx(expected, abs=1e-5)
        assert greedy == expected_greedy


def test_batching_does_not_change_scores():
    model, tokenizer = build_tiny("tiny-llama", dtype=torch.float64)
    handle = LoadedModel(model, tokenizer, "tiny-llama")
    requests = _requests(seed=3, items=12)
    small = lm_eval_model(handle, batch_tokens=16).loglikelihood(requests, disable_tqdm=True)
    large = lm_eval_model(handle, batch_tokens=100_000).loglikelihood(requests, disable_tqdm=True)
    assert [s for s, _ in small] == pytest.approx([s for s, _ in large], abs=1e-9)


def test_chunks_never_exceed_the_logit_budget(monkeypatch):
    monkeypatch.setattr(harness, "LOGIT_ROWS", 12)
    rows = [(0, harness._Request(i, (), [1] * n, [1] * n)) for i, n in enumerate([9, 8, 8, 5, 4, 4, 4, 1, 1])]
    chunks = list(harness._suffix_chunks(rows))
    assert [r for chunk in chunks for r in chunk] == rows
    for chunk in chunks:
        width = len(chunk[0][1].suffix)
        assert len(chunk) == 1 or len(chunk) * width <= 12
        assert all(len(r.suffix) > harness.SHORTER_SPLITS * width or r is chunk[0][1] for _, r in chunk)


@settings(max_examples=200, deadline=None)
@given(context=st.lists(st.integers(3, 50), min_size=1, max_size=30),
       continuation=st.lists(st.integers(3, 50), min_size=1, max_size=30), max_length=st.integers(2, 40))
def test_split_request_keeps_the_tokens_hflm_scores(context, continuation, max_length):
    request = _split_request(context, continuation, max_length, 0)
    fed = list(request.prefix) + request.suffix
    window = (context + continuation)[-(max_length + 1):]
    assert fed == window[:-1]  # the model sees at most max_length tokens, cut on the left like HFLM
    assert len(fed) <= max_length
    assert request.targets == window[-len(request.targets):]
    assert len(request.targets) == min(len(continuation), len(window) - 1)
    assert len(request.suffix) == len(request.targets)  # one logit per target, none wasted


def test_a_model_without_a_tokenizer_is_refused():
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(MissingTokenizerError, match="no tokenizer, which task evaluation needs"):
        lm_eval_model(LoadedModel(model, None, "weights-only"))
