"""The validated description of a run: model, data, stages, evaluation, export.

Recipes are plain YAML (read with ``yaml.safe_load``) or Python objects; every section rejects unknown keys and
names the offending one. A stage is a one-key mapping (``- prune: {...}``); the stage types are whatever the method
packages registered (:mod:`sparseforge.stages`), each with its one settings model and its placement rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from .data.windows import BOS_POLICIES, CALIBRATION_WINDOWS, DEFAULT_EVAL_WINDOWS
from .dtypes import DTYPES
from .errors import RecipeError, SparseforgeError
from .evaluation.qa import DEFAULT_PROMPT, PROMPT_FORMATS
from .evaluation.tasks import QA_TASKS, ZERO_SHOT_TASKS, parse_task_names
from .settings import StrictSettings, registered
from .stages import stage_specs


class DataConfig(StrictSettings):
    calibration: str = "default"
    evaluation: str = "default"
    seqlen: int = Field(512, ge=2, description="calibration window length (tokens)")
    nsamples: int = Field(CALIBRATION_WINDOWS, ge=1, description="number of calibration windows")
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the calibration windows (and of training order)")
    bos: Literal[BOS_POLICIES] = Field("auto", description="BOS first in every window: auto (as the tokenizer "  # type: ignore[valid-type]
                                       "does), always, never")
    eval_seqlen: int | None = Field(None, ge=2, description="evaluation window length; defaults to seqlen")
    eval_windows: int | None = Field(DEFAULT_EVAL_WINDOWS, ge=0, description="cap on evaluation windows; 0 or null: "
                                                                             "every window")

    @property
    def evaluation_seqlen(self) -> int:
        return self.eval_seqlen or self.seqlen


class _StageChoice(StrictSettings):
    """Exactly one of the registered stage types (the fields are added from :func:`~sparseforge.stages.stage_specs`)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "_StageChoice":
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a stage must have exactly one type ({', '.join(type(self).model_fields)}), got {given or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def config(self) -> BaseModel:
        return getattr(self, self.kind)


class EvaluateConfig(StrictSettings):
    perplexity: bool = True
    tasks: list[str] = Field(default_factory=list, description="zero-shot tasks (lm-eval), e.g. [arc_easy, piqa]; [all]")
    qa: list[str] = Field(default_factory=list, description="knowledge QA by greedy generation: triviaqa, nq_open")
    limit: int | None = Field(None, ge=1, description="at most this many items per task (default all)")
    qa_prompt: str = DEFAULT_PROMPT
    speed: bool = False
    speed_batch_size: int = Field(1, ge=1)
    speed_prompt_tokens: int = Field(128, ge=1)
    speed_new_tokens: int = Field(32, ge=1)
    speed_repeats: int = Field(3, ge=1)
    speed_threads: int | None = Field(None, ge=1, description="torch threads while timing (default: unchanged)")
    runtime: Literal["sparse", "dense", "auto"] | None = Field(
        None, description="also time the final model in the CPU sparse-weight runtime (with speed: true)")

    @field_validator("tasks", "qa")
    @classmethod
    def _known_tasks(cls, value: list[str], info) -> list[str]:
        try:
            return parse_task_names(value, ZERO_SHOT_TASKS if info.field_name == "tasks" else QA_TASKS) if value else []
        except SparseforgeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("qa_prompt")
    @classmethod
    def _known_prompt(cls, value: str) -> str:
        return registered(value, PROMPT_FORMATS, "QA prompt format")


class ExportConfig(StrictSettings):
    format: Literal["auto", "dense", "bitmask", "nm"] = "auto"
    dtype: Literal[tuple(DTYPES)] | None = None  # type: ignore[valid-type]


class _RecipeBase(StrictSettings):
    """Everything of a recipe but its stages, whose types come from the registry (:func:`recipe_model`)."""

    model: str
    dtype: Literal[tuple(DTYPES)] | None = None  # type: ignore[valid-type]
    trust_remote_code: bool = False
    masks_from_zeros: bool = Field(False, description="read the exact zeros of a dense checkpoint pruned elsewhere as "
                                                      "its masks (never done unasked: zeros are not always a mask)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    data: DataConfig = DataConfig()
    stages: list[_StageChoice] = []
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig | None = ExportConfig()

    @model_validator(mode="after")
    def _stages_in_place(self) -> "_RecipeBase":
        """Each stage type says where it may stand (first, last, before pruning, right after a prune stage)."""
        specs = stage_specs()
        kinds = [stage.kind for stage in self.stages]
        for index, stage in enumerate(self.stages):
            placement = specs[stage.kind].placement
            problem = placement(index, kinds, stage.config) if placement is not None else None
            if problem is not None:
                raise ValueError(f"stages.{index}: {problem}")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        else:
            message = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts)


_MODELS: dict[tuple, type[_RecipeBase]] = {}


def recipe_model() -> type[_RecipeBase]:
    """The recipe model for the stage types registered now (built once per set of registered stages, so a stage
    registered later, by a plug-in or a test, is accepted without an edit here)."""
    specs = stage_specs()
    key = tuple((name, spec.settings) for name, spec in specs.items())
    if key not in _MODELS:
        entry = create_model("StageEntry", __base__=_StageChoice, __doc__="A one-key mapping naming a stage type.",
                             **{name: (spec.settings | None, None) for name, spec in specs.items()})
        _MODELS[key] = create_model("Recipe", __base__=_RecipeBase, stages=(list[entry], []))
    return _MODELS[key]


Recipe = recipe_model()  # the recipe model of the built-in stages (``sparseforge.Recipe``)


def parse_recipe(data: object, origin: str = "recipe") -> _RecipeBase:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe must be a mapping with at least a 'model' key")
    try:
        return recipe_model().model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"invalid {origin}: {_describe(exc)}") from None


def load_recipe(path: str | Path) -> _RecipeBase:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no such recipe file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_recipe(data, origin=f"recipe {path}")
