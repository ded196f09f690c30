"""FinerCut: remove whole attention and FFN sub-layers, greedily, by how little the output distribution moves.

Every live attention sub-layer and every live FFN sub-layer is a candidate. Each step tries removing each remaining
candidate together with those already removed and keeps the removal whose next-token distributions on calibration
text are closest to the *original* model's (:mod:`.divergence`); the chosen sub-layer is then physically removed
(:func:`sparseforge.models.surgery.remove_sublayer`), so later steps run a smaller model.

Cost control, with results identical to the plain algorithm: the inputs of every block under the current removals
are computed once per step, and a candidate in block ``j`` is evaluated by running only blocks ``j..L-1`` from
there (on average half a model per candidate instead of a whole one). The removal order and the divergence after
each removal are recorded (the curve), and checkpointed after every step so an interrupted search resumes; the
search is deterministic, so the checkpoint of a longer search also serves any shorter one (its prefix).

``exclude`` is the reference code's protection of early blocks: both sub-layers of the first ``floor(L*x)+1``
blocks are not candidates until ``floor(2L*x)+1`` sub-layers have been removed (0 disables it, the default).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..errors import StructureError
from ..evaluation.stats import parameter_counts
from ..models.adapters import ModelAdapter
from ..models.handle import LoadedModel
from ..models.structure import describe_blocks, record_structure
from ..models.surgery import remove_sublayer
from ..calibration.data import calibration_data
from ..export.integrity import digest
from .divergence import DISTANCES, Reference
from .preconditions import check_shrinkable, original_shape

KINDS = ("attention", "ffn")
STATE_FILE = "finercut.json"


def candidates(adapter: ModelAdapter) -> list[tuple[int, str]]:
    """Every sub-layer still present, in forward order."""
    return [(i, kind) for i in range(adapter.num_blocks) for kind in KINDS if not adapter.is_removed(i, kind)]


def check_finercut_request(handle: LoadedModel, remove: float, distance_name: str = "js",
                           exclude: float = 0.0) -> int:
    """Refuse what can be refused before any data is read; returns the number of sub-layers to remove."""
    if distance_name not in DISTANCES:
        raise StructureError(f"unknown distance '{distance_name}'; available: {', '.join(DISTANCES)}")
    if not 0 <= exclude < 1:
        raise StructureError(f"exclude must be a fraction in [0, 1), got {exclude}")
    check_shrinkable(handle, "finercut")
    count = removal_count(remove, 2 * handle.adapter.num_blocks)
    remaining = len(candidates(handle.adapter))
    if count >= remaining:  # a model with no attention and no FFN left is only embeddings and a head
        raise StructureError(f"cannot remove {count} sub-layers: only {remaining} remain, and at least one must stay")
    return count


def removal_count(remove: float, available: int) -> int:
    """``remove`` as a count: a fraction of all 2L sub-layers when below 1, else a number of sub-layers."""
    if remove < 0 or remove != remove:
        raise StructureError(f"the removal target must be a positive count or a fraction in [0, 1), got {remove}")
    count = round(remove * available) if remove < 1 else int(remove)
    if remove >= 1 and remove != int(remove):
        raise StructureError(f"a removal target of 1 or more is a count of sub-layers, got {remove}")
    if count > available:
        raise StructureError(f"cannot remove {count} sub-layers: the model has only {available} candidates")
    return count


class _Zeroed:
    """Temporarily zero the output of one sub-layer (the output projection's output: the residual passes)."""

    def __init__(self, adapter: ModelAdapter, index: int, kind: str):
        sub = adapter.attention(index) if kind == "attention" else adapter.ffn(index)
        role = adapter.spec.attention_output_role if kind == "attention" else adapter.spec.ffn_output_role
        self.module = sub.linears[role].module

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda m, args, out: torch.zeros_like(out))

    def __exit__(self, *exc):
        self.handle.remove()


class _Search:
    """The calibration batches, the original model's logits, and the current model's block inputs."""

    def __init__(self, handle: LoadedModel, windows: torch.Tensor, batch_size: int, metric: str):
        self.adapter = handle.adapter
        device = next(handle.model.parameters()).device
        self.batches = [windows[s:s + batch_size].to(device) for s in range(0, len(windows), batch_size)]
        with torch.no_grad():
            self.reference = [Reference(metric, handle.model(input_ids=ids, use_cache=False).logits)
                              for ids in self.batches]
        self.kwargs = [self.adapter.capture_inputs_per_block(ids)[1] for ids in self.batches]  # [batch][block]
        self.inputs: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def refresh_inputs(self) -> None:
        """Inputs of every block under the current removals, per batch."""
        self.inputs = []
        for ids, kwargs in zip(self.batches, self.kwargs):
            hidden, _ = self.adapter.capture_block_inputs(ids)
            per_block = []
            for index in range(self.adapter.num_blocks):
                per_block.append(hidden)
                hidden = self.adapter.run_block(index, hidden, kwargs[index])
            self.inputs.append(per_block)

    @torch.no_grad()
    def divergence_from(self, start: int) -> float:
        """Distance to the original model when running blocks ``start..L-1`` from the stored inputs."""
        total = 0.0
        for batch, kwargs in enumerate(self.kwargs):
            hidden = self.inputs[batch][start]
            for index in range(start, self.adapter.num_blocks):
                hidden = self.adapter.run_block(index, hidden, kwargs[index])
            total += self.reference[batch].distance(self.adapter.logits_from_hidden(hidden))
        return total / len(self.kwargs)


def _excluded(adapter: ModelAdapter, exclude: float, removed: int) -> set[int]:
    if exclude <= 0 or removed >= int(2 * adapter.num_blocks * exclude) + 1:
        return set()
    return set(range(int(adapter.num_blocks * exclude) + 1))


def _load_state(path: Path | None, settings: dict) -> list[dict]:
    if path is None or not path.exists():
        return []
    state = json.loads(path.read_text())
    if state.get("settings") != settings:
        raise StructureError(f"{path} belongs to a FinerCut search with other settings; delete it to start over")
    return state["removed"]


def finercut(handle: LoadedModel, remove: float = 0.25, distance_name: str = "js", exclude: float = 0.0,
             calibration: str | torch.Tensor = "default", nsamples: int = 8, seqlen: int = 128, seed: int = 0,
             batch_size: int = 4, checkpoint_dir: str | Path | None = None, progress: bool = True) -> LoadedModel:
    """Greedily remove ``remove`` sub-layers (a fraction of all 2L, or a count), in place.

    Calibration: ``nsamples`` windows of ``seqlen`` tokens (the paper: 10 x 256). With ``checkpoint_dir`` the
    search saves its order after every removal and resumes from it. The report (order, curve, parameters before
    and after) is appended to ``handle.history``.
    """
    started = time.perf_counter()
    adapter = handle.adapter
    count = check_finercut_request(handle, remove, distance_name, exclude)
    original = original_shape(handle)
    before = parameter_counts(handle)["total"]
    windows = calibration_data(handle, calibration, nsamples, seqlen, seed)
    search = _Search(handle, windows, batch_size, distance_name)
    settings = {"distance": distance_name, "exclude": exclude, "windows": digest([windows]),  # never resume on other text
                "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    state_path = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir is not None else None
    removed = _load_state(state_path, settings)[:count]  # a longer search's order serves a shorter one
    for step in removed:
        remove_sublayer(adapter, step["block"], step["kind"])
    bar = tqdm(total=count, initial=len(removed), desc=f"FinerCut ({distance_name})", disable=not progress,
               unit="sub-layer")
    while len(removed) < count:
        search.refresh_inputs()
        excluded = _excluded(adapter, exclude, len(removed))
        scored = []
        for index, kind in candidates(adapter):
            if index in excluded:
                continue
            with _Zeroed(adapter, index, kind):
                scored.append((search.divergence_from(index), index, kind))
        value, index, kind = min(scored)
        remove_sublayer(adapter, index, kind)
        removed.append({"block": index, "kind": kind, "divergence": value})
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(state_path, json.dumps({"settings": settings, "removed": removed}))
        bar.update(1)
        bar.set_postfix(last=f"{kind}@{index}", divergence=f"{value:.4f}")
    bar.close()
    record = record_structure(adapter, original)
    after = parameter_counts(handle)["total"]
    handle.history.append({
        "stage": "finercut", "method": "finercut",
        "settings": {"remove": count, **{k: v for k, v in settings.items() if k != "windows"}},
        "calibration": {"windows": nsamples, "seqlen": seqlen, "seed": seed},
        "removed": removed, "candidates": 2 * adapter.num_blocks,
        "parameters": {"before": before, "after": after, "removed_fraction": 1 - after / before},
        "blocks": describe_blocks(adapter), "original": record["original"],
        "transformers_loadable": record["transformers_loadable"], "seconds": round(time.perf_counter() - started, 3)})
    return handle
