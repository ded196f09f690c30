"""Searching per-block sparsity: settings, the run, the front, and committing a chosen point to the model.

``run_search`` builds (or reuses) the variant bank, measures candidates serially or on Ray, runs one algorithm
(``nsga2``: the whole network; ``evopress``: one allocation at the target; ``decompose``: groups of blocks searched
on a local proxy and combined by global impairment) and returns the front with the uniform allocations and
OWL's measured on the same axes. ``search`` does that and prunes the model at the point picked, like every other
stage. Evaluations are memoised in the cache directory per search setting, so rerunning the same search (to pick
another point, or after an interruption) replays instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..assets import cache_dir as default_cache_root
from ..data.sources import load_corpus
from ..data.windows import calibration_windows, tokenize_corpus
from ..errors import SearchError
from ..models.fingerprint import model_fingerprint
from ..models.handle import LoadedModel
from ..prune.methods import get_method
from ..calibration.data import calibration_data
from ..data.windows import CALIBRATION_WINDOWS
from .bank import level_pattern, unit_sizes
from .decompose import decompose
from .evopress import evopress
from .front import non_dominated, pick_point
from .nsga import nsga2_front
from .quality import QualityMeter
from .runner import Evaluations, MeterSpec, RayBackend, Request, SerialBackend, probe_ray
from .space import SearchSpace, parse_levels

ALGORITHMS = ("nsga2", "evopress", "decompose")


@dataclass
class SearchConfig:
    algorithm: str = "nsga2"
    method: str = "wanda"
    pattern: str = "unstructured"
    per_row: bool | None = None
    levels: str | list[float] = "0.3:0.9:0.05"
    target: float | None = None  # evopress: the budget; the others: which point ``pick`` defaults to
    windows: int = 8  # calibration windows scored by the KL objective (the full fidelity)
    seqlen: int = 128
    batch_size: int = 4
    population: int = 16  # nsga2, and each group's NSGA-II in decompose
    generations: int = 12
    groups: int = 5  # decompose
    group_generations: int = 12
    gpir_points: int = 10  # decompose: front points per group measured in the full model
    offspring: int = 16  # evopress
    stages: list[list[int]] = field(default_factory=lambda: [[2, 4], [8, 1]])  # evopress: [windows, survivors]
    workers: int = 0  # 0: serial in this process; N: N Ray workers
    ray_address: str | None = None
    ray_timeout: float = 10.0
    cache_dir: str | None = None
    cache_budget_gb: float = 4.0
    owl_m: float = 5.0
    owl_lam: float = 0.08
    seed: int = 0
    reuse: bool = True  # replay the memo of an identical earlier (or interrupted) search instead of re-measuring

    def check(self, handle: LoadedModel | None = None) -> SearchSpace | None:
        """Refuse bad settings before any data is read or any weight computed."""
        if self.algorithm not in ALGORITHMS:
            raise SearchError(f"unknown search algorithm '{self.algorithm}'; available: {', '.join(ALGORITHMS)}")
        method = get_method(self.method)
        levels = parse_levels(self.levels)
        for level in levels:
            if level > 0:
                level_pattern(self.pattern, self.per_row_for(method), level)
        if self.target is not None and not 0 <= self.target < 1:
            raise SearchError(f"target sparsity {self.target:g} is outside [0, 1)")
        if self.algorithm == "evopress" and self.target is None:
            raise SearchError("evopress searches at a fixed budget: give a target sparsity")
        for name in ("windows", "seqlen", "batch_size", "population", "generations", "groups", "group_generations",
                     "gpir_points", "offspring"):
            if getattr(self, name) < 1:
                raise SearchError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise SearchError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.population < 4:
            raise SearchError(f"population must be at least 4 for NSGA-II, got {self.population}")
        if not self.stages or any(len(s) != 2 or s[0] < 1 or s[1] < 1 for s in self.stages) or self.stages[-1][1] != 1:
            raise SearchError(f"stages must be [windows, survivors] pairs ending with 1 survivor, got {self.stages}")
        if self.algorithm == "evopress" and max(s[0] for s in self.stages) > self.windows:
            raise SearchError(f"an EvoPress stage uses more windows ({max(s[0] for s in self.stages)}) than "
                              f"windows={self.windows}")
        if self.workers < 0:
            raise SearchError(f"workers must be 0 (serial) or more, got {self.workers}")
        if self.cache_budget_gb <= 0:
            raise SearchError(f"the cache budget must be positive, got {self.cache_budget_gb:g} GB")
        if self.ray_address and self.workers == 0:
            raise SearchError("--ray-address needs --workers N (how many workers to start on the cluster)")
        if handle is None:
            return None
        space = SearchSpace(levels, unit_sizes(handle))
        if self.target is not None:
            space.check_target(self.target)
        return space

    def per_row_for(self, method) -> bool:
        return method.default_per_row if self.per_row is None else self.per_row

    def digest(self) -> str:
        """What determines the evaluations of one search (not where or how they run)."""
        relevant = {k: v for k, v in asdict(self).items()
                    if k not in ("workers", "ray_address", "ray_timeout", "cache_dir", "cache_budget_gb", "reuse")}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def check_unpruned(handle: LoadedModel) -> None:
    """The bank prunes from the weights it is given: a pruned model would be pruned twice, its masks overwritten."""
    if handle.masks:
        raise SearchError(f"{handle.source} is already pruned; the sparsity search starts from a dense model (put "
                          "the search stage before any prune stage)")


def _fidelities(config: SearchConfig) -> dict[str, int]:
    sizes = {config.windows} | ({s[0] for s in config.stages} if config.algorithm == "evopress" else set())
    return {f"w{n}": n for n in sorted(sizes)}


def prepare(handle: LoadedModel, config: SearchConfig, calibration: str | torch.Tensor = "default",
            nsamples: int = CALIBRATION_WINDOWS, seqlen: int = 512, seed: int = 0, log: Callable[[str], None] = print,
            progress: bool = True) -> tuple[SearchSpace, MeterSpec, QualityMeter]:
    """Check the settings, draw the windows, and build (or reuse) the variant bank and this process's meter."""
    check_unpruned(handle)
    space = config.check(handle)
    if config.ray_address:
        probe_ray(config.ray_address, config.ray_timeout)  # before minutes of calibration, not after
    method = get_method(config.method)
    stats_windows = calibration_data(handle, calibration, nsamples, seqlen, seed)
    if torch.is_tensor(calibration):
        pool = calibration[:config.windows, :config.seqlen]
    else:
        corpus = load_corpus(calibration, "calibration")
        pool = calibration_windows(tokenize_corpus(handle.require_tokenizer("search"), corpus), config.seqlen,
                                   config.windows, seed + 1,  # scored windows differ from the statistics' windows
                                   handle.window_bos("search"))
    fidelities = {name: pool[:count] for name, count in _fidelities(config).items()}
    spec = MeterSpec(handle, space, method.name, config.pattern, config.per_row_for(method), {}, stats_windows,
                     fidelities, pool, config.batch_size,
                     str(Path(config.cache_dir) if config.cache_dir else default_cache_root() / "search"),
                     int(config.cache_budget_gb * 2**30))
    meter = spec.build(writable=True, log=log, progress=progress)
    meter.bank.precompute()
    return space, spec, meter


def run_search(handle: LoadedModel, config: SearchConfig, calibration: str | torch.Tensor = "default",
               nsamples: int = CALIBRATION_WINDOWS, seqlen: int = 512, seed: int = 0, log: Callable[[str], None] = print,
               progress: bool = True) -> tuple[dict, MeterSpec, QualityMeter]:
    """Search; returns (result, spec, meter) where the meter's bank can commit any allocation to ``handle``."""
    started = time.perf_counter()
    space, spec, meter = prepare(handle, config, calibration, nsamples, seqlen, seed, log, progress)
    bank, fidelities, stats_windows = meter.bank, spec.fidelities, spec.calibration
    memo_dir = bank.directory / "evaluations"
    memo_dir.mkdir(exist_ok=True)
    backend = RayBackend(spec, config.workers, config.ray_address, config.ray_timeout) if config.workers \
        else SerialBackend(meter)
    memo = memo_dir / f"{config.algorithm}-{config.digest()}.jsonl"
    if not config.reuse:
        memo.unlink(missing_ok=True)
    evaluations = Evaluations(backend, memo)
    tokens = {name: int(w.shape[0] * (w.shape[1] - 1)) for name, w in fidelities.items()}
    full = f"w{config.windows}"

    def kl(fidelity: str, genomes) -> list[float]:
        return evaluations([Request("kl", fidelity, tuple(space.sparsities(g))) for g in genomes], tokens)

    def point(genome, value: float) -> dict:
        sparsities = space.sparsities(genome)
        average = space.average_sparsity(genome)
        return {"sparsities": sparsities, "average_sparsity": average, "density": 1 - average, "kl": value}

    try:
        details: dict = {}
        if config.algorithm == "nsga2":
            front = nsga2_front(space.num_units, space.num_levels, lambda gs: kl(full, gs),
                                lambda g: 1 - space.average_sparsity(g), config.population, config.generations,
                                config.seed, space.uniform_genomes(), progress)
            points = [point(p["genome"], p["quality"]) for p in front]
        elif config.algorithm == "evopress":
            stages = [(f"w{n}", keep) for n, keep in config.stages]
            found = evopress(space, config.target, kl, stages, config.offspring, config.generations, config.seed,
                             progress)
            details["history"] = found["history"]
            points = [point(found["genome"], kl(full, [found["genome"]])[0])]
        else:
            def local(first: int, genomes) -> list[float]:
                return evaluations([Request("local", str(first), tuple(space.sparsities(g))) for g in genomes])

            lo, hi = space.levels[0], space.levels[-1]
            steps = int(round((hi - lo) / 0.025))
            targets = [round(lo + i * (hi - lo) / steps, 6) for i in range(steps + 1)] if steps else [lo]
            if config.target is not None and config.target not in targets:
                targets.append(config.target)
            found = decompose(space, config.groups, local, lambda gs: kl(full, gs), config.population,
                              config.group_generations, config.gpir_points, sorted(targets), config.seed, progress)
            details["groups"] = found["groups"]
            combined = found["combined"]
            points = non_dominated([point(g, v) for g, v in zip(combined, kl(full, combined))])
        search_counts = evaluations.report()
        uniform = [point(g, v) for g, v in zip(space.uniform_genomes(), kl(full, space.uniform_genomes()))]
        owl = None
        if config.target is not None:
            owl_sparsities = bank.owl_allocation(config.target, config.owl_m, config.owl_lam)
            value = evaluations([Request("kl", full, tuple(owl_sparsities))], tokens)[0]
            average = sum(s * n for s, n in zip(owl_sparsities, space.unit_sizes)) / sum(space.unit_sizes)
            owl = {"sparsities": owl_sparsities, "average_sparsity": average, "density": 1 - average, "kl": value,
                   "m": config.owl_m, "lam": config.owl_lam}
    finally:
        backend.close()
        bank.restore_dense()  # the model leaves the search as it came; ``search`` commits the point picked
    result = {
        "algorithm": config.algorithm,
        "settings": {k: v for k, v in asdict(config).items() if k not in ("cache_dir",)} | {"levels": list(space.levels)},
        "objective": {"quality": "KL(dense || pruned) of next-token distributions, nats per position",
                      "size": "average sparsity of the prunable linears (parameter-weighted)",
                      "windows": config.windows, "seqlen": config.seqlen, "tokens": tokens[full]},
        "calibration": {"windows": int(stats_windows.shape[0]), "seqlen": int(stats_windows.shape[1]), "seed": seed},
        "front": sorted(points, key=lambda p: p["average_sparsity"]),
        "uniform": uniform,
        "owl": owl,
        "evaluations": search_counts,
        "workers": config.workers,
        "cache": bank.cache_report(),
        "seconds": round(time.perf_counter() - started, 1),
        **details,
    }
    return result, spec, meter


def search(handle: LoadedModel, config: SearchConfig | dict | None = None, pick: float | None = None,
           calibration: str | torch.Tensor = "default", nsamples: int = CALIBRATION_WINDOWS, seqlen: int = 512, seed: int = 0,
           log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Search per-block sparsity for ``handle`` and prune it at the front point picked (``pick``, default: the
    target). Returns the search result (also appended to ``handle.history``)."""
    config = config if isinstance(config, SearchConfig) else SearchConfig(**(config or {}))
    chosen_target = pick if pick is not None else config.target
    if chosen_target is None:
        raise SearchError("say which point of the front to keep: give pick (an average sparsity) or a target")
    config.check(handle).check_target(chosen_target)  # a pick outside the levels is refused before the search
    fingerprint = model_fingerprint(handle.adapter)  # of the searched model, before it is pruned
    result, _, meter = run_search(handle, config, calibration, nsamples, seqlen, seed, log, progress)
    result["model"] = fingerprint  # prune(block_sparsity=<this run>) refuses to apply the allocation elsewhere
    picked = pick_point(result["front"], chosen_target)
    meter.bank.commit(picked["sparsities"])
    result["picked"] = {"target": chosen_target, **picked}
    handle.history.append({"stage": "search", **result})
    return result
