"""The base of every settings model (recipe sections and stage settings): strict, and readable when wrong.

Unknown keys are refused and named; so is ``true``/``false`` where a number belongs (YAML's ``nsamples: true``
would otherwise be read as 1). One pydantic model per stage serves the recipe, the Python API and the command line.
"""

from __future__ import annotations

from typing import get_args

from pydantic import BaseModel, ConfigDict, model_validator


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
