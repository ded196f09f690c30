"""Hostile but fair input: every reproducer of the reliability review gives its documented exit code and one line,
loses nothing and leaves nothing behind.

Exit codes: 0 success, 2 bad input or usage, 130 SIGINT, 143 SIGTERM, 1 internal error (traceback with --debug).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sparseforge.atomic import MARKER, output_lock
from sparseforge.export.saving import FORMAT_FILE, save_model
from sparseforge.models.loading import load_model
from helpers import assert_clean_failure, run_cli

USAGE = {
    "not a number": ["prune", "tiny-llama", "--sparsity", "abc"],
    "not an integer": ["prune", "tiny-llama", "--nsamples", "four"],
    "unknown option": ["prune", "tiny-llama", "--bogus", "1"],
    "missing model": ["prune"],
    "unknown command": ["frobnicate"],
}


@pytest.mark.parametrize("case", USAGE)
def test_usage_errors_are_one_line_and_exit_2(case, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, *USAGE[case])
    assert_clean_failure(code, err, "--help")


def test_internal_errors_exit_1_with_one_line_and_the_traceback_on_request(capsys, monkeypatch):
    import sparseforge.models.loading as loading

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(loading, "load_model", broken)
    code, _, err = run_cli(capsys, monkeypatch, "info", "tiny-llama")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: internal error (ZeroDivisionError: a bug)")
    with pytest.raises(ZeroDivisionError):
        monkeypatch.setattr(sys, "argv", ["sparseforge", "--debug", "info", "tiny-llama"])
        from sparseforge.cli import main

        main()


VALUES = {
    "speed repeats 0": (["eval", "tiny-llama", "--no-ppl", "--speed", "--repeats", "0"], "repeats must be at least 1"),
    "speed batch 0": (["eval", "tiny-llama", "--no-ppl", "--speed", "--batch-size", "0"], "batch size must be"),
    "speed prompt 0": (["eval", "tiny-llama", "--no-ppl", "--speed", "--prompt-tokens", "0"], "prompt tokens must"),
    "temperature 0": (["generate", "tiny-llama", "hi", "--sample", "--temperature", "0"], "temperature must be"),
    "temperature nan": (["generate", "tiny-llama", "hi", "--sample", "--temperature", "nan"], "temperature must be"),
    "top-p 2": (["generate", "tiny-llama", "hi", "--sample", "--top-p", "2"], "top-p must be in (0, 1]"),
    "past the positions": (["generate", "tiny-gpt2", "hello", "--max-new-tokens", "1100"], "exceeds the 1024"),
    "huge seed": (["prune", "tiny-llama", "--seed", "99999999999999999999999"], "data.seed"),
    "huge nsamples": (["prune", "tiny-llama", "--method", "wanda", "--nsamples", "1000000000", "--seqlen", "512"],
                      "GiB of memory is available"),
    "finercut removes everything": (["finercut", "tiny-llama", "--remove", "0.99"], "at least one must stay"),
    "eval seqlen past positions": (["eval", "tiny-llama", "--seqlen", "100000"], "exceeds the 1024 positions"),
    "nm export of an unstructured prune": (["prune", "tiny-llama", "--format", "nm"], "export format nm needs"),
    "pattern that divides nothing": (["prune", "tiny-llama", "--pattern", "3:5"], "does not divide"),
    "unknown BOS policy": (["eval", "tiny-llama", "--bos", "sometimes"], "unknown BOS policy"),
}


@pytest.mark.parametrize("case", VALUES)
def test_values_the_cli_accepts_are_checked_before_any_work(case, capsys, monkeypatch, tmp_path):
    args, pattern = VALUES[case]
    if args[0] in ("prune", "finercut"):
        args = [*args, "--out", tmp_path / "out"]
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert_clean_failure(code, err, pattern)
    assert "evaluating before" not in err  # refused before the first evaluation, not after it
    assert list(tmp_path.iterdir()) == []


def test_recipe_booleans_are_not_numbers(capsys, monkeypatch, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\ndata: {nsamples: true}\nstages: [{prune: {method: wanda}}]\n")
    code, _, err = run_cli(capsys, monkeypatch, "run", recipe, "--out", tmp_path / "out")
    assert_clean_failure(code, err, "'nsamples' must be a number, got true")


def test_output_paths_are_checked_before_any_work(capsys, monkeypatch, tmp_path):
    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile" / "sub", "/proc/sparseforge-x"):
        code, _, err = run_cli(capsys, monkeypatch, "prune", "tiny-llama", "--out", out)
        assert_clean_failure(code, err, "cannot write")
    code, _, err = run_cli(capsys, monkeypatch, "eval", "tiny-llama", "--json", tmp_path)
    assert_clean_failure(code, err, "is a directory")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / MARKER).write_text("{}")
    code, _, err = run_cli(capsys, monkeypatch, "eval", "tiny-llama", "--out", tmp_path / "done")
    assert_clean_failure(code, err, "already exists")
    assert "perplexity" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "done"]
    assert (tmp_path / "afile").read_text() == "mine"


def test_json_into_new_folders_is_written(capsys, monkeypatch, tmp_path, text_file):
    target = tmp_path / "nodir" / "sub" / "m.json"
    code, _, err = run_cli(capsys, monkeypatch, "eval", "tiny-llama", "--eval-data", text_file, "--seqlen", "32",
                           "--eval-windows", "2", "--json", target)
    assert code == 0, err
    assert "perplexity" in json.loads(target.read_text())


def test_overwrite_replaces_only_sparseforge_outputs(capsys, monkeypatch, tmp_path):
    folder = tmp_path / "mydocs"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    user_file = tmp_path / "userfile.txt"
    user_file.write_text("keep me")
    for out in (folder, user_file):
        code, _, err = run_cli(capsys, monkeypatch, "prune", "tiny-llama", "--no-ppl", "--out", out, "--overwrite")
        assert_clean_failure(code, err, "not written by sparseforge" if out == folder else "is a file")
    assert (folder / "thesis.tex").read_text() == "years of work" and user_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydocs", "userfile.txt"]
    run = tmp_path / "run"
    for _ in range(2):  # a sparseforge run directory is replaced
        code, _, err = run_cli(capsys, monkeypatch, "prune", "tiny-llama", "--no-ppl", "--out", run, "--overwrite")
        assert code == 0, err
    assert (run / MARKER).is_file() and (run / "model" / FORMAT_FILE).is_file()


def test_a_second_run_to_the_same_output_is_refused_while_the_first_holds_it(capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        code, _, err = run_cli(capsys, monkeypatch, "prune", "tiny-llama", "--no-ppl", "--out", out)
        assert_clean_failure(code, err, f"another sparseforge run (pid {os.getpid()}) is writing")
    assert not out.exists()
    code, _, err = run_cli(capsys, monkeypatch, "prune", "tiny-llama", "--no-ppl", "--out", out)
    assert code == 0, err  # the lock went with its holder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(capsys, monkeypatch, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}"
    live = tmp_path / f".out.tmp-{os.getppid()}"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    code, _, err = run_cli(capsys, monkeypatch, "prune", "tiny-llama", "--no-ppl", "--out", tmp_path / "out")
    assert code == 0, err
    assert not stale.exists() and live.exists()


MANIFEST_EDITS = {
    "sha256 deleted": (lambda d: d.pop("sha256"), "'sha256' is missing"),
    "shape changed": (lambda d: d["tensors"][next(iter(d["tensors"]))].update(shape=[64, 32]), "SHA-256"),
    "unknown format": (lambda d: d.update(format="weird"), "unknown format 'weird'"),
    "future version": (lambda d: d.update(version=99), "format version 99"),
}


@pytest.mark.parametrize("case", MANIFEST_EDITS)
def test_export_manifest_is_verified(case, capsys, monkeypatch, tmp_path):
    import sparseforge as sf

    handle = load_model("tiny-llama")
    sf.prune(handle, sparsity=0.5, progress=False)
    save_model(handle, tmp_path / "export", format="bitmask")
    path = tmp_path / "export" / FORMAT_FILE
    description = json.loads(path.read_text())
    edit, pattern = MANIFEST_EDITS[case]
    edit(description)
    path.write_text(json.dumps(description))
    code, _, err = run_cli(capsys, monkeypatch, "info", tmp_path / "export")
    assert_clean_failure(code, err, pattern)


def test_exact_zeros_of_an_unpruned_model_are_not_masks(tmp_path, capsys, monkeypatch):
    import torch

    handle = load_model("tiny-llama")
    view = next(iter(handle.adapter.linears()))
    with torch.no_grad():
        view.weight[0, :5] = 0  # zeros that no pruning made (a de-quantised or shrunk model has such)
    save_model(handle, tmp_path / "export")
    assert json.loads((tmp_path / "export" / FORMAT_FILE).read_text())["masked"] == []
    assert load_model(str(tmp_path / "export")).masks == {}
    asked = load_model(str(tmp_path / "export"), masks_from_zeros=True)
    assert list(asked.masks) == [view.name] and int((~asked.masks[view.name]).sum()) == 5
    code, out, _ = run_cli(capsys, monkeypatch, "info", tmp_path / "export")
    assert code == 0 and "pruning masks: 0 of 14 linears" in out.replace("\n", " ")


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "sparseforge.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("signum, code, resume", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)])
def test_an_interrupted_run_exits_non_zero_says_where_it_resumes_and_resumes(tmp_path, signum, code, resume):
    # enough work after block 0 that the signal lands mid-run; less when the test also reruns to completion
    args = ["prune", "tiny-llama", "--method", "sparsegpt", "--nsamples", "512" if resume else "2048", "--seqlen",
            "256", "--no-ppl", "--out", "int1"]
    process = _start(args, tmp_path)
    state = tmp_path / ".int1.checkpoints" / "stage_0" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"interrupted ({signal.Signals(signum).name}); rerun the same "
                                                   "command to resume from stage 0, block 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".int1.checkpoints"]
    if not resume:
        return
    rerun = _start(args, tmp_path)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    report = json.loads((tmp_path / "int1" / "report.json").read_text())
    assert report["stages"][0]["resumed_from_block"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int1"]


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (Linux: SigCgt in /proc/PID/status)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc to see the handlers")
def test_an_interrupt_while_starting_is_one_line_and_130(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "from sparseforge.entry import main; main()", "info",
                                "tiny-llama"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the console script installs its handlers first, then imports torch and transformers: wait until the kernel
    # reports SIGTERM caught (Python itself catches SIGINT from the start, so that bit says nothing)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _catches(process.pid, signal.SIGTERM):
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGINT)")
