"""Extension points of the layer-sequential pipeline, so that it names none of what plugs into it.

Three kinds of hook, each registered by name from the package that implements it:

* an **allocator** runs once before the first block and returns per-block sparsities (OWL measures outlier
  ratios on the dense model); whatever else it returns is checkpointed and reported with the stage;
* a **refinement** runs on each linear right after its group is pruned, with the group's calibration statistics,
  and may change weights and masks as long as the pattern holds (DSnoT);
* a **repair** runs on each block after it is pruned, with the block's inputs and the dense block's outputs on
  them as targets (layer-wise reconstruction); the pipeline measures the block's output error before and after.

Hook options arrive as dicts (recipes) or as the hook's own option object (Python API); ``options`` validates
either into the object the hook's functions take, raising a :class:`~sparseforge.errors.SparseforgeError`.
Names are looked up through :func:`sparseforge.registry.load_method_packages`, whose packages register them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from ..errors import PatternError


@dataclass(frozen=True)
class Allocator:
    name: str
    options: Callable[[Any], Any]
    # (BlockInputs, block 0's inputs, target sparsity, options, progress) -> {"block_sparsity": [...], ...}
    allocate: Callable[..., dict]


@dataclass(frozen=True)
class Refinement:
    name: str
    options: Callable[[Any], Any]
    needs: frozenset[str]  # calibration statistics it reads, beyond the method's own
    # (adapter, block index, options) -> names of the block's linears it refines
    targets: Callable[[Any, int, Any], set[str]]
    # (dense weight, pruned weight, mask, statistics, pattern, options) -> (weight, mask, number of changes)
    refine: Callable[..., tuple]


@dataclass(frozen=True)
class Repair:
    name: str
    options: Callable[[Any], Any]
    # (handle, block index, inputs, dense targets, batch ranges, kwargs per batch size, options) -> record
    repair: Callable[..., dict]


_HOOKS: dict[type, dict[str, Any]] = {Allocator: {}, Refinement: {}, Repair: {}}


def register_hook(hook):
    _HOOKS[type(hook)][hook.name] = hook
    return hook


def _registered(kind: type) -> dict:
    """The hooks of one kind, once every method package has had the chance to register its own."""
    from ..registry import load_method_packages

    load_method_packages()
    return _HOOKS[kind]


def _lookup(kind: type, name: str, what: str):
    hooks = _registered(kind)
    if name not in hooks:
        raise PatternError(f"unknown {what} '{name}'; available: {', '.join(sorted(hooks)) or 'none'}")
    return hooks[name]


def allocator(name: str) -> Allocator | None:
    """The allocator behind a calibrated allocation name; None for allocations that need no pass (uniform)."""
    return _registered(Allocator).get(name)


def refinement(name: str) -> Refinement:
    return _lookup(Refinement, name, "refinement")


def repair(name: str) -> Repair:
    return _lookup(Repair, name, "block repair")


def refinement_names() -> tuple[str, ...]:
    return tuple(sorted(_registered(Refinement)))


def dataclass_options(cls, value, what: str):
    """An option dataclass from None (defaults), an instance, or a dict whose keys and value types are checked
    against the defaults (recipes and CLI JSON give ints where floats are meant; those are widened)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    known = {f.name: f.default for f in fields(cls)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise PatternError(f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {}
    for key, given in value.items():
        default = known[key]
        if isinstance(default, float) and isinstance(given, int) and not isinstance(given, bool):
            given = float(given)
        if default is None:
            ok = given is None or isinstance(given, bool)
        else:
            ok = isinstance(given, type(default)) and (isinstance(given, bool) == isinstance(default, bool))
        if not ok:
            raise PatternError(f"{what} option {key} must be like {default!r}, got {given!r}")
        values[key] = given
    return cls(**values)
