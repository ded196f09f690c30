"""The command-line convention of docs/cli.md, checked on every command: one meaning per option name, the options
that go with exporting, checkpointing and computing, defaults equal to the settings models', old spellings."""

import re
from pathlib import Path

import pytest
import typer

from sparseforge import cli
from sparseforge.recipe import DataConfig, parse_recipe
from sparseforge.stages import stage_specs
from helpers import run_cli

DOC = Path(__file__).parents[1] / "docs" / "cli.md"
# commands that run recipe stages: they export a model, checkpoint, and evaluate before and after
STAGE_COMMANDS = {"prune", "retrain", "shrink", "finercut", "skip calibrate", "factorize", "dst", "search"}
STAGE_OPTIONS = {"--out", "--overwrite", "--restart", "--format", "--export-dtype", "--device", "--bos",
                 "--eval-data", "--eval-windows"}
# what runs no model of its own: info reads a directory, export converts weights, run takes the device from the
# recipe, continual trains small image backbones on the CPU
NO_DEVICE = {"info", "export", "run", "continual"}


def _commands(group=None, prefix=""):
    group = group or typer.main.get_command(cli.app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def _options(command) -> set[str]:
    return {name for param in command.params if param.param_type_name == "option"
            for name in (*param.opts, *param.secondary_opts)}


def _documented() -> set[str]:
    table = DOC.read_text().split("## Options", 1)[1].split("##", 1)[0]
    return {name for cell in re.findall(r"^\| (`[^|]+`) \|", table, re.M) for name in re.findall(r"`([^`]+)`", cell)}


COMMANDS = dict(_commands())


def test_every_option_of_every_command_is_in_the_documented_convention():
    documented = _documented()
    assert "--eval-data" in documented and len(documented) > 100
    undocumented = sorted(f"{name} {option}" for name, command in COMMANDS.items()
                          for option in _options(command) - documented - {"--help"})
    assert not undocumented, undocumented


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_command_has_the_options_its_work_calls_for(name):
    options = _options(COMMANDS[name])
    assert not {"--data", "--batch", "--windows", "--calib-seqlen", "--train-seqlen"} & options
    if name in STAGE_COMMANDS:
        assert STAGE_OPTIONS <= options, sorted(STAGE_OPTIONS - options)
        assert "--dtype" not in options  # the export dtype is --export-dtype; --dtype is a compute dtype
    if name not in NO_DEVICE:
        assert "--device" in options
    if "--out" in options and name != "continual":  # continual resumes into its directory, one line per seed
        assert "--overwrite" in options


@pytest.mark.parametrize("command", sorted(cli.DEPRECATED))
def test_deprecated_spellings_are_hidden_and_rewritten(command):
    options = _options(COMMANDS[command])
    for old, new in cli.DEPRECATED[command].items():
        assert old not in options and new in options
        assert cli.modernise([command, "m", f"{old}=3"]) == [command, "m", f"{new}=3"]


def test_finercut_lines_written_for_the_old_seqlen_keep_their_meaning(capsys):
    old = ["finercut", "m", "--calib-seqlen", "16", "--seqlen", "64"]
    assert cli.modernise(old) == ["finercut", "m", "--seqlen", "16", "--eval-seqlen", "64"]
    assert cli.modernise(["finercut", "m", "--seqlen", "16"]) == ["finercut", "m", "--seqlen", "16"]
    assert "--calib-seqlen is deprecated; use --seqlen" in capsys.readouterr().err


def test_an_old_spelling_still_runs_with_a_warning(capsys, monkeypatch, text_file):
    code, out, err = run_cli(capsys, monkeypatch, "eval", "tiny-llama", "--data", text_file, "--seqlen", "32",
                             "--windows", "2")
    assert code == 0, err
    assert "warning: --data is deprecated; use --eval-data" in err
    assert "warning: --windows is deprecated; use --eval-windows" in err
    assert "2 windows" in out or "perplexity" in out


class _Captured(Exception):
    pass


def _recipe_of(monkeypatch, args: list[str]) -> dict:
    """The recipe a command builds from its defaults (captured before anything runs)."""
    import sparseforge.recipe

    seen = {}

    def capture(values, origin=None):
        seen.update(values)
        raise _Captured

    monkeypatch.setattr(sparseforge.recipe, "parse_recipe", capture)
    with pytest.raises(_Captured):
        typer.main.get_command(cli.app).main(args, standalone_mode=False)
    return seen


# Values a command passes on purpose that differ from the settings default, and why.
CHOSEN = {
    ("prune", "sparsity"): "the default sparsity of unstructured pruning (None in the settings: N:M fixes it)",
    ("dst", "batch"): "capped at 8 windows per step for language models; --batch-size also sets image batches",
    ("dst", "seqlen"): "the settings default is the recipe's data.seqlen",
    ("search", "pick"): "given by the test: a search stage needs pick or target",
}


@pytest.mark.parametrize("name", sorted(STAGE_COMMANDS))
def test_command_defaults_equal_the_settings_defaults(monkeypatch, name):
    """Defaults live once: every value a command passes when given only a model equals the default of the stage's
    settings model (or of the recipe's data section), so a command and a recipe stage compute the same thing."""
    recipe = _recipe_of(monkeypatch, [*name.split(), "tiny-llama"] + (["--pick", "0.5"] if name == "search" else []))
    parsed = parse_recipe(dict(recipe))
    specs = stage_specs()
    drift = []
    for given, stage in zip(recipe["stages"], parsed.stages):
        kind = next(iter(given))
        settings = specs[kind].settings
        for key, value in given[kind].items():
            default = settings.model_fields[key].get_default(call_default_factory=True)
            default = default.model_dump() if hasattr(default, "model_dump") else default
            if value != default and (kind if kind != name.split()[0] else name, key) not in CHOSEN \
                    and (name, key) not in CHOSEN and not (kind == "retrain" and name == "prune"):
                drift.append(f"{kind}.{key}: command {value!r}, settings {default!r}")
    for key, value in recipe["data"].items():
        default = DataConfig.model_fields[key].get_default()
        if value != default:
            drift.append(f"data.{key}: command {value!r}, settings {default!r}")
    assert not drift, drift
