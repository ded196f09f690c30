"""One-shot pruning, the public entry point: method x pattern x allocation (+ optional refinement).

Data-free pruning (magnitude, uniform, no refinement) scores every linear directly. Everything else goes through
the layer-sequential calibration pipeline (:mod:`.sequential`), with calibration windows drawn from a corpus (or
given), optional per-block checkpoints and resume. All arguments are checked before any weight changes, so a bad
request leaves the model untouched.
"""

from __future__ import annotations

import os

import torch

from ..calibration.checkpoint import Checkpoint
from ..calibration.data import calibration_data
from ..errors import PatternError
from ..export.integrity import digest
from ..memory import PeakMemory, check_fits
from ..models.handle import LoadedModel
from ..models.loading import resolve_device
from ..sparsity.allocation import get_allocation
from ..sparsity.patterns import NM, Pattern, parse_pattern, resolve_sparsity
from ..data.windows import CALIBRATION_WINDOWS
from . import hooks
from .methods import Method, get_method
from .sequential import SequentialPlan, prune_data_free, prune_sequential
from .admm import ADMMConfig
from .block_sparsity import EXPLICIT, resolve_block_sparsity
from .sparsegpt import SparseGPTConfig

ORDERS = ("sublayer", "block")
DEFAULT_SPARSITY = 0.5  # for unstructured patterns when none is given; N:M patterns fix their own
REPAIR = "reconstruction"  # the repair hook behind ``reconstruct=`` (registered by the retrain package)


def _plan(method: Method, pattern: Pattern, target: float, allocation: str, refine: str | None,
          owl, dsnot, sparsegpt, admm, batch_size: int, order: str, reconstruct) -> SequentialPlan:
    """Resolve the hooks by name and validate every option set, including those of hooks not asked for (a
    typo in ``dsnot`` options is an error even without ``refine='dsnot'``)."""
    get_allocation(allocation)
    allocator = hooks.allocator(allocation)
    if allocator is not None and isinstance(pattern, NM):
        raise PatternError(f"{allocation} allocation varies sparsity per block; pattern {pattern.name} fixes it")
    if order not in ORDERS:
        raise PatternError(f"unknown calibration order '{order}'; available: {', '.join(ORDERS)}")
    if batch_size < 1:
        raise PatternError(f"batch_size must be at least 1, got {batch_size}")
    owl, dsnot, sparsegpt, admm = method_options(owl, dsnot, sparsegpt, admm)
    refinement = hooks.refinement(refine) if refine is not None else None
    repair = hooks.repair(REPAIR) if reconstruct is not None else None
    solver_options = {"sparsegpt": sparsegpt, "admm": admm}
    return SequentialPlan(method, pattern, target, allocation, allocator, owl if allocator else None,
                          refinement, dsnot if refinement else None,
                          vars(solver_options[method.options]) if method.options else {}, batch_size, order,
                          repair, repair.options(reconstruct) if repair else None)


def method_options(owl, dsnot, sparsegpt, admm=None) -> tuple:
    """Validated option objects from dicts (recipes) or option objects (Python API)."""
    return (hooks.allocator("owl").options(owl), hooks.refinement("dsnot").options(dsnot),
            hooks.dataclass_options(SparseGPTConfig, sparsegpt, "sparsegpt"),
            hooks.dataclass_options(ADMMConfig, admm, "admm").check("admm"))


def check_prune_request(handle: LoadedModel, method: str = "magnitude", sparsity: float | None = None,
                        pattern: str | Pattern = "unstructured", per_row: bool | None = None,
                        allocation: str = "uniform", refine: str | None = None, owl=None, dsnot=None, sparsegpt=None,
                        batch_size: int = 8, order: str = "sublayer",
                        reconstruct=None, admm=None, block_sparsity=None) -> tuple[SequentialPlan, bool]:
    """Everything about a pruning request that can be refused without computing: method, pattern against every
    layer's width, sparsity, per-block sparsities, options. Returns the plan and whether it needs calibration
    data."""
    chosen = get_method(method)
    pat = parse_pattern(pattern, chosen.default_per_row if per_row is None else per_row) \
        if isinstance(pattern, str) else pattern
    per_block = None
    if block_sparsity is not None:
        if isinstance(pat, NM):
            raise PatternError(f"pattern {pat.name} fixes the sparsity of every block; per-block sparsities need "
                               "an unstructured pattern")
        if allocation != "uniform":
            raise PatternError(f"give either an allocation ({allocation}) or per-block sparsities, not both")
        per_block = resolve_block_sparsity(block_sparsity, handle.adapter)
        sparsity = sum(per_block) / len(per_block)
    if sparsity is None and pat.fixed_sparsity() is None:
        sparsity = DEFAULT_SPARSITY
    target = resolve_sparsity(pat, sparsity)
    needs_calibration = (chosen.needs_calibration or get_allocation(allocation).needs_calibration
                         or refine is not None or reconstruct is not None)
    for view in handle.adapter.linears():
        pat.validate((view.out_features, view.in_features), view.name)
    plan = _plan(chosen, pat, target, allocation, refine, owl, dsnot, sparsegpt, admm, batch_size, order,
                 reconstruct)
    if per_block is not None:
        plan.allocation, plan.block_sparsity = EXPLICIT, per_block
    return plan, needs_calibration


def check_calibration_memory(handle: LoadedModel, nsamples: int, seqlen: int) -> None:
    """The block inputs of every calibration window stay resident (twice while a block runs, more with
    reconstruction's targets): refuse a count that cannot fit before allocating it."""
    element = torch.empty((), dtype=handle.dtype).element_size()
    hidden = handle.model.config.hidden_size if hasattr(handle.model.config, "hidden_size") else \
        handle.adapter.head_geometry().num_heads * handle.adapter.head_geometry().head_dim
    check_fits(3 * nsamples * seqlen * hidden * element, f"calibration with {nsamples} windows of {seqlen} tokens")


def prune(
    handle: LoadedModel,
    method: str = "magnitude",
    sparsity: float | None = None,
    pattern: str | Pattern = "unstructured",
    per_row: bool | None = None,
    allocation: str = "uniform",
    refine: str | None = None,
    calibration: str | torch.Tensor = "default",
    nsamples: int = CALIBRATION_WINDOWS,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    order: str = "sublayer",
    device: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    owl=None,
    dsnot=None,
    sparsegpt: dict | SparseGPTConfig | None = None,
    admm: dict | ADMMConfig | None = None,
    block_sparsity: list[float] | str | None = None,
    reconstruct=None,
    progress: bool = True,
    after_block=None,
) -> LoadedModel:
    """Prune every decoder linear of ``handle`` in place and record its mask in ``handle.masks``.

    ``method``: magnitude, wanda, sparsegpt, admm (a scorer's mask + ADMM weight update), admm-gradual or alps
    (options ``sparsegpt`` / ``admm``: dicts or :class:`~sparseforge.prune.admm.ADMMConfig`). ``sparsity``: default 0.5 for unstructured. ``pattern``: 'unstructured' or N:M (N kept of M). ``per_row``:
    compare weights within each output row (default: the method's own choice, per row for Wanda).
    ``allocation``: uniform or owl (options ``owl``: a dict or :class:`~sparseforge.prune.owl.OWLConfig`).
    ``block_sparsity``: explicit per-block sparsities instead (a list, a JSON file, or a search run directory;
    :mod:`.block_sparsity`), for unstructured patterns; ``sparsity`` is then their mean.
    ``refine``: None or 'dsnot' (options ``dsnot``: a dict or :class:`~sparseforge.prune.dsnot.DSnoTConfig`). Calibration: ``nsamples`` random windows of
    ``seqlen`` tokens of ``calibration`` (a corpus spec or a [n, seqlen] token tensor), drawn with ``seed``.
    ``order``: 'sublayer' (one forward per block; each linear is calibrated on the outputs of the already pruned
    linears before it) or 'block' (the reference codes' two forwards per block, all linears calibrated on the
    dense block: slower, and the least memory). Windows go through a block ``batch_size`` at a time.
    ``device``: where each block is computed (default: where the model is). ``checkpoint_dir``: checkpoint after
    every block there and resume from it. ``reconstruct``: after each block is pruned, train its norms/biases/
    sparse LoRA to reproduce the dense block's outputs (:class:`~sparseforge.retrain.reconstruct.ReconstructConfig`:
    params, lora, steps per block, lr). Embeddings, LM head, norms and biases are not pruned. A report of the
    run is appended to ``handle.history``.
    """
    plan, needs_calibration = check_prune_request(handle, method, sparsity, pattern, per_row, allocation, refine,
                                                  owl, dsnot, sparsegpt, batch_size, order, reconstruct, admm,
                                                  block_sparsity)
    chosen, pat, target = plan.method, plan.pattern, plan.sparsity
    if needs_calibration and not torch.is_tensor(calibration):
        check_calibration_memory(handle, nsamples, seqlen)
    if not needs_calibration:
        prune_data_free(handle, plan, progress)
        handle.history.append({"stage": "prune", "method": chosen.name, "pattern": pat.name,
                               "target_sparsity": target, "allocation": plan.allocation,
                               **({"block_sparsity": plan.block_sparsity} if plan.block_sparsity else {})})
        return handle
    windows = calibration_data(handle, calibration, nsamples, seqlen, seed)
    work_device = resolve_device(device) if device is not None else None
    settings = {"model": handle.source, "model_type": handle.model_type, "dtype": str(handle.dtype),
                "model_digest": digest([v.weight for v in handle.adapter.block_linears(0).values()]),
                "prior_masks": sorted(handle.masks), "calibration_digest": digest([windows]),
                "calibration_shape": list(windows.shape), **plan.settings()}
    with PeakMemory(work_device) as peak:
        report = prune_sequential(handle, windows, plan, Checkpoint(checkpoint_dir, settings), work_device, progress,
                                  after_block)
    where = "gpu" if peak.cuda else "rss"
    report["memory"].update({f"peak_{where}_mib": round(peak.peak_mb, 1), f"start_{where}_mib": round(peak.start_mb, 1)})
    handle.history.append({"stage": "prune", **report})
    return handle
