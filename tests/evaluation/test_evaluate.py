import math

import torch
from torch.nn import functional as F

from sparseforge.evaluation.perplexity import perplexity
from sparseforge.evaluation.speed import compare_speed
from sparseforge.evaluation.stats import directory_bytes, parameter_counts, sparsity_summary
from sparseforge.export.saving import save_model
from sparseforge.prune.pruner import prune


def test_perplexity_is_token_level_over_windows(tiny_llama):
    windows = torch.randint(3, 250, (3, 20), generator=torch.Generator().manual_seed(0))
    result = perplexity(tiny_llama.model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = tiny_llama.model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.isclose(result["perplexity"], math.exp(nll.item()), rel_tol=1e-5)
    assert result["tokens"] == 3 * 19 and result["windows"] == 3 and result["seqlen"] == 20
    assert result["bos"] == "none"


def test_batch_size_does_not_change_perplexity(tiny_llama):
    windows = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(1))
    one = perplexity(tiny_llama.model, windows, batch_size=1, progress=False)["perplexity"]
    four = perplexity(tiny_llama.model, windows, batch_size=4, progress=False)["perplexity"]
    assert math.isclose(one, four, rel_tol=1e-5)


def test_parameter_counts_count_tied_weights_once(tiny_llama):
    counts = parameter_counts(tiny_llama)
    unique = {p.data_ptr(): p.numel() for p in tiny_llama.model.parameters()}
    assert counts["total"] == sum(unique.values())
    prune(tiny_llama, sparsity=0.5, progress=False)
    after = parameter_counts(tiny_llama)
    assert after["total"] == counts["total"]
    assert counts["nonzero"] - after["nonzero"] == sparsity_summary(tiny_llama)["prunable_params"] // 2


def test_sparsity_summary_overall_is_weighted_by_size(tiny):
    prune(tiny, sparsity=0.25, progress=False)
    summary = sparsity_summary(tiny)
    zeros = sum(r["zeros"] for r in summary["per_layer"])
    assert math.isclose(summary["overall"], zeros / summary["prunable_params"])
    assert abs(summary["overall"] - 0.25) < 0.01


def test_compare_speed_reports_setup_and_both_models(tiny_llama):
    result = compare_speed({"a": tiny_llama.model, "b": tiny_llama.model}, batch_size=2, prompt_len=8,
                           new_tokens=3, repeats=2)
    assert result["setup"]["batch_size"] == 2 and result["setup"]["statistic"] == "median"
    for name in ("a", "b"):
        assert result["results"][name]["prefill_tokens_per_s"] > 0
        assert result["results"][name]["decode_tokens_per_s"] > 0


def test_directory_bytes(tiny_llama, tmp_path):
    save_model(tiny_llama, tmp_path / "m")
    assert directory_bytes(tmp_path / "m") > sum(p.numel() for p in tiny_llama.model.parameters())
