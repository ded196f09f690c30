"""Candidate layer variants: every block pruned at every level once, so evaluating a candidate only swaps tensors.

As in EvoPress's database, each block is calibrated on the *dense* model's inputs to it, so a block's variant at a
level does not depend on what the other blocks chose, and any combination can be assembled without pruning again.
The calibration statistics (Wanda's input norms, SparseGPT's Hessians) are computed in one dense pass and kept on
disk next to the variants; they are the source of truth: a variant missing from the cache (evicted under the disk
budget, or never written) is recomputed from them, and so is a variant at a sparsity off the grid (OWL's).

A variant of a method that only selects weights (magnitude, Wanda) is stored as bit-packed masks (1/32 of the
weights' size in float32); a variant of a solver (SparseGPT) also stores its updated weights. The cache directory
is keyed by a digest of everything that determines the variants, so two searches with different settings never
share entries.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..errors import SearchError
from ..models.handle import LoadedModel
from ..calibration.checkpoint import save_tensors
from ..prune.methods import Method
from ..prune.scorers import wanda_scores
from ..export.integrity import digest
from ..calibration.block_inputs import BlockInputs
from ..calibration.statistics import InputStatistics
from ..sparsity.allocation import outlier_ratio, owl_sparsities
from ..sparsity.masks import apply_mask
from ..sparsity.patterns import NM, Pattern, parse_pattern
from .cache import BudgetedStore
from .space import SearchSpace

_NM_FAMILY = re.compile(r"^\s*nm\s*:\s*(\d+)\s*$")
STATS_DIR = "statistics"
VARIANTS_DIR = "variants"


def level_pattern(pattern: str, per_row: bool, sparsity: float) -> Pattern:
    """The pattern that reaches ``sparsity``: unstructured, or ``nm:M`` (N:M with N = M * (1 - sparsity))."""
    match = _NM_FAMILY.match(pattern)
    if not match:
        chosen = parse_pattern(pattern, per_row)
        if chosen.fixed_sparsity() is not None:
            raise SearchError(f"pattern {pattern} fixes the sparsity at {chosen.fixed_sparsity():g}: nothing to search; "
                              "use 'unstructured' or an N:M family such as 'nm:8' (levels pick N)")
        return chosen
    m = int(match.group(1))
    n = m * (1 - sparsity)
    if abs(n - round(n)) > 1e-6 or not 0 < round(n) < m:
        raise SearchError(f"sparsity level {sparsity:g} is not an N:{m} pattern (N = {m} x (1 - level) must be an "
                          f"integer between 1 and {m - 1})")
    return NM(int(round(n)), m)


def unit_sizes(handle: LoadedModel) -> tuple[int, ...]:
    adapter = handle.adapter
    return tuple(sum(v.weight.numel() for v in adapter.block_linears(i).values()) for i in range(adapter.num_blocks))


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.uint8)))


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool)).reshape(shape)


class VariantBank:
    """Per-block pruned variants of one model under one method and pattern; applies any allocation in place.

    ``writable=False`` (Ray workers) reads the cache but never writes it: only the process that built the bank
    manages the budget, so workers cannot race each other's evictions.
    """

    def __init__(self, handle: LoadedModel, space: SearchSpace, method: Method, pattern: str, per_row: bool,
                 options: dict, windows: torch.Tensor, batch_size: int, cache_dir: str | Path, budget_bytes: int,
                 log: Callable[[str], None] = print, progress: bool = True, writable: bool = True):
        self.handle, self.space, self.method = handle, space, method
        self.pattern, self.per_row, self.options = pattern, per_row, dict(options)
        for level in space.levels:
            if level > 0:
                level_pattern(pattern, per_row, level)  # refuse levels the pattern cannot reach, before any work
        adapter = handle.adapter
        for index in range(adapter.num_blocks):
            for view in adapter.block_linears(index).values():
                for level in space.levels:
                    if level > 0:
                        level_pattern(pattern, per_row, level).validate((view.out_features, view.in_features),
                                                                        view.name)
        self.views = [{v.name: v for v in adapter.block_linears(i).values()} for i in range(adapter.num_blocks)]
        self.dense = {name: view.weight.detach().clone() for block in self.views for name, view in block.items()}
        self.current: list[float | None] = [0.0] * adapter.num_blocks  # what each block holds now (0 = dense)
        self.updates_weights = method.name == "sparsegpt"
        self.settings = {"model_digest": digest([self.dense[n] for n in self.views[0]]),
                         "model_type": handle.model_type, "blocks": adapter.num_blocks,
                         "calibration_digest": digest([windows]), "calibration_shape": list(windows.shape),
                         "method": method.name, "pattern": pattern, "per_row": per_row, "options": self.options}
        key = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]
        self.directory = Path(cache_dir) / key
        self.store = BudgetedStore(self.directory / VARIANTS_DIR, budget_bytes, log, writable)
        self.log, self.progress, self.writable = log, progress, writable
        self._stats: dict[int, tuple[list[list[str]], dict[str, InputStatistics]]] = {}
        self._statistics(windows, batch_size)
        self.computed = 0  # variants computed in this process (cache misses included)

    # ---- calibration statistics -----------------------------------------------------------------------------
    def _stats_path(self, index: int) -> Path:
        return self.directory / STATS_DIR / f"block_{index:04d}.safetensors"

    def _statistics(self, windows: torch.Tensor, batch_size: int) -> None:
        adapter = self.handle.adapter
        missing = [i for i in range(adapter.num_blocks) if not self._stats_path(i).is_file()]
        if not missing:
            return
        if not self.writable:
            raise SearchError(f"calibration statistics are missing from {self.directory}: the search driver must "
                              "build the bank before workers start (is the cache directory shared with them?)")
        (self.directory / STATS_DIR).mkdir(parents=True, exist_ok=True)
        (self.directory / "settings.json").write_text(json.dumps(self.settings, indent=1))
        device = next(self.handle.model.parameters()).device
        blocks = BlockInputs(self.handle, windows, batch_size, device)
        hidden, blocks.hidden = blocks.hidden, None
        needs = self.method.needs or frozenset({"norms"})  # OWL's outlier ratios need the norms even for magnitude
        for index in tqdm(range(adapter.num_blocks), desc="calibration statistics (dense)", unit="block",
                          disable=not self.progress):
            if index not in missing:  # saved before an interruption: only its outputs are needed
                hidden = blocks.run(index, hidden)
                continue
            collector = blocks.calibrate(index, hidden, needs)
            groups = collector.groups()
            tensors = {}
            for group in groups:
                stats = collector.of(group[0])
                for field in ("sum_squares", "hessian"):
                    if getattr(stats, field) is not None:
                        tensors[f"{group[0]}.{field}"] = getattr(stats, field)
                tensors[f"{group[0]}.tokens"] = torch.tensor([stats.tokens, stats.samples])
            tensors["groups"] = torch.tensor(list(json.dumps(groups).encode()), dtype=torch.uint8)
            save_tensors(tensors, self._stats_path(index))
            hidden = blocks.run(index, hidden)

    def statistics(self, index: int) -> tuple[list[list[str]], dict[str, InputStatistics]]:
        """Block ``index``'s shared-input groups and their statistics (loaded once per process)."""
        if index not in self._stats:
            try:
                saved = load_file(str(self._stats_path(index)))
                groups = json.loads(bytes(saved.pop("groups").tolist()).decode())
            except Exception as exc:  # noqa: BLE001 - any damage means: compute again
                raise SearchError(f"calibration statistics {self._stats_path(index)} are unreadable ({exc}); delete "
                                  f"{self.directory} to recompute them") from None
            by_name = {}
            for group in groups:
                owner = group[0]
                features = self.views[index][owner].in_features
                stats = InputStatistics(features, frozenset(), torch.device("cpu"))
                stats.sum_squares = saved.get(f"{owner}.sum_squares")
                stats.hessian = saved.get(f"{owner}.hessian")
                stats.tokens, stats.samples = (int(v) for v in saved[f"{owner}.tokens"].tolist())
                for name in group:
                    by_name[name] = stats
            self._stats[index] = (groups, by_name)
        return self._stats[index]

    # ---- variants ---------------------------------------------------------------------------------------------
    def _key(self, index: int, sparsity: float) -> str:
        return f"block{index:04d}_s{sparsity:.6f}"

    def _compute(self, index: int, sparsity: float) -> dict[str, torch.Tensor]:
        """Prune block ``index`` at ``sparsity`` from its dense weights; leaves the block holding that variant."""
        groups, stats = self.statistics(index)
        views = self.views[index]
        pattern = level_pattern(self.pattern, self.per_row, sparsity)
        tensors = {}
        with torch.no_grad():
            for group in groups:
                for name in group:
                    views[name].weight.copy_(self.dense[name])
                result = self.method.prune_group([views[n] for n in group], stats[group[0]], pattern,
                                                 [sparsity] * len(group), self.options)
                for name, mask in result.masks.items():
                    tensors[f"{name}.mask"] = _pack(mask.cpu())
                    if self.updates_weights:
                        tensors[f"{name}.weight"] = views[name].weight.detach().cpu().clone()
        self.current[index] = sparsity
        self.computed += 1
        return tensors

    def variant(self, index: int, sparsity: float) -> dict[str, torch.Tensor]:
        """The stored tensors of block ``index`` at ``sparsity`` (computed and cached on a miss)."""
        on_grid = any(abs(sparsity - level) < 1e-9 for level in self.space.levels)
        key = self._key(index, sparsity)
        tensors = self.store.get(key) if on_grid else None
        if tensors is None:
            tensors = self._compute(index, sparsity)
            if on_grid:
                self.store.put(key, tensors)
        return tensors

    def precompute(self) -> None:
        """Compute every (block, level) variant that is not cached yet, within the disk budget."""
        todo = [(i, level) for i in range(len(self.views)) for level in self.space.levels
                if level > 0 and not self.store.path(self._key(i, level)).is_file()]
        for index, level in tqdm(todo, desc=f"{self.method.name} variants", unit="variant", disable=not self.progress):
            self.store.put(self._key(index, level), self._compute(index, level))
        self.restore_dense()

    def masks_of(self, index: int, sparsity: float) -> dict[str, torch.Tensor]:
        tensors = self.variant(index, sparsity)
        return {name: _unpack(tensors[f"{name}.mask"], tuple(view.weight.shape))
                for name, view in self.views[index].items()}

    # ---- assembling a model -----------------------------------------------------------------------------------
    def apply_block(self, index: int, sparsity: float) -> None:
        if self.current[index] is not None and abs(self.current[index] - sparsity) < 1e-12:
            return
        with torch.no_grad():
            if sparsity == 0:
                for name, view in self.views[index].items():
                    view.weight.copy_(self.dense[name])
            else:
                tensors = self.variant(index, sparsity)
                for name, view in self.views[index].items():
                    mask = _unpack(tensors[f"{name}.mask"], tuple(view.weight.shape))
                    source = tensors[f"{name}.weight"] if self.updates_weights else self.dense[name]
                    view.weight.copy_(torch.where(mask.to(view.weight.device), source.to(view.weight.device), 0))
        self.current[index] = sparsity

    def apply(self, sparsities: list[float]) -> None:
        """Make every block hold its variant at the given sparsity (0 = dense); unchanged blocks are not touched."""
        for index, sparsity in enumerate(sparsities):
            self.apply_block(index, sparsity)

    def apply_genome(self, genome) -> None:
        self.apply(self.space.sparsities(genome))

    def restore_dense(self) -> None:
        self.current = [None] * len(self.views)
        self.apply([0.0] * len(self.views))

    def commit(self, sparsities: list[float]) -> None:
        """Leave the model pruned at ``sparsities`` for good: weights in place and masks in ``handle.masks``."""
        self.apply(sparsities)
        for index, sparsity in enumerate(sparsities):
            if sparsity > 0:
                for name, mask in self.masks_of(index, sparsity).items():
                    apply_mask(self.views[index][name], mask)
                    self.handle.masks[name] = mask

    # ---- allocations computed from the statistics -------------------------------------------------------------
    def owl_allocation(self, target: float, m: float = 5.0, lam: float = 0.08) -> list[float]:
        """OWL's per-block sparsities from the same dense statistics (outlier ratios of Wanda scores)."""
        ratios = []
        for index, views in enumerate(self.views):
            _, stats = self.statistics(index)
            ratios.append(outlier_ratio([wanda_scores(self.dense[n], stats[n]) for n in views], m))
        return owl_sparsities(ratios, target, lam)

    def cache_report(self) -> dict:
        return {"directory": str(self.directory), "budget_bytes": self.store.budget,
                "used_bytes": self.store.used_bytes(), "evicted": self.store.evicted,
                "not_cached_over_budget": self.store.skipped, "computed_here": self.computed}
