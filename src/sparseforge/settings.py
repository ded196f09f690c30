"""The base of every settings model (recipe sections and stage settings): strict, and readable when wrong.

Unknown keys are refused and named; so is ``true``/``false`` where a number belongs (YAML's ``nsamples: true``
would otherwise be read as 1). One pydantic model per stage serves the recipe, the Python API and the command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

Model = TypeVar("Model", bound=BaseModel)


def _is_number_annotation(annotation) -> bool:
    """int, float, or an optional/union of them (``int | None``, ``float | list[float]``)."""
    if annotation in (int, float):
        return True
    return any(_is_number_annotation(a) for a in get_args(annotation) if a is not type(None))


def registered(value: str, registry: dict, what: str) -> str:
    """``value`` if it names an entry of ``registry``; otherwise a message listing what is available."""
    if value not in registry:
        raise ValueError(f"unknown {what} '{value}'; available: {', '.join(sorted(registry))}")
    return value


class StrictSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data):
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and _is_number_annotation(field.annotation):
                    raise ValueError(f"'{name}' must be a number, got {str(data[name]).lower()}")
        return data


def read_json_settings(path: Path, model: type[Model], error: type[Exception], what: str) -> Model:
    """``model`` validated from the JSON file at ``path``; a missing file, bad JSON or a failing field raise
    ``error`` with one line naming the file and the first problem (side files: skip policies, thresholds)."""
    try:
        return model.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise error(f"no {what} at {path}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or what
        raise error(f"{path}: {where}: {first['msg']}") from None
