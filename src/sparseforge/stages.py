"""The stage registry: everything a method contributes to recipes and the pipeline, declared once, in its package.

A :class:`StageSpec` names the recipe key, the one settings model (used by recipes and the Python API alike), the
function that runs the stage on a loaded model, the checks that can refuse it before any computation (against the
loaded model: ``preflight``; against its place among the recipe's stages: ``placement``) and, optionally, what it
adds to the run report: its section (``report``), its figures (``figures``) and its training losses
(``loss_curves``). A stage's run appends a record with ``"stage": name`` to the model's history; those functions
read it back. A method package
registers its spec when it is imported; :mod:`sparseforge.registry` lists the packages. The recipe builds its stage
union from the registry and the pipeline loops over the specs, so neither names a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel

if TYPE_CHECKING:
    from .models.handle import LoadedModel


@dataclass
class StageContext:
    """What a stage may need beyond its own settings: the recipe, where to checkpoint, whether to show progress,
    and the settings of the stage that follows (a prune stage runs a following reconstruction inside its pass)."""

    recipe: Any
    checkpoint_dir: Path
    progress: bool
    next_stage: BaseModel | None = None


@dataclass(frozen=True)
class StageSpec:
    name: str
    settings: type[BaseModel]
    run: Callable[["LoadedModel", Any, StageContext], None]
    # refuse what the loaded model cannot satisfy, before any evaluation: (handle, settings, recipe) -> None
    preflight: Callable[["LoadedModel", Any, Any], None] | None = None
    # where the stage may stand: (its index, the kinds of all stages, its settings) -> a problem, or None
    placement: Callable[[int, list[str], Any], str | None] | None = None
    # the stage's section of report.md: (its history record, the metrics after all stages) -> (title, markdown lines)
    report: Callable[[dict, dict], tuple[str, list[str]]] | None = None
    # figures of this stage kind, drawn into the run directory from the whole report (they may compare stages)
    figures: Callable[[Path, dict], None] | None = None
    # training losses for the report's loss plot: (stage index, its record) -> {curve name: losses}
    loss_curves: Callable[[int, dict], dict[str, list[float]]] | None = None


_STAGES: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> StageSpec:
    _STAGES[spec.name] = spec
    return spec


def stage_specs() -> dict[str, StageSpec]:
    """Every registered stage, in the order of :data:`sparseforge.registry.METHOD_PACKAGES` (packages import each
    other, so the order they happen to register in is not it)."""
    from .registry import METHOD_PACKAGES, load_method_packages

    load_method_packages()
    rank = {f"{__package__}.{name}": index for index, name in enumerate(METHOD_PACKAGES)}
    ordered = sorted(_STAGES.values(), key=lambda spec: rank.get(spec.run.__module__.rsplit(".", 1)[0], len(rank)))
    return {spec.name: spec for spec in ordered}


def must_be_first(index: int, kinds: list[str], config) -> str | None:
    """For stages that start from the loaded dense model and change all of it (sparse training)."""
    if index != 0:
        return f"{kinds[index]} trains a sparse model from a dense one, so it must be the first stage"
    return None


def must_be_last(index: int, kinds: list[str], config) -> str | None:
    """For stages calibrated on the final weights (a skip policy, expert routers)."""
    if index != len(kinds) - 1:
        return f"{kinds[index]} is calibrated on the final weights, so it must be the last stage"
    return None


def before_pruning(index: int, kinds: list[str], config) -> str | None:
    """For stages that cut whole neurons, heads or sub-layers: they need the dense model."""
    if "prune" in kinds[:index]:
        return (f"{kinds[index]} removes whole neurons, heads or sub-layers from a dense model, so it must come "
                "before pruning")
    return None
