"""Sub-layer order in one forward pass per block, with the calibration windows in batches.

Every linear must be pruned on the statistics of *all* calibration windows before *any* window runs through it,
and its input depends on the linears before it, already pruned. Running the whole calibration set as one batch
does that but holds every activation of the block at once (a 64 x 512-token batch of a 135M model needs 750 MB
more). Here each batch runs its block forward in its own greenlet (a coroutine on the same thread, so torch keeps
both cores for each operation and the order of every floating-point sum is fixed): at a linear's forward pre-hook
a batch adds its input to the statistics and yields; once every batch has arrived, the linear is pruned and the
batches resume in order. Live memory is what the batches hold while they wait, not every temporary of a
full-batch forward.

Linears that read the same input tensor (q/k/v, gate/up) wait once: the first one gathers the statistics, the
others are pruned on the same, complete statistics when the first batch reaches them.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from greenlet import greenlet

from ..models.adapters import ModelAdapter
from ..calibration.statistics import InputStatistics


def run_block_pruning_sublayers(adapter: ModelAdapter, index: int, hidden: torch.Tensor,
                                batches: list[tuple[int, int]], kwargs: dict[int, dict], needs: frozenset[str],
                                device: torch.device, prune_group: Callable[[list[str], InputStatistics], None],
                                shared_hint: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Run block ``index`` over ``hidden`` (in place: each batch's output replaces its input), pruning each linear
    through ``prune_group(names, stats)`` just before the calibration windows pass through it.

    ``shared_hint`` maps a linear to the linears expected to share its input (learnt from the previous block):
    they are pruned together, in one stacked solve, and the hint is verified when they run. Returns which linear
    owns each linear's input statistics, to serve as the next block's hint.
    """
    views = {v.name: v for v in adapter.block_linears(index).values()}
    shared_hint = shared_hint or {}
    stats: dict[str, InputStatistics] = {}
    owner: dict[str, str] = {}
    done: set[str] = set()
    seen: dict[int, list[tuple[weakref.ref, str]]] = {}
    waiting: dict[int, str] = {}
    scheduler = greenlet.getcurrent()

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            batch = id(greenlet.getcurrent())
            shared = next((o for ref, o in seen.setdefault(batch, []) if ref() is x), None)
            if name in done:
                if owner[name] != name and shared != owner[name]:
                    raise RuntimeError(f"{name} was pruned with the statistics of {owner[name]}'s input, "
                                       "but it reads a different input")
                return
            if shared is not None:  # same input as a linear already pruned on complete statistics
                owner[name] = shared
                prune_group([name], stats[shared])
                done.add(name)
                return
            if name not in stats:
                stats[name] = InputStatistics(x.shape[-1], needs, device)
            stats[name].update(x.detach())
            seen[batch].append((weakref.ref(x), name))  # a dead reference never matches a new tensor
            waiting[batch] = name
            scheduler.switch()

        return hook

    def run_batch(start: int, stop: int) -> None:
        # no grad-mode context in here: grad mode is per thread, so greenlets entering and leaving their own
        # contexts in interleaved order would restore each other's state; the driver below holds one for all
        hidden[start:stop] = adapter.run_block(index, hidden[start:stop], kwargs[stop - start])
        seen.pop(id(greenlet.getcurrent()), None)

    handles = [view.module.register_forward_pre_hook(hook_for(name)) for name, view in views.items()]
    try:
        with torch.no_grad():
            lets = [greenlet(lambda s=start, e=stop: run_batch(s, e)) for start, stop in batches]
            while any(not g.dead for g in lets):
                waiting.clear()
                for g in lets:
                    if not g.dead:
                        g.switch()
                names = set(waiting.values())
                if len(names) > 1 or (names and len(waiting) != sum(not g.dead for g in lets)):
                    raise RuntimeError(f"calibration batches of block {index} diverged: waiting at {sorted(names)}")
                if names:
                    name = names.pop()
                    group = [name] + [n for n in shared_hint.get(name, []) if n in views and n not in done]
                    prune_group(group, stats[name])
                    for member in group:
                        owner[member] = name
                        done.add(member)
    finally:
        for handle in handles:
            handle.remove()
    missing = set(views) - done
    if missing:
        raise RuntimeError(f"linears {sorted(missing)} of block {index} were never called")
    return owner
