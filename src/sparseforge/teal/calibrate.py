"""Calibrating activation sparsity: magnitude statistics per site, then an allocation for a model-wide target.

1. **Statistics.** The dense model runs over the calibration windows; at every site (:mod:`.sites`) a random
   sample of the input's magnitudes is kept (at most ``SAMPLE_PER_SITE`` values, drawn evenly from every call) and
   reduced to quantiles at :data:`~.thresholds.GRID`. A threshold for sparsity s is then the s-quantile.
2. **Allocation** of the model-wide target (sparsity weighted by the weights each site reads, the share of weight
   bytes a column-skipping kernel would not read):

   * ``uniform``: every site of every block at the target;
   * ``searched``: one level per block found by the project's EvoPress search (:mod:`.search`), each block
     split between its sites by its greedy walk;
   * ``greedy`` (TEAL's block-wise greedy): every block at the target, split between its sites by a greedy walk
     on the block's dense calibration input: from all sites dense, repeatedly raise by ``step`` the site whose
     raise costs the least increase of the block output's squared error per unit of block sparsity gained, until
     the block reaches the target. TEAL raises the site with the least error; per unit gained is our choice, since
     the FFN's sites read three times the weights of an attention site and a raise there buys more. Each block
     walks on its own dense input (as TEAL), so blocks are independent and the walk's cost is linear in depth.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..calibration.data import calibration_data
from ..errors import ActivationSparsityError
from ..models.fingerprint import model_fingerprint
from ..models.handle import LoadedModel
from .allocation import allocation_from_paths, block_sparsity
from .runtime import ActivationSparsity, install_thresholds
from .search import search_levels, searched_allocation
from .sites import model_sites
from .thresholds import ALLOCATIONS, GRID, ActivationThresholds, check_target, threshold_at

SAMPLE_PER_SITE = 1 << 18
MIN_TOKENS = 256  # below this a site's quantile grid rests on too few values to place 1%-steps: refused
MAX_SITE_SPARSITY = 0.95


@torch.no_grad()
def site_statistics(handle: LoadedModel, windows: torch.Tensor, batch_size: int = 4, seed: int = 0,
                    progress: bool = True) -> ActivationThresholds:
    """Magnitude quantiles of every site on ``windows`` (dense model), as thresholds with nothing zeroed yet."""
    if windows.numel() < MIN_TOKENS:
        raise ActivationSparsityError(f"calibration text of {windows.numel()} tokens is too short for activation "
                                      f"thresholds: at least {MIN_TOKENS} are needed")
    adapter = handle.adapter
    sites = model_sites(adapter)
    batches = (len(windows) + batch_size - 1) // batch_size
    per_call = max(SAMPLE_PER_SITE // batches, 1)
    generator = torch.Generator().manual_seed(seed)
    samples = [{name: [] for name in block} for block in sites]

    def record(block: int, name: str):
        def hook(module, args):
            values = args[0].detach().abs().flatten().float()
            pick = torch.randint(values.numel(), (min(per_call, values.numel()),), generator=generator)
            samples[block][name].append(values[pick])
        return hook

    hooks = [site.linears[0].module.register_forward_pre_hook(record(b, name))
             for b, block in enumerate(sites) for name, site in block.items()]
    device = next(handle.model.parameters()).device
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="activation statistics", disable=not progress):
            handle.model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    levels = torch.tensor(GRID, dtype=torch.float64)
    quantiles = []
    for block in samples:
        quantiles.append({})
        for name, chunks in block.items():
            values = torch.sort(torch.cat(chunks).double()).values
            index = (levels * (values.numel() - 1)).round().long()
            quantiles[-1][name] = [float(v) for v in values[index]]
    weights = [{name: site.weights for name, site in block.items()} for block in sites]
    return ActivationThresholds(target=0.0, sparsity=[dict.fromkeys(block, 0.0) for block in sites],
                                thresholds=[dict.fromkeys(block, 0.0) for block in sites], quantiles=quantiles,
                                weights=weights, model=model_fingerprint(adapter),
                                calibration={"windows": int(len(windows)), "tokens": int(windows.numel())})


@torch.no_grad()
def greedy_paths(handle: LoadedModel, statistics: ActivationThresholds, windows: torch.Tensor, up_to: float,
                 step: float = 0.05, progress: bool = True) -> list[list[dict[str, float]]]:
    """Per block, the greedy walk's allocations from dense to at least ``up_to`` block sparsity (each entry one
    step further); :func:`allocation_from_paths` picks a target's point. One walk serves every target below
    ``up_to``."""
    adapter = handle.adapter
    hidden, arguments = adapter.capture_inputs_per_block(windows.to(next(handle.model.parameters()).device))
    working = statistics.model_copy(deep=True)  # block by block, the trial's thresholds; all others stay zero
    attachment = ActivationSparsity(handle, working, count=False)
    paths = []
    try:
        for block in tqdm(range(adapter.num_blocks), desc="greedy allocation", disable=not progress):
            weights = statistics.weights[block]
            dense = adapter.run_block(block, hidden, arguments[block])
            current = dict.fromkeys(weights, 0.0)
            path, error = [dict(current)], 0.0
            while block_sparsity(current, weights) < up_to - 1e-9:
                best = None
                for site in weights:
                    if current[site] + step > MAX_SITE_SPARSITY + 1e-9:
                        continue
                    trial = {**current, site: round(current[site] + step, 6)}
                    working.thresholds[block] = {s: threshold_at(statistics.quantiles[block][s], v)
                                                 for s, v in trial.items()}
                    trial_error = float((adapter.run_block(block, hidden, arguments[block]) - dense).pow(2).mean())
                    gained = block_sparsity(trial, weights) - block_sparsity(current, weights)
                    cost = (trial_error - error) / gained
                    if best is None or cost < best[0]:
                        best = (cost, site, trial_error)
                if best is None:
                    break  # every site at the ceiling
                current[best[1]] = round(current[best[1]] + step, 6)
                error = best[2]
                path.append(dict(current))
            working.thresholds[block] = dict.fromkeys(weights, 0.0)
            paths.append(path)
            hidden = dense  # the next block walks on its dense input
    finally:
        attachment.remove()
    return paths


def calibrate_activation_sparsity(handle: LoadedModel, target: float, allocation: str = "greedy",
                                  calibration="default", nsamples: int = 16, seqlen: int = 512, seed: int = 0,
                                  greedy_windows: int = 4, step: float = 0.05, generations: int = 20,
                                  progress: bool = True) -> ActivationSparsity:
    """Calibrate thresholds for ``target`` model-wide activation sparsity and install them on ``handle``.

    ``greedy_windows`` of the calibration windows feed the greedy walk (each step runs the block on them);
    ``step`` is its increment of one site's sparsity; ``generations``: the search's (``searched`` only), on the
    first two of those windows."""
    check_target(target)
    if allocation not in ALLOCATIONS:
        raise ActivationSparsityError(f"unknown allocation '{allocation}'; available: {', '.join(ALLOCATIONS)}")
    if not 0 < step <= 0.5:
        raise ActivationSparsityError(f"greedy step {step:g} is outside (0, 0.5]")
    started = time.perf_counter()
    handle.detach(ActivationSparsity.kind)
    windows = calibration_data(handle, calibration, nsamples, seqlen, seed)
    statistics = site_statistics(handle, windows, seed=seed, progress=progress)
    if allocation == "uniform" or target == 0:
        thresholds = statistics.uniform(target)
    elif allocation == "greedy":
        paths = greedy_paths(handle, statistics, windows[:greedy_windows], target, step, progress)
        thresholds = statistics.with_allocation(allocation_from_paths(paths, statistics.weights, target),
                                                "greedy", target)
    else:
        paths = greedy_paths(handle, statistics, windows[:greedy_windows], search_levels(target)[-1], step, progress)
        chosen, history = searched_allocation(handle, statistics, paths, windows[:2], target, generations,
                                              seed=seed, progress=progress)
        thresholds = statistics.with_allocation(chosen, "searched", target)
        thresholds.calibration["search"] = history
    thresholds.calibration.update(seed=seed, seqlen=seqlen, step=step, greedy_windows=greedy_windows,
                                  seconds=round(time.perf_counter() - started, 1))
    attachment = install_thresholds(handle, thresholds)
    attachment.counter.reset()
    with torch.no_grad():  # what the thresholds realise on (part of) the calibration text itself
        handle.model(input_ids=windows[:greedy_windows].to(next(handle.model.parameters()).device), use_cache=False)
    realised = attachment.summary()
    attachment.counter.reset()
    handle.history.append({"stage": "activation_sparsity", "method": allocation, "target": target,
                           "allocated": thresholds.overall(), "sparsity": thresholds.sparsity,
                           "realised": realised, "seconds": thresholds.calibration["seconds"]})
    return attachment
