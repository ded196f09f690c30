"""Explicit per-block sparsities for ``prune()``: a list, a JSON file, or a search run directory.

A searched allocation used to be applied from the search's variant bank, whose variants were calibrated on dense
inputs; reading it here lets any solver re-prune it layer-sequentially. Accepted sources:

* a list of floats (Python, recipes), or ``"0.6,0.7,..."`` (command line);
* a ``.json`` file holding such a list or ``{"block_sparsity": [...]}``;
* a run directory of a ``search`` stage: the sparsities of the point it picked, from ``report.json``, refused
  unless the search's recorded model fingerprint matches the model being pruned (a search of another model is
  not an allocation for this one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import PatternError
from ..models.fingerprint import fingerprint_differences

EXPLICIT = "explicit"  # the allocation name recorded for a given list


def _from_search_run(directory: Path, adapter) -> list[float]:
    try:
        report = json.loads((directory / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise PatternError(f"{directory} is not a readable run directory: {exc}") from None
    searches = [stage for stage in report.get("stages", []) if stage.get("stage") == "search"]
    if not searches or not isinstance(searches[-1].get("picked"), dict):
        raise PatternError(f"{directory} holds no search result with a picked point")
    search = searches[-1]
    if "model" not in search:
        raise PatternError(f"{directory}: the search recorded no model fingerprint (an older run); pass its "
                           "sparsities as a list instead")
    differences = fingerprint_differences(search["model"], adapter)
    if differences:
        raise PatternError(f"{directory} was searched on another model (differs in {', '.join(differences)})")
    return search["picked"]["sparsities"]


def _read(source, adapter) -> list:
    if isinstance(source, (list, tuple)):
        return list(source)
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_search_run(path, adapter)
    if path.suffix == ".json":
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PatternError(f"cannot read block sparsities from {path}: {exc}") from None
        value = value.get("block_sparsity") if isinstance(value, dict) else value
        if not isinstance(value, list):
            raise PatternError(f"{path} holds neither a list nor {{\"block_sparsity\": [...]}}")
        return value
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise PatternError(f"block sparsities '{text}' are neither a comma-separated list, a .json file, nor a "
                           "search run directory") from None


def resolve_block_sparsity(source, adapter) -> list[float]:
    """The per-block sparsities of ``source``, checked against the model: one per block, each in [0, 1)."""
    values = _read(source, adapter)
    if len(values) != adapter.num_blocks:
        raise PatternError(f"{len(values)} block sparsities given for a model with {adapter.num_blocks} blocks")
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value < 1:
            raise PatternError(f"block {index}: sparsity {value!r} is outside [0, 1)")
    return [float(v) for v in values]
