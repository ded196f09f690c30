"""The command line end to end on tiny models, and every kind of bad input it must refuse cleanly."""

import json
import subprocess
import sys

import pytest
import torch

from sparseforge.export.saving import save_model
from sparseforge.models.loading import load_model

from helpers import assert_clean_failure, run_cli


def test_help_reads_well(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "--help")
    assert code == 0
    for command in ("prune", "eval", "info", "run"):
        assert command in out
    code, out, _ = run_cli(capsys, monkeypatch, "prune", "--help")
    assert code == 0 and "--sparsity" in out and "--pattern" in out and "--format" in out


def test_prune_writes_a_complete_run_directory(capsys, monkeypatch, tmp_path, text_file):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, monkeypatch, "prune", "tiny-llama", "--sparsity", "0.5", "--pattern", "2:4",
                             "--out", out_dir, "--eval-data", text_file, "--seqlen", "64", "--eval-windows", "4")
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["sparsity"]["overall"] == pytest.approx(0.5)
    assert len(report["sparsity"]["per_layer"]) == 14
    before, after = report["metrics"]["before"]["perplexity"], report["metrics"]["after"]["perplexity"]
    assert before["windows"] == after["windows"] == 4 and before["seqlen"] == 64 and before["bos"] == "none"
    assert report["export"]["format"] in ("nm", "bitmask")
    for key in ("model", "recipe", "timings", "peak_memory_mb", "versions"):
        assert key in report
    assert (out_dir / "report.md").read_text().count("perplexity") >= 1
    assert (out_dir / "sparsity_per_layer.png").stat().st_size > 1000
    reloaded = load_model(str(out_dir))
    assert len(reloaded.masks) == 14
    assert "report.md" in out


def test_run_recipe_then_info_and_eval(capsys, monkeypatch, tmp_path, text_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: tiny-gpt2
data: {{evaluation: "{text_file}", seqlen: 64, eval_windows: 2}}
stages:
  - prune: {{method: magnitude, sparsity: 0.7}}
evaluate: {{perplexity: true}}
export: {{format: bitmask, dtype: float16}}
""")
    code, _, err = run_cli(capsys, monkeypatch, "run", recipe, "--out", tmp_path / "run")
    assert code == 0, err
    code, out, err = run_cli(capsys, monkeypatch, "info", tmp_path / "run")
    assert code == 0, err
    assert "gpt2" in out and "70.00%" in out and "bitmask" in out
    code, out, err = run_cli(capsys, monkeypatch, "eval", tmp_path / "run", "--eval-data", text_file, "--seqlen", "64",
                             "--eval-windows", "2", "--speed", "--repeats", "1", "--new-tokens", "4",
                             "--json", tmp_path / "m.json")
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["perplexity"]["windows"] == 2
    assert metrics["speed"]["decode_tokens_per_s"] > 0 and metrics["speed"]["setup"]["threads"] >= 1


def test_eval_tasks_qa_and_speed_next_to_a_baseline(capsys, monkeypatch, tmp_path):
    out_dir = tmp_path / "eval"
    code, out, err = run_cli(capsys, monkeypatch, "eval", "tiny-llama", "--baseline", "tiny-llama", "--no-ppl",
                             "--tasks", "arc_easy,winogrande", "--qa", "nq_open", "--qa-prompt", "plain",
                             "--limit", "2", "--speed", "--repeats", "1", "--new-tokens", "2", "--threads", "1",
                             "--out", out_dir)
    assert code == 0, err
    assert "zero-shot tasks and knowledge QA" in out
    report = json.loads((out_dir / "report.json").read_text())
    after, before = report["metrics"]["after"], report["metrics"]["before"]
    assert set(after["zero_shot"]) == {"arc_easy", "winogrande"} and after["zero_shot"]["arc_easy"]["items"] == 2
    assert after["zero_shot"]["arc_easy"]["metrics"] == before["zero_shot"]["arc_easy"]["metrics"]  # same model
    assert after["qa"]["nq_open"]["metrics"]["agreement_with_reference"] == 1.0
    assert after["speed"]["setup"]["threads"] == 1 and "cpu" in after["speed"]["setup"]["machine"]
    markdown = (out_dir / "report.md").read_text()
    assert "| arc_easy | acc |" in markdown and "100.0%" in markdown and "lm-eval's hub task scores the test" in markdown


@pytest.fixture
def weights_only_model(tmp_path):
    load_model("tiny-llama").model.save_pretrained(tmp_path / "weights")
    return tmp_path / "weights"


@pytest.fixture
def nan_model(tmp_path):
    handle = load_model("tiny-llama")
    with torch.no_grad():
        next(handle.adapter.linears()).weight[0, 0] = float("nan")
    handle.model.save_pretrained(tmp_path / "nan")
    handle.tokenizer.save_pretrained(tmp_path / "nan")
    return tmp_path / "nan"


@pytest.fixture
def truncated_model(tmp_path):
    description = save_model(load_model("tiny-llama"), tmp_path / "trunc", format="bitmask")
    weights = tmp_path / "trunc" / description["weights"]
    weights.write_bytes(weights.read_bytes()[:-100])
    return tmp_path / "trunc"


@pytest.fixture
def bert_dir(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


FILES = {
    "empty.txt": "",
    "short.txt": "too short",
    "bad.yaml": "model: tiny-llama\nstages:\n  - prune: {method: magnitude, sparsityy: 0.5}\n",
    "wrong.yaml": "model: tiny-llama\ndata: {seqlen: lots}\n",
    "bad_dsnot.yaml": "model: tiny-llama\nstages:\n  - prune: {method: wanda, sparsity: 0.5, refine: dsnot, dsnot: {cycles: 3}}\n",
    "tiny.txt": "a few words of calibration text",
    "bad_tasks.yaml": "model: tiny-llama\nevaluate: {tasks: [arc_easy, mmlu]}\n",
}

# arguments: "@name" is a file from FILES written for the test, "%name" a fixture's path
CASES = {
    "missing directory": (["prune", "./no/such/model"], "no such model"),
    "unknown hub id": (["prune", "no-such-org/no-such-model-xyz"], "not found"),
    "unknown tiny model": (["prune", "tiny-bert"], "unknown tiny model"),
    "unsupported architecture": (["prune", "%bert_dir"], "unsupported architecture 'bert'"),
    "sparsity 1.0": (["prune", "tiny-llama", "--sparsity", "1.0"], "[0, 1)"),
    "negative sparsity": (["prune", "tiny-llama", "--sparsity=-0.1"], "[0, 1)"),
    "N >= M": (["prune", "tiny-llama", "--pattern", "4:4"], "0 < N < M"),
    "M does not divide": (["prune", "tiny-llama", "--pattern", "2:48", "--no-ppl"], "does not divide"),
    "NaN weights": (["prune", "%nan_model"], "NaN or Inf"),
    "empty evaluation text": (["prune", "tiny-llama", "--eval-data", "@empty.txt"], "empty"),
    "too-short evaluation text": (["eval", "tiny-llama", "--eval-data", "@short.txt"], "too few"),
    "truncated checkpoint": (["info", "%truncated_model"], "truncated"),
    "unknown recipe key": (["run", "@bad.yaml"], "unknown key 'stages.0.prune.sparsityy'"),
    "wrong recipe type": (["run", "@wrong.yaml"], "data.seqlen"),
    "window beyond learned positions": (["eval", "tiny-gpt2", "--seqlen", "2048"], "exceeds the 1024 positions"),
    "absent GPU": (["eval", "tiny-llama", "--device", "cuda:99"], "cuda:99"),
    "unknown device": (["prune", "tiny-llama", "--device", "abacus"], "unknown device 'abacus'"),
    "unknown export format": (["prune", "tiny-llama", "--format", "zip"], "export.format"),
    "unknown method": (["prune", "tiny-llama", "--method", "obs"], "unknown method 'obs'"),
    "unknown allocation": (["prune", "tiny-llama", "--allocation", "erk"], "unknown allocation 'erk'"),
    "unknown refinement": (["prune", "tiny-llama", "--method", "wanda", "--refine", "dsnt"], "refine"),
    "OWL with N:M": (["prune", "tiny-llama", "--method", "wanda", "--allocation", "owl", "--pattern", "2:4",
                      "--no-ppl"], "owl allocation varies"),
    "zero calibration windows": (["prune", "tiny-llama", "--method", "wanda", "--nsamples", "0"], "nsamples"),
    "calibration text too short": (["prune", "tiny-llama", "--method", "wanda", "--calibration", "@tiny.txt",
                                    "--seqlen", "64", "--no-ppl"], "too few"),
    "unknown DSnoT option": (["run", "@bad_dsnot.yaml"], "unknown dsnot option(s) cycles"),
    "unknown task": (["eval", "tiny-llama", "--no-ppl", "--tasks", "arc_easy,arc_hard"],
                     "unknown task 'arc_hard'; available: arc_easy, arc_challenge, piqa"),
    "QA task given as zero-shot": (["eval", "tiny-llama", "--no-ppl", "--tasks", "triviaqa"], "unknown task 'triviaqa'"),
    "limit 0": (["eval", "tiny-llama", "--no-ppl", "--tasks", "piqa", "--limit", "0"], "--limit must be at least 1"),
    "unknown QA prompt": (["eval", "tiny-llama", "--no-ppl", "--qa", "nq_open", "--qa-prompt", "haiku"],
                          "unknown QA prompt format 'haiku'"),
    "model without a tokenizer": (["eval", "%weights_only_model", "--no-ppl", "--tasks", "piqa", "--limit", "1"],
                                  "has no tokenizer, which task evaluation needs"),
    "unknown task in a recipe": (["run", "@bad_tasks.yaml"], "evaluate.tasks"),
    "retraining a dense model": (["retrain", "tiny-llama", "--steps", "1", "--no-ppl"], "has no pruned weights"),
    "LoRA rank above a layer's width": (["retrain", "%pruned_tiny", "--rank", "65", "--steps", "1", "--no-ppl"],
                                        "rank 65 is larger"),
    "unknown LoRA variant": (["retrain", "%pruned_tiny", "--lora-variant", "dora"], "retrain.lora.variant"),
    "reconstruct without pruning": (["retrain", "%pruned_tiny", "--method", "reconstruct"],
                                    "must directly follow a prune stage"),
}


def _resolve(arg, request, tmp_path):
    if arg.startswith("@"):
        path = tmp_path / arg[1:]
        path.write_text(FILES[arg[1:]])
        return path
    if arg.startswith("%"):
        return request.getfixturevalue(arg[1:])
    return arg


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_and_leaves_nothing(case, capsys, monkeypatch, tmp_path, request):
    args, pattern = CASES[case]
    args = [_resolve(a, request, tmp_path) for a in args]
    out_dir = tmp_path / "out"
    if args[0] in ("prune", "run", "eval", "retrain"):
        args += ["--out", out_dir]
    before = set(tmp_path.iterdir())
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert_clean_failure(code, err, pattern)
    assert not out_dir.exists()
    assert set(tmp_path.iterdir()) == before  # no temporary directories left either


@pytest.fixture
def pruned_tiny(tmp_path):
    import sparseforge as sf

    handle = load_model("tiny-llama")
    sf.prune(handle, sparsity=0.5, progress=False)
    save_model(handle, tmp_path / "pruned")
    return tmp_path / "pruned"


def test_retrain_recovers_a_pruned_run_and_keeps_its_masks(capsys, monkeypatch, tmp_path, text_file, pruned_tiny):
    code, out, err = run_cli(capsys, monkeypatch, "retrain", pruned_tiny, "--params", "norm,lora", "--steps", "2",
                             "--batch-size", "2", "--seqlen", "32", "--train-data", text_file, "--rank", "4",
                             "--eval-windows", "2", "--out", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["method"] == "perp" and stage["sparsity_preserved"] is True
    assert report["metrics"]["after"]["sparsity"] == pytest.approx(report["metrics"]["before"]["sparsity"])
    assert set(load_model(str(tmp_path / "run")).masks) == set(load_model(str(pruned_tiny)).masks)
    assert "sparsity pattern preserved exactly: yes" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "retrain_loss.png").is_file()


def test_prune_with_reconstruction_from_the_command_line(capsys, monkeypatch, tmp_path, text_file):
    code, _, err = run_cli(capsys, monkeypatch, "prune", "tiny-llama", "--method", "wanda", "--calibration",
                           text_file, "--eval-data", text_file, "--seqlen", "32", "--nsamples", "4", "--reconstruct", "3",
                           "--eval-windows", "2", "--out", tmp_path / "run")
    assert code == 0, err
    stage = json.loads((tmp_path / "run" / "report.json").read_text())["stages"][0]
    assert stage["reconstruction"]["settings"]["steps"] == 3
    assert len(stage["reconstruction"]["blocks"]) == 2


def test_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparseforge.cli", "prune", "tiny-llama", "--sparsity", "2",
                             "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "sparsity must be in [0, 1)" in result.stderr
    assert not (tmp_path / "x").exists()
