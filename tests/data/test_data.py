import json

import pytest
import torch

from sparseforge.data.sources import load_corpus
from sparseforge.data.windows import calibration_windows, evaluation_windows, tokenize_corpus
from sparseforge.errors import DataError
from sparseforge.models.tiny import byte_tokenizer


def test_local_text_file(text_file):
    corpus = load_corpus(str(text_file), "evaluation")
    assert len(corpus.texts) == 40
    ids = tokenize_corpus(byte_tokenizer(), corpus)
    assert ids.numel() == len("\n\n".join(corpus.texts).encode())  # byte-level: one token per byte


def test_jsonl_file(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(5)))
    assert load_corpus(str(path), "calibration").texts[4] == "document number 4"
    path.write_text('{"txt": "no text field"}\n')
    with pytest.raises(DataError, match="'text' field"):
        load_corpus(str(path), "calibration")


def test_empty_and_missing_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(empty), "evaluation")
    with pytest.raises(DataError, match="no such"):
        load_corpus(str(tmp_path / "missing.txt"), "evaluation")
    with pytest.raises(DataError, match="unknown text source"):
        load_corpus("not-a-dataset", "evaluation")


def test_calibration_windows_are_seeded_random_and_exact_length():
    ids = torch.arange(10_000)
    a = calibration_windows(ids, seqlen=128, nsamples=16, seed=0)
    b = calibration_windows(ids, seqlen=128, nsamples=16, seed=0)
    c = calibration_windows(ids, seqlen=128, nsamples=16, seed=1)
    assert a.shape == (16, 128) and torch.equal(a, b) and not torch.equal(a, c)
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous slices of the stream


def test_evaluation_windows_are_consecutive_and_non_overlapping():
    ids = torch.arange(1000)
    windows = evaluation_windows(ids, seqlen=128)
    assert windows.shape == (7, 128)
    assert torch.equal(windows.reshape(-1), ids[: 7 * 128])
    assert evaluation_windows(ids, 128, max_windows=3).shape == (3, 128)


def test_too_short_text_for_the_windows():
    with pytest.raises(DataError, match="too few"):
        evaluation_windows(torch.arange(100), seqlen=128)
    with pytest.raises(DataError, match="too few"):
        calibration_windows(torch.arange(128), seqlen=128, nsamples=4, seed=0)
    with pytest.raises(DataError):
        calibration_windows(torch.arange(1000), seqlen=128, nsamples=0, seed=0)


def test_default_calibration_and_evaluation_never_share_text():
    calibration = load_corpus("default", "calibration")
    evaluation = load_corpus("default", "evaluation")
    assert len(evaluation.texts) > 400 and len(calibration.texts) > 3 * len(evaluation.texts)
    assert not set(calibration.texts) & set(evaluation.texts)
    assert evaluation.name.startswith("wikipedia")


def test_hub_datasets_use_train_for_calibration_and_test_for_evaluation(monkeypatch):
    """The online loaders (WikiText-2, C4) pick disjoint splits; exercised here with a stand-in for the Hub."""
    import datasets
    calls = []

    def fake_load_dataset(*args, split, **kwargs):
        calls.append((args, split, kwargs))
        return {"text": [f"{split} line", "", "  "]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_corpus("wikitext2", "calibration").texts == ["train line"]
    assert load_corpus("wikitext2", "evaluation").texts == ["test line"]
    assert calls[0][0] == ("wikitext", "wikitext-2-raw-v1")
    c4 = load_corpus("c4", "evaluation")
    assert c4.split == "validation" and "c4-validation" in str(calls[-1][2]["data_files"])


def test_hub_dataset_failures_are_data_errors(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load dataset 'wikitext2'"):
        load_corpus("wikitext2", "evaluation")


def _bos_adding(handle):
    """Make a tiny model's tokenizer put BOS first when it encodes text, as Gemma's, Llama 3's and Mistral's do."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = handle.tokenizer
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return handle


def test_bos_policy_follows_the_tokenizer():
    from sparseforge.data.windows import resolve_bos
    from sparseforge.models.loading import load_model

    plain = load_model("tiny-gemma3")
    assert resolve_bos(plain.tokenizer, "auto") is None
    assert resolve_bos(plain.tokenizer, "always") == 1
    adding = _bos_adding(load_model("tiny-gemma3"))
    assert resolve_bos(adding.tokenizer, "auto") == 1
    assert resolve_bos(adding.tokenizer, "never") is None
    with pytest.raises(DataError, match="unknown BOS policy"):
        resolve_bos(adding.tokenizer, "sometimes")


def test_windows_without_bos_are_unchanged_and_with_bos_hold_one_token_less_of_text():
    ids = torch.arange(3, 1003)
    assert torch.equal(evaluation_windows(ids, 100), ids.reshape(10, 100))
    assert torch.equal(calibration_windows(ids, 50, 4, seed=3), calibration_windows(ids, 50, 4, seed=3, bos=None))
    with_bos = evaluation_windows(ids, 100, bos=1)
    assert with_bos.shape == (10, 100) and bool((with_bos[:, 0] == 1).all())
    assert torch.equal(with_bos[:, 1:].reshape(-1), ids[:990])
    drawn = calibration_windows(ids, 50, 4, seed=3, bos=1)
    assert drawn.shape == (4, 50) and bool((drawn[:, 0] == 1).all()) and bool((drawn[:, 1:] > 2).all())


def test_perplexity_of_a_bos_model_is_measured_with_bos_first(text_file):
    """The protocol gives the perplexity of windows that start with BOS, computed by hand here, and says so."""
    import math

    from torch.nn import functional as F

    from sparseforge.data.sources import load_corpus
    from sparseforge.evaluation.suite import evaluate, prepare_evaluation
    from sparseforge.models.loading import load_model

    handle = _bos_adding(load_model("tiny-gemma3"))
    windows, corpus = prepare_evaluation(handle, str(text_file), seqlen=32, max_windows=3)
    measured = evaluate(handle, windows, corpus, progress=False)["perplexity"]
    assert measured["bos"] == "first" and measured["bos_policy"] == "auto"
    ids = tokenize_corpus(handle.tokenizer, load_corpus(str(text_file), "evaluation"))[:3 * 31].reshape(3, 31)
    by_hand = torch.cat([torch.ones(3, 1, dtype=torch.long), ids], dim=1)
    with torch.no_grad():
        logits = handle.model(input_ids=by_hand).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), by_hand[:, 1:].reshape(-1))
    assert measured["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    handle.bos = "never"
    windows, corpus = prepare_evaluation(handle, str(text_file), seqlen=32, max_windows=3)
    plain = evaluate(handle, windows, corpus, progress=False)["perplexity"]
    assert plain["bos"] == "none" and plain["perplexity"] != pytest.approx(measured["perplexity"], rel=1e-6)


@pytest.mark.integration
def test_default_model_adds_no_bos_so_its_protocol_is_unchanged():
    from sparseforge.data.windows import resolve_bos
    from sparseforge.models.loading import load_model

    assert resolve_bos(load_model("default").tokenizer, "auto") is None
