"""``sparseforge continual`` and ``sparseforge dst``: end to end on synthetic data, and every refusal."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from helpers import assert_clean_failure, run_cli
from helpers import synthetic_dataset

from sparseforge.data import images
from sparseforge.dst import grid
from sparseforge.dst.benchmarks import split_benchmark


@pytest.fixture
def synthetic(monkeypatch):
    """Every benchmark and dataset is the synthetic one (the real ones are in the integration tests)."""
    monkeypatch.setattr(grid, "load_benchmark", lambda name, tasks, data: split_benchmark(synthetic_dataset(), 2))
    monkeypatch.setitem(images.IMAGE_DATASETS, "fashion-mnist", lambda: synthetic_dataset(classes=4))


def test_continual_writes_a_summary_plots_and_resumes(capsys, monkeypatch, tmp_path, synthetic):
    out = tmp_path / "run"
    args = ["continual", "--density", "0.3", "--epochs", "1", "--batch-size", "16", "--delta-t", "3", "--tasks", "2",
            "--seeds", "2", "--baselines", "--out", out]
    code, stdout, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    assert {"runs.jsonl", "summary.json", "summary.md", "accuracy_matrix.png", "mask_overlap.png"} <= \
        {p.name for p in out.iterdir()}
    rows = {row["label"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}
    assert set(rows) == {"dst uniform random d=0.3", "static uniform d=0.3", "finetune", "dense-per-task"}
    assert rows["dst uniform random d=0.3"]["seeds"] == 2
    assert rows["dst uniform random d=0.3"]["task_backward_transfer"] == [0.0, 0.0]
    assert "dst uniform random d=0.3" in stdout
    lines = (out / "runs.jsonl").read_text().count("\n")
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    assert (out / "runs.jsonl").read_text().count("\n") == lines  # everything was already done


@pytest.mark.parametrize("args, message", [
    (["--density", "0"], "density must be in (0, 1]"),
    (["--tasks", "3"], "3 tasks do not divide 10 classes"),
    (["--density", "0.9", "--tasks", "10"], "exceed the network's free capacity"),
    (["--growth", "oracle"], "unknown growth rule 'oracle'"),
    (["--benchmark", "split-svhn"], "unknown benchmark"),
    (["--benchmark", "split-miniimagenet"], "needs --data"),
    (["--strategy", "ewc"], "unknown strategy"),
])
def test_continual_refuses_bad_input_before_training(capsys, monkeypatch, tmp_path, args, message):
    code, _, err = run_cli(capsys, monkeypatch, "continual", "--out", tmp_path / "run", *args)
    assert_clean_failure(code, err, message)
    assert not (tmp_path / "run").exists()


def test_dst_trains_sparse_and_writes_weights_and_masks(capsys, monkeypatch, tmp_path, synthetic):
    out = tmp_path / "dst"
    code, stdout, err = run_cli(capsys, monkeypatch, "dst", "--method", "set", "--density", "0.3", "--epochs", "2",
                                "--batch-size", "16", "--delta-t", "4", "--out", out)
    assert code == 0, err
    assert "test accuracy" in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["updates"] > 0 and result["density"] == pytest.approx(0.3, abs=0.01)
    weights, masks = load_file(out / "model.safetensors"), load_file(out / "masks.safetensors")
    for name, mask in masks.items():
        assert bool((weights[f"{name}.weight"][mask == 0] == 0).all())
    code, _, err = run_cli(capsys, monkeypatch, "dst", "--epochs", "1", "--out", out)
    assert_clean_failure(code, err, "exists; pass --overwrite")


@pytest.mark.parametrize("args, message", [
    (["--method", "prospr"], "unknown method 'prospr'"),
    (["--density", "1.5"], "density must be in (0, 1]"),
    (["--train-data", "svhn"], "unknown dataset 'svhn'"),
    (["--epochs", "0"], "epochs and batch must be at least 1"),
])
def test_dst_refuses_bad_input(capsys, monkeypatch, tmp_path, synthetic, args, message):
    code, _, err = run_cli(capsys, monkeypatch, "dst", "--out", tmp_path / "run", *args)
    assert_clean_failure(code, err, message)
    assert not (tmp_path / "run").exists()


def test_dst_trains_a_language_model_and_exports_it_pruned(capsys, monkeypatch, tmp_path):
    from sparseforge.models.loading import load_model

    out = tmp_path / "lm"
    code, stdout, err = run_cli(capsys, monkeypatch, "dst", "tiny-llama", "--method", "rigl", "--density", "0.3",
                                "--init", "uniform", "--steps", "6", "--delta-t", "2", "--seqlen", "32",
                                "--eval-windows", "2", "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["stage"] == "dst" and stage["updates"] == 2 and stage["rewired"] > 0
    assert report["sparsity"]["overall"] == pytest.approx(0.7, abs=0.01)
    assert "dynamic sparse training (rigl)" in (out / "report.md").read_text()
    reloaded = load_model(str(out))
    masks = reloaded.masks  # recorded by the export, not read from zeros
    assert len(masks) == len(list(reloaded.adapter.linears()))
    for view in reloaded.adapter.linears():
        assert float(masks[view.name].float().mean()) == pytest.approx(0.3, abs=0.01)
    assert "perplexity" in stdout


def test_dst_stage_must_come_first_and_needs_a_dense_model(capsys, monkeypatch, tmp_path):
    import yaml

    from sparseforge.errors import RecipeError
    from sparseforge.recipe import parse_recipe

    with pytest.raises(RecipeError, match="dst trains a sparse model from a dense one"):
        parse_recipe({"model": "tiny-llama", "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                                                        {"dst": {"density": 0.5}}]})
    with pytest.raises(RecipeError, match="density"):
        parse_recipe({"model": "tiny-llama", "stages": [{"dst": {"density": 0}}]})
    pruned = tmp_path / "pruned"
    code, _, err = run_cli(capsys, monkeypatch, "prune", "tiny-llama", "--sparsity", "0.5", "--eval-windows", "2",
                           "--out", pruned)
    assert code == 0, err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(pruned), "stages": [{"dst": {"steps": 2}}]}))
    code, _, err = run_cli(capsys, monkeypatch, "run", recipe, "--out", tmp_path / "run")
    assert_clean_failure(code, err, "is already pruned")
    assert not (tmp_path / "run").exists()
