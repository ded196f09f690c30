"""The layer-sequential calibration pipeline: prune a model one decoder block at a time.

1. Capture the inputs of block 0 for the calibration windows (embeddings only; the forward stops at block 0).
   An allocator hook (OWL) may first run one dense pass over all blocks to set per-block sparsities.
2. For each block, in ``block`` order (the reference codes'): run it densely on its inputs with hooks that gather
   the statistics the method needs; prune its linears, one shared-input group at a time, optionally refining the
   masks with a refinement hook (DSnoT); run the pruned block to get the inputs of the next block. In ``sublayer`` order
   (:mod:`.sublayer`) one pass does both: each linear is pruned when every batch has reached it. Either way each
   block is calibrated on what the pruned model upstream really produces.
   A repair hook (layer-wise reconstruction) may then train the block towards the dense block's outputs.
3. Checkpoint the block's weights and masks and the next block's inputs.

Only one block's inputs, outputs and statistics are resident, and only the current block moves to the working
device, so memory grows with the width of a block, not with depth. Windows go through a block in batches of
``batch_size``; the captured keyword arguments (position embeddings, attention masks) are kept per batch size.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..calibration.block_inputs import BlockInputs, BlockStore
from ..calibration.checkpoint import Checkpoint
from ..models.handle import LoadedModel
from ..sparsity.masks import apply_mask
from ..sparsity.patterns import Pattern
from .hooks import Allocator, Refinement, Repair
from .methods import Method
from .sublayer import run_block_pruning_sublayers


def _plain(options) -> Any:
    return asdict(options) if is_dataclass(options) else options


@dataclass
class SequentialPlan:
    """A pruning request, checked: the method and pattern, and the hooks (:mod:`.hooks`) with their options."""

    method: Method
    pattern: Pattern
    sparsity: float
    allocation: str = "uniform"
    allocator: Allocator | None = None  # None: every block gets ``sparsity``
    allocation_options: Any = None
    refinement: Refinement | None = None
    refine_options: Any = None
    method_options: dict = field(default_factory=dict)
    batch_size: int = 8
    order: str = "sublayer"
    repair: Repair | None = None
    repair_options: Any = None
    block_sparsity: list[float] | None = None  # given per block (a searched allocation); else the allocator's

    @property
    def refine(self) -> str | None:
        return self.refinement.name if self.refinement else None

    def settings(self) -> dict:
        return {"method": self.method.name, "pattern": self.pattern.name,
                "per_row": getattr(self.pattern, "per_row", None), "sparsity": self.sparsity,
                "allocation": self.allocation,
                "allocation_options": _plain(self.allocation_options) if self.allocator else None,
                "refine": self.refine, "refine_options": _plain(self.refine_options) if self.refinement else None,
                "method_options": self.method_options, "batch_size": self.batch_size, "order": self.order,
                "repair": self.repair.name if self.repair else None,
                "repair_options": _plain(self.repair_options) if self.repair else None,
                "block_sparsity": self.block_sparsity}

    @property
    def needs(self) -> frozenset[str]:
        return self.method.needs | (self.refinement.needs if self.refinement else frozenset())


class _ResidentPeaks:
    """The largest bytes of weights and of calibration activations resident while a block was pruned."""

    def __init__(self):
        self.weights = self.activations = 0

    def observe(self, weights: int, activations: int) -> None:
        self.weights, self.activations = max(self.weights, weights), max(self.activations, activations)

    def report(self) -> dict:
        return {"weights_resident_peak_mib": round(self.weights / 2**20, 1),
                "activations_peak_mib": round(self.activations / 2**20, 1)}


def _block_mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error of a block's outputs against the dense targets, over all windows (in fp32)."""
    return torch.nn.functional.mse_loss(outputs.float(), targets.float()).item()


class _BlockPruner:
    """Prunes (and refines) the linears of one block, a shared-input group at a time, recording masks and events."""

    def __init__(self, handle: LoadedModel, plan: SequentialPlan, index: int, sparsity: float):
        self.handle, self.plan, self.sparsity = handle, plan, sparsity
        adapter = handle.adapter
        self.views = {v.name: v for v in adapter.block_linears(index).values()}
        self.refined = plan.refinement.targets(adapter, index, plan.refine_options) if plan.refinement else set()
        self.events: list[str] = []
        self.swaps = 0

    def prune(self, names: list[str], stats) -> None:
        plan = self.plan
        dense = {n: self.views[n].weight.detach().clone() for n in names if n in self.refined}
        result = plan.method.prune_group([self.views[n] for n in names], stats, plan.pattern,
                                         [self.sparsity] * len(names), plan.method_options)
        self.events.extend(result.events)
        for name, mask in result.masks.items():
            view = self.views[name]
            if name in dense:
                weight, mask, count = plan.refinement.refine(dense[name], view.weight.detach(), mask, stats,
                                                             plan.pattern, plan.refine_options)
                self.swaps += count
                with torch.no_grad():
                    view.weight.copy_(weight.to(view.weight.dtype))
            mask = mask.cpu()
            if name in self.handle.masks:  # pruning again never revives weights pruned before
                mask &= self.handle.masks[name]
            apply_mask(view, mask.to(view.weight.device))
            self.handle.masks[name] = mask


def _shared_roles(adapter, index: int, owner: dict[str, str]) -> dict[str, list[str]]:
    """Which roles read the same input as which (e.g. q -> [k, v]), as observed in block ``index``."""
    role = {v.name: r for r, v in adapter.block_linears(index).items()}
    roles: dict[str, list[str]] = {}
    for name, first in owner.items():
        if name != first:
            roles.setdefault(role[first], []).append(role[name])
    return roles


def _hint(adapter, index: int, shared_roles: dict[str, list[str]]) -> dict[str, list[str]]:
    linears = adapter.block_linears(index)
    return {linears[r].name: [linears[o].name for o in others if o in linears]
            for r, others in shared_roles.items() if r in linears}


def prune_data_free(handle: LoadedModel, plan: SequentialPlan, progress: bool = True,
                    store: BlockStore | None = None, checkpoint: Checkpoint | None = None) -> None:
    """Uniform pruning by a method that needs no data: every linear directly, no forward pass at all.

    With a ``store`` and a ``checkpoint`` (streamed pruning) each block is loaded, pruned, checkpointed and let go,
    and a rerun resumes after the last finished block."""
    adapter = handle.adapter
    store = store or BlockStore()
    first = _intact_prefix(checkpoint, checkpoint.resume()["next_block"]) if checkpoint is not None else 0
    for index in range(first):
        store.restore(handle, index, checkpoint)
    for index in tqdm(range(first, adapter.num_blocks), desc=f"{plan.method.name} {plan.pattern.name}",
                      disable=not progress, unit="block"):
        sparsity = plan.block_sparsity[index] if plan.block_sparsity else plan.sparsity
        store.load(index)
        block = _BlockPruner(handle, plan, index, sparsity)
        for name in block.views:
            block.prune([name], None)
        if checkpoint is not None:
            checkpoint.save(index, store.finished(handle, index), None, **store.state())
        store.evict(index)


def _intact_prefix(checkpoint: Checkpoint, finished: int) -> int:
    """How many finished blocks can be restored: up to the first whose checkpoint file is damaged, said aloud."""
    if not checkpoint.enabled or not finished:
        return finished
    damaged = checkpoint.first_damaged(finished)
    if damaged is None:
        return finished
    print(f"› checkpoint of block {damaged} in {checkpoint.directory} is missing or corrupted (SHA-256 mismatch); "
          f"recomputing from block {damaged}", file=sys.stderr)
    return damaged


def prune_sequential(handle: LoadedModel, windows: torch.Tensor, plan: SequentialPlan, checkpoint: Checkpoint,
                     device: torch.device | None = None, progress: bool = True,
                     after_block=None, store: BlockStore | None = None) -> dict:
    """Prune every decoder block of ``handle`` with ``plan`` on calibration ``windows`` [n, seqlen]; returns a report.

    ``after_block(index)`` is called once a block is checkpointed (tests use it to simulate an interruption).
    ``store``: where blocks live between uses (default: all in memory; see :class:`BlockStore`).
    """
    adapter = handle.adapter
    device = device or adapter.embed_tokens().weight.device
    started = time.perf_counter()
    state = checkpoint.resume()
    blocks = BlockInputs(handle, windows, plan.batch_size, device, store)
    store = blocks.store
    first = _intact_prefix(checkpoint, state["next_block"])
    for index in range(first):  # replay finished blocks from the checkpoint
        store.restore(handle, index, checkpoint)
    if first == adapter.num_blocks:  # every block finished: nothing left to propagate
        hidden = blocks.hidden
    elif first and checkpoint.hidden_intact(first):
        hidden = checkpoint.hidden(first).to(device)
    else:  # block 0's inputs, or the inputs of the first block to recompute, rebuilt through the restored blocks
        hidden = blocks.hidden
        for index in range(first):
            blocks.on_device(index)
            hidden = blocks.run(index, hidden)
            blocks.release(index)
    blocks.hidden = None  # the pipeline owns the activations from here on, one block's worth at a time

    if plan.allocator is not None and "allocated" not in state:
        checkpoint.save_state(allocated=plan.allocator.allocate(blocks, hidden, plan.sparsity,
                                                                plan.allocation_options, progress))
    allocated = checkpoint.state.get("allocated") or {}
    block_sparsity = plan.block_sparsity or allocated.get("block_sparsity") or [plan.sparsity] * adapter.num_blocks
    # what the blocks before ``first`` contributed (marks[i]: the running totals once block i was finished)
    marks: list[dict] = list(checkpoint.state.get("marks", []))[:first]
    if first and len(marks) < first:  # a checkpoint from before marks were recorded: nothing was rolled back
        totals = checkpoint.state
        marks = [{"events": len(totals.get("events", [])), "swaps": totals.get("swaps", 0),
                  "repairs": len(totals.get("repairs", [])),
                  "shared_roles": totals.get("shared_roles", {})}] * first
    done = marks[-1] if marks else {"events": 0, "swaps": 0, "repairs": 0, "shared_roles": {}}
    events: list[str] = list(checkpoint.state.get("events", []))[:done["events"]]
    swaps = int(done["swaps"])
    shared_roles: dict[str, list[str]] = dict(done["shared_roles"])  # exact on resume
    repairs: list[dict] = list(checkpoint.state.get("repairs", []))[:done["repairs"]]
    memory, kwargs_bytes = _ResidentPeaks(), blocks.kwargs_bytes()
    bar = tqdm(range(first, adapter.num_blocks), desc=f"{plan.method.name} {plan.pattern.name}",
               disable=not progress, unit="block")
    for index in bar:
        blocks.on_device(index)
        block = _BlockPruner(handle, plan, index, block_sparsity[index])
        if plan.repair is not None:  # targets: the dense block on what the pruned model upstream produces
            inputs = hidden.clone()
            targets = blocks.run(index, hidden.clone())
        if not plan.needs:  # data-free method under a calibrated allocation: prune, then propagate
            for name in block.views:
                block.prune([name], None)
            blocks.run(index, hidden)
        elif plan.order == "sublayer":  # one pass: each linear is pruned the moment its (upstream-pruned) input arrives
            owner = run_block_pruning_sublayers(adapter, index, hidden, blocks.ranges, blocks.kwargs_of(index), plan.needs,
                                                device, block.prune, _hint(adapter, index, shared_roles))
            shared_roles = _shared_roles(adapter, index, owner)
        else:  # the reference's two passes: calibrate on the dense block, prune, then propagate
            collector = blocks.calibrate(index, hidden, plan.needs)
            for group in collector.groups():
                block.prune(group, collector.of(group[0]))
            del collector
            hidden = blocks.run(index, hidden)
        if plan.repair is not None:
            before = _block_mse(hidden, targets)  # hidden holds the pruned block's outputs here
            record = plan.repair.repair(handle, index, inputs, targets, blocks.ranges, blocks.kwargs_of(index),
                                        plan.repair_options)
            hidden = blocks.run(index, inputs)
            record.update(mse_before=before, mse_after=_block_mse(hidden, targets))
            repairs.append(record)
            bar.set_postfix(mse=f"{before:.3g}->{record['mse_after']:.3g}")
            del targets, inputs
        memory.observe(store.resident_weight_bytes(handle),  # reconstruction also holds the inputs and targets
                       hidden.nbytes * (3 if plan.repair is not None else 1) + kwargs_bytes)
        events.extend(block.events)
        swaps += block.swaps
        last = index == adapter.num_blocks - 1
        marks.append({"events": len(events), "swaps": swaps, "repairs": len(repairs),
                      "shared_roles": shared_roles})
        checkpoint.save(index, store.finished(handle, index), None if last else hidden, events=events, swaps=swaps,
                        shared_roles=shared_roles, repairs=repairs, marks=marks, **store.state())
        blocks.release(index)
        if after_block is not None:
            after_block(index)
    return {
        "method": plan.method.name,
        "pattern": plan.pattern.name,
        "target_sparsity": plan.sparsity,
        "allocation": plan.allocation,
        **allocated,
        "block_sparsity": block_sparsity,
        "refine": plan.refine,
        "refine_swaps": swaps if plan.refine else None,
        "events": events,
        "order": plan.order,
        "calibration": {"windows": windows.shape[0], "seqlen": windows.shape[1],
                        "batch_size": blocks.batch_size},
        "resumed_from_block": first or None,
        "memory": memory.report(),
        **({plan.repair.name: {"settings": _plain(plan.repair_options), "blocks": repairs,
                               "mse_before_sum": sum(r["mse_before"] for r in repairs),
                               "mse_after_sum": sum(r["mse_after"] for r in repairs)}} if plan.repair else {}),
        "seconds": round(time.perf_counter() - started, 3),
    }
