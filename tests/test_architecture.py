"""The shape of the code: what the central packages may import, and the model-attachment protocol end to end."""

import ast
import json
from pathlib import Path

import pytest

import sparseforge
from sparseforge.export.saving import save_model
from sparseforge.models import attachments
from sparseforge.models.attachments import AttachmentConflict, register_restorer
from sparseforge.models.loading import load_model
from sparseforge.registry import METHOD_PACKAGES

SOURCE = Path(sparseforge.__file__).parent
METHODS = {"skip", "teal", "moe", "prune", "retrain", "structured", "search", "dst", "runtime"}
assert set(METHOD_PACKAGES) <= METHODS


def _runtime_imports(path: Path) -> set[str]:
    """Absolute ``sparseforge.*`` modules imported by ``path`` (``if TYPE_CHECKING:`` blocks do not run)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and
               getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    package = path.relative_to(SOURCE.parent).with_suffix("").parts
    package = package[:-1] if package[-1] != "__init__" else package[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name for name in found if name.startswith("sparseforge")}


@pytest.mark.parametrize("core", ["models", "export", "sparsity", "data", "evaluation", "pipeline.py", "recipe.py",
                                  "stages.py", "settings.py", "atomic.py", "entry.py", "interrupts.py"])
def test_central_code_imports_no_method_package(core):
    """Methods plug in through the registry (stages, attachments); the centre never names one."""
    paths = (SOURCE / core).rglob("*.py") if (SOURCE / core).is_dir() else [SOURCE / core]
    offending = {f"{path.relative_to(SOURCE)} -> {name}" for path in paths
                 for name in _runtime_imports(path) if name.split(".")[1:2] and name.split(".")[1] in METHODS}
    assert not offending, sorted(offending)


def _package_graph() -> dict[str, set[str]]:
    """Package-level import arrows inside sparseforge (a top-level module counts as its own package)."""
    def package(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "<root>"

    graph: dict[str, set[str]] = {}
    for path in SOURCE.rglob("*.py"):
        source = package(".".join(path.relative_to(SOURCE.parent).with_suffix("").parts))
        for target in _runtime_imports(path):
            if package(target) != source:
                graph.setdefault(source, set()).add(package(target))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_package_import_cycle():
    """Every package can be understood (and tested) after the ones it imports: the graph has no cycle."""
    assert _cycles(_package_graph()) == []


def test_the_pruning_pipeline_names_none_of_its_hooks():
    """OWL, DSnoT and reconstruction plug into the layer-sequential pipeline through :mod:`sparseforge.prune.hooks`."""
    text = (SOURCE / "prune" / "sequential.py").read_text().split('"""', 2)[2]  # code, after the module docstring
    assert not {"owl", "dsnot", "reconstruct"} & set(text.lower().replace("_", " ").replace(".", " ").split())


class Toy:
    """A test-only attachment: one file in the export, restored by a restorer registered from here."""

    kind = "toy"
    takes_over_ffn = False

    def __init__(self, value: int):
        self.value = value
        self.removed = False

    def save(self, directory: Path) -> None:
        (directory / "toy.json").write_text(json.dumps({"value": self.value}))

    def remove(self) -> None:
        self.removed = True


def _restore_toy(handle, directory: Path) -> None:
    if (directory / "toy.json").exists():
        handle.attach(Toy(json.loads((directory / "toy.json").read_text())["value"]))


def test_an_attachment_travels_through_save_and_load_with_no_central_edit(tmp_path, monkeypatch):
    monkeypatch.setattr(attachments, "_RESTORERS", dict(attachments._RESTORERS))
    register_restorer(Toy.kind, _restore_toy)
    handle = load_model("tiny-llama")
    handle.attach(Toy(7))
    save_model(handle, tmp_path / "export")
    reloaded = load_model(str(tmp_path / "export"))
    assert isinstance(reloaded.attachment("toy"), Toy) and reloaded.attachment("toy").value == 7
    first = reloaded.attachment("toy")
    reloaded.attach(Toy(8))  # one per kind: the old one is removed
    assert first.removed and reloaded.attachment("toy").value == 8
    reloaded.detach("toy")
    assert reloaded.attachment("toy") is None


def test_two_attachments_that_take_over_the_ffn_are_refused():
    from sparseforge.skip import SkipPolicy, install_policy

    handle = load_model("tiny-llama")
    install_policy(handle, SkipPolicy(threshold=1.01, cold_start=0, cold_end=0))
    rival = Toy(1)
    rival.takes_over_ffn = True
    with pytest.raises(AttachmentConflict, match="skip and toy both take over the FFN"):
        handle.attach(rival)
    assert handle.ffn_taken_over_by() == "skip"


def test_a_new_stage_is_one_registration_through_recipe_pipeline_report_save_and_load(tmp_path, monkeypatch,
                                                                                        text_file):
    """The "how to add a method" walkthrough of docs/design.md: a stage defined and registered here, in this file
    alone, runs from a recipe through the pipeline, appears in the report, and its attachment survives save and
    load."""
    import torch
    from pydantic import Field

    from sparseforge import stages
    from sparseforge.pipeline import run_recipe
    from sparseforge.recipe import parse_recipe
    from sparseforge.settings import StrictSettings

    class ScaleStage(StrictSettings):
        factor: float = Field(0.5, gt=0)

    def run(handle, config, context):
        with torch.no_grad():
            handle.adapter.lm_head().weight.mul_(config.factor)
        handle.attach(Toy(int(config.factor * 100)))
        handle.history.append({"stage": "scale", "factor": config.factor})

    def report(record, after):
        return f"scale ({record['factor']:g})", [f"- logits scaled by {record['factor']}"]

    monkeypatch.setattr(stages, "_STAGES", dict(stages._STAGES))
    monkeypatch.setattr(attachments, "_RESTORERS", dict(attachments._RESTORERS))
    stages.register_stage(stages.StageSpec("scale", ScaleStage, run, report=report))
    register_restorer(Toy.kind, _restore_toy)
    recipe = parse_recipe({"model": "tiny-llama", "stages": [{"scale": {"factor": 0.25}}],
                           "data": {"evaluation": str(text_file), "seqlen": 32, "eval_windows": 2}})
    result = run_recipe(recipe, tmp_path / "run", progress=False)
    assert result["stages"][-1] == {"stage": "scale", "factor": 0.25}
    report_md = (tmp_path / "run" / "report.md").read_text()
    assert "## Stage 0: scale (0.25)" in report_md and "- logits scaled by 0.25" in report_md
    reloaded = load_model(str(tmp_path / "run"))
    assert reloaded.attachment("toy").value == 25
    with pytest.raises(Exception, match="unknown key 'stages.0.scale.factr'"):
        parse_recipe({"model": "tiny-llama", "stages": [{"scale": {"factr": 1}}]})
