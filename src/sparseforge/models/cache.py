"""The KV cache under both of transformers' names for it.

transformers 5.24 renamed the ``past_key_values`` keyword argument and output field to ``cache`` (the old name
stays, deprecated, until 5.40). Hooks that find the cache among a module's keyword arguments, callers that hand
one to a model and readers of a model's output go through here, so the library works on both sides of the rename
and the newest release (what a fresh install gets) is not silently treated as "no cache".
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

CACHE_NAMES = ("cache", "past_key_values", "layer_past")


def cache_in(kwargs: dict) -> Any:
    """The cache a module was called with, whatever it is called in this transformers release (None if none)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def without_cache(kwargs: dict) -> dict:
    """``kwargs`` minus the cache, for replaying a block's call without one."""
    return {key: value for key, value in kwargs.items() if key not in CACHE_NAMES}


def cache_of(output) -> Any:
    """The cache a model returned (reading the old name on a new release would only print a deprecation)."""
    for name in ("cache", "past_key_values"):
        if name in output.keys():
            return output[name]
    return None


@functools.lru_cache(maxsize=None)
def _argument_name(model_type: type) -> str:
    parameters = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model, cache) -> dict:
    """``{name: cache}`` under the name ``model``'s forward takes, to splat into the call."""
    return {_argument_name(type(model)): cache}
