import dataclasses

import pytest

import sparseforge.pipeline as pipeline
from sparseforge.prune import stage as prune_stage
import sparseforge.stages as stages
from sparseforge.recipe import parse_recipe


def _recipe(text_file, **evaluate):
    return parse_recipe({
        "model": "tiny-qwen2",
        "data": {"evaluation": str(text_file), "eval_seqlen": 32, "eval_windows": 2},
        "stages": [{"prune": {"sparsity": 0.5}}, {"prune": {"pattern": "2:4"}}],
        "evaluate": {"perplexity": True, **evaluate},
        "export": {"format": "auto", "dtype": "float16"},
    })


def test_stages_compose_and_speed_is_measured_before_and_after(text_file, tmp_path):
    recipe = _recipe(text_file, speed=True, speed_repeats=1, speed_new_tokens=2, speed_prompt_tokens=8)
    report = pipeline.run_recipe(recipe, tmp_path / "run", progress=False)
    # the second stage (2:4 on top of 50% unstructured) never revives a pruned weight
    assert report["sparsity"]["overall"] >= 0.5
    assert {"stage_0_prune", "stage_1_prune", "speed", "total"} <= set(report["timings"])
    for when in ("before", "after"):
        assert report["metrics"][when]["speed"]["setup"]["repeats"] == 1
    assert report["export"]["dtype"] == "float16"
    assert report["export"]["pruned_linear_bytes"] < report["export"]["weight_bytes"]
    assert "prefill tokens/s" in (tmp_path / "run" / "report.md").read_text()


def test_zero_shot_and_qa_are_measured_before_and_after_with_retained_columns(text_file, tmp_path):
    recipe = _recipe(text_file, tasks=["piqa"], qa=["triviaqa"], limit=2, qa_prompt="plain")
    report = pipeline.run_recipe(recipe, tmp_path / "run", progress=False)
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert before["zero_shot"]["piqa"]["items"] == after["zero_shot"]["piqa"]["items"] == 2
    assert "agreement_with_reference" in after["qa"]["triviaqa"]["metrics"]
    assert "agreement_with_reference" not in before["qa"]["triviaqa"]["metrics"]
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "| piqa | acc |" in markdown and "| retained |" in markdown and "agreement_with_reference" in markdown


def test_a_recipe_without_stages_measures_once(text_file, tmp_path, monkeypatch):
    calls = []
    real = pipeline.evaluate
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe = parse_recipe({"model": "tiny-llama", "data": {"evaluation": str(text_file), "eval_seqlen": 32,
                                                           "eval_windows": 1}, "export": None})
    report = pipeline.run_recipe(recipe, tmp_path / "run", progress=False)
    assert len(calls) == 1 and report["metrics"]["before"] == report["metrics"]["after"]


def test_interrupted_run_leaves_no_run_directory(text_file, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    spec = stages.stage_specs()["prune"]
    monkeypatch.setitem(stages._STAGES, "prune", dataclasses.replace(spec, run=interrupted))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(_recipe(text_file), tmp_path / "run", progress=False)
    assert list(tmp_path.iterdir()) == [text_file]


def _calibrated(text_file):
    return parse_recipe({
        "model": "tiny-llama",
        "data": {"calibration": str(text_file), "evaluation": str(text_file), "seqlen": 32, "nsamples": 4,
                 "eval_windows": 2},
        "stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.6, "allocation": "owl", "refine": "dsnot"}}],
        "export": {"format": "auto"},
    })


def test_calibrated_run_resumes_after_interruption_and_cleans_up(text_file, tmp_path, monkeypatch):
    reference = pipeline.run_recipe(_calibrated(text_file), tmp_path / "reference", progress=False)
    real_prune = prune_stage.prune

    def interrupted_after_first_block(*args, **kwargs):
        def stop(index):
            raise KeyboardInterrupt

        return real_prune(*args, after_block=stop, **kwargs)

    monkeypatch.setattr(prune_stage, "prune", interrupted_after_first_block)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(_calibrated(text_file), tmp_path / "run", progress=False)
    checkpoints = pipeline.checkpoint_root(tmp_path / "run")
    assert (checkpoints / "stage_0" / "state.json").is_file() and not (tmp_path / "run").exists()
    monkeypatch.setattr(prune_stage, "prune", real_prune)
    resumed = pipeline.run_recipe(_calibrated(text_file), tmp_path / "run", progress=False)
    assert resumed["stages"][0]["resumed_from_block"] == 1
    assert resumed["sparsity"]["per_layer"] == reference["sparsity"]["per_layer"]
    assert resumed["metrics"]["after"]["perplexity"] == reference["metrics"]["after"]["perplexity"]
    assert not checkpoints.exists()
    report_md = (tmp_path / "run" / "report.md").read_text()
    assert "OWL block sparsities" in report_md and "resumed from block 1" in report_md
    assert resumed["stages"][0]["block_sparsity"] == reference["stages"][0]["block_sparsity"]


def test_prune_reconstruct_and_perp_stages_compose(text_file, tmp_path):
    recipe = parse_recipe({
        "model": "tiny-opt",
        "data": {"calibration": str(text_file), "evaluation": str(text_file), "seqlen": 32, "nsamples": 4,
                 "eval_windows": 2},
        "stages": [{"prune": {"method": "wanda", "pattern": "2:4"}},
                   {"retrain": {"method": "reconstruct", "steps": 2, "lora": {"rank": 4}}},
                   {"retrain": {"params": ["bias", "norm", "lora"], "steps": 2, "batch": 2,
                                "lora": {"variant": "scale", "rank": 4}}}],
    })
    report = pipeline.run_recipe(recipe, tmp_path / "run", progress=False)
    prune_stage, retrain_stage = report["stages"]
    assert prune_stage["reconstruction"]["settings"]["lora"]["rank"] == 4  # fused into the prune stage
    assert retrain_stage["trainable"]["by_group"]["bias"] > 0  # OPT has biases
    assert retrain_stage["sparsity_preserved"]
    assert report["sparsity"]["overall"] == pytest.approx(0.5)
