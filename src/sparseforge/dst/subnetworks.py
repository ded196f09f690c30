"""Per-task sparse sub-networks inside one shared network: the state machine of parameter-isolation continual learning.

Each task gets a fresh random mask at the requested density (uniform or ERK), drawn independently of earlier tasks,
so it overlaps the weights they own. Inside the task's mask, a weight already owned by an earlier task is *shared*:
it is used with its stored value and cannot change; the other weights of the mask are the task's own and train.
The parametrization computes ``weight = where(mask & used, store, original * (mask & ~used))``, so a frozen weight
is bit-identical whatever the optimizer does (weight decay included), and its gradient is exactly zero.

At the end of a task its trained weights are merged into the store and its mask is kept; inference on task ``j``
uses ``store * mask_j``. Parameters outside the masks (biases, norm affines) and buffers (norm statistics) are
snapshotted per task and restored with its mask, which makes backward transfer exactly zero for any module, not only
for the reference's bias-free backbone with batch statistics.

The classifier is special: a task only ever trains the rows of its own classes, so with a ``head`` named, a task's
head mask is drawn within its own rows only (at the head's density) and each task owns its rows outright. Without
this, task 0 would own (and freeze, at their initial values) weights in every later task's rows: under ERK, which
makes a small classifier dense, later tasks could not train their classifier at all. For scoring over all logits
(the reference code's choice), ``select_task(j, head_tasks=k)`` adds the rows of the first ``k`` tasks.

Transitions are guarded (as in Avalanche's PackNet): ``begin_task`` -> ``end_task`` -> (``select_task`` for
inference)* -> ``begin_task`` ..., and anything out of order raises.

New-task weights (positions no earlier task owns) start at zero, as in the reference code (its merge leaves zeros
there), or, with ``new_weights="init"``, at a fresh default initialisation of the layer (kaiming-uniform, a=sqrt(5)).
Task 0 always starts from the model's own initialisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SparseTrainingError
from ..sparsity.masks import KeepMask, enforce_weight_mask, trainable_weight
from .masks import check_density, layer_densities, random_mask, sparse_targets

NEW_WEIGHTS = ("zero", "init")


class SharedTaskWeight(KeepMask):
    """weight = store where the task's mask meets earlier tasks' weights, else original * mask."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        super().__init__(torch.ones(shape, dtype=torch.bool, device=device))
        self.register_buffer("used", torch.zeros(shape, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("store", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        own = (self.mask & ~self.used).to(weight.dtype)
        return self._attach_recorder(torch.where(self.mask & self.used, self.store.to(weight.dtype), weight * own))

    def _record(self, grad: torch.Tensor) -> None:
        # Frozen weights are never grown into by gradient: their gradient is zero for the optimizer too.
        self.dense_grad = grad.detach().masked_fill(self.used, 0)


class TaskSubnetworks:
    """Masks, ownership and stored weights of every task; see the module docstring."""

    def __init__(self, model: nn.Module, density: float, init: str = "uniform", new_weights: str = "zero",
                 seed: int = 0, head: str | None = None, task_rows: list[list[int]] | None = None):
        self.model = model
        self.density = check_density(density)
        self.init = init
        if new_weights not in NEW_WEIGHTS:
            raise SparseTrainingError(f"new_weights must be one of {', '.join(NEW_WEIGHTS)}, got '{new_weights}'")
        self.new_weights = new_weights
        self.seed = seed
        self.modules = sparse_targets(model)
        if head is not None and (head not in self.modules or not task_rows):
            raise SparseTrainingError(f"head '{head}' must be one of the sparse layers and come with task rows")
        self.head, self.task_rows = head, task_rows or []
        shapes = {name: tuple(m.weight.shape) for name, m in self.modules.items()}
        if head is not None:
            shapes[head] = (len(self.task_rows[0]),) + shapes[head][1:]
        self.densities = layer_densities(shapes, density, init)
        self.keepers: dict[str, SharedTaskWeight] = {}
        for name, module in self.modules.items():
            keeper = SharedTaskWeight(tuple(module.weight.shape), module.weight.dtype, module.weight.device)
            self.keepers[name] = enforce_weight_mask(module, keeper.mask, keeper)
        self.task_masks: list[dict[str, torch.Tensor]] = []
        self.task_extras: list[dict[str, torch.Tensor]] = []
        self.phase = "ready"
        self.current: int | None = None

    # -- capacity -----------------------------------------------------------------------------------------------
    MIN_NEW_SHARE = 0.01

    def new_share_of_last_task(self, tasks: int) -> float:
        """Expected share of the last of ``tasks`` tasks' weights that are its own (trainable), head excluded.

        Masks are independent, so task t finds a fraction (1 - d)^t of its mask still free in a layer of density
        d; a layer the allocation made dense is wholly owned by task 0.
        """
        sizes = {name: module.weight.numel() * self.densities[name] for name, module in self.modules.items()
                 if name != self.head}
        new = sum(size * (1 - self.densities[name]) ** (tasks - 1) for name, size in sizes.items())
        return new / sum(sizes.values())

    def dense_layers(self) -> list[str]:
        """Layers the allocation made dense (ERK does so for small ones, a ResNet stem): task 0 owns them whole, so
        later tasks reuse them frozen, as in the study's code. Reported in results, not refused."""
        return [name for name, density in self.densities.items() if density >= 1 and name != self.head]

    def check_capacity(self, tasks: int) -> None:
        """Refuse, before any training, a number of tasks whose last task could train under 1% of its weights."""
        share = self.new_share_of_last_task(tasks)
        if share < self.MIN_NEW_SHARE:
            raise SparseTrainingError(
                f"{tasks} tasks at density {self.density:g} ({self.init}) exceed the network's free capacity: the "
                f"last task could train only {100 * share:.2g}% of its sub-network (the rest is frozen by earlier "
                f"tasks; at least {100 * self.MIN_NEW_SHARE:g}% needed); use a lower density, fewer tasks or a "
                f"wider network")

    # -- transitions --------------------------------------------------------------------------------------------
    def _guard(self, allowed: tuple[str, ...], action: str) -> None:
        if self.phase not in allowed:
            raise SparseTrainingError(f"cannot {action} while {self.phase} (task {self.current})")

    @torch.no_grad()
    def begin_task(self) -> dict[str, SharedTaskWeight]:
        """Draw the next task's mask and prepare its own weights; returns the parametrizations DST rewires."""
        self._guard(("ready", "inference"), "begin a task")
        task = len(self.task_masks)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + task)
        if self.task_extras:
            self._load_extras(self.task_extras[-1])
        if self.head is not None and task >= len(self.task_rows):
            raise SparseTrainingError(f"task {task} has no head rows (rows given for {len(self.task_rows)} tasks)")
        for name, keeper in self.keepers.items():
            keeper.mask.copy_(self._draw_mask(name, task, generator))
            if task > 0:
                parameter = trainable_weight(self.modules[name])
                fresh = torch.zeros_like(parameter) if self.new_weights == "zero" else _default_init(parameter,
                                                                                                     generator)
                parameter.copy_(torch.where(keeper.used, parameter, fresh))
        self.phase, self.current = "training", task
        return self.keepers

    def _draw_mask(self, name: str, task: int, generator: torch.Generator) -> torch.Tensor:
        shape = tuple(self.keepers[name].mask.shape)
        if name != self.head:
            return random_mask(shape, self.densities[name], generator)
        rows = torch.tensor(self.task_rows[task])
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[rows] = random_mask((len(rows),) + shape[1:], self.densities[name], generator)
        return mask

    @torch.no_grad()
    def end_task(self) -> None:
        """Merge the task's trained weights into the store, freeze them, and keep its mask and dense extras."""
        self._guard(("training",), "end a task")
        masks = {}
        for name, keeper in self.keepers.items():
            parameter = trainable_weight(self.modules[name])
            own = keeper.mask & ~keeper.used
            keeper.store.copy_(torch.where(own, parameter.to(keeper.store.dtype), keeper.store))
            keeper.used |= keeper.mask
            masks[name] = keeper.mask.clone()
        self.task_masks.append(masks)
        self.task_extras.append(self._extras())
        self.phase = "ready"

    @torch.no_grad()
    def select_task(self, task: int, head_tasks: int | None = None) -> None:
        """Put the network in task ``task``'s inference state: its mask over the store, its dense extras.

        ``head_tasks``: also switch on the head rows of the first ``head_tasks`` tasks (scoring over all logits).
        """
        self._guard(("ready", "inference"), "select a task for inference")
        if not 0 <= task < len(self.task_masks):
            raise SparseTrainingError(f"task {task} has not been trained (tasks trained: {len(self.task_masks)})")
        for name, keeper in self.keepers.items():
            keeper.mask.copy_(self.task_masks[task][name])
        if self.head is not None and head_tasks is not None:
            for earlier in self.task_masks[:head_tasks]:
                self.keepers[self.head].mask |= earlier[self.head]
        self._load_extras(self.task_extras[task])
        self.phase, self.current = "inference", task

    # -- reporting ----------------------------------------------------------------------------------------------
    def used_fraction(self) -> float:
        return sum(int(k.used.sum()) for k in self.keepers.values()) / sum(k.used.numel() for k in self.keepers.values())

    def task_statistics(self) -> list[dict]:
        """Per task: active weights, weights it owns (new), weights it shares with earlier tasks."""
        stats, owned = [], {name: torch.zeros_like(k.used) for name, k in self.keepers.items()}
        for masks in self.task_masks:
            active = sum(int(m.sum()) for m in masks.values())
            new = sum(int((masks[name] & ~owned[name]).sum()) for name in masks)
            stats.append({"active": active, "new": new, "shared": active - new})
            for name in masks:
                owned[name] |= masks[name]
        return stats

    def overlap_matrix(self) -> list[list[float]]:
        """Entry [i][j]: fraction of task j's active weights also active in task i's mask."""
        size = len(self.task_masks)
        totals = [sum(int(m.sum()) for m in masks.values()) for masks in self.task_masks]
        return [[sum(int((self.task_masks[i][n] & self.task_masks[j][n]).sum()) for n in self.keepers) / totals[j]
                 for j in range(size)] for i in range(size)]

    def _extras(self) -> dict[str, torch.Tensor]:
        weights = {".".join(filter(None, (name, "parametrizations.weight.original"))) for name in self.modules}
        tensors = {f"p:{n}": p.detach().clone() for n, p in self.model.named_parameters() if n not in weights}
        tensors.update({f"b:{n}": b.detach().clone() for n, b in self.model.named_buffers()
                        if not _is_task_buffer(n)})
        return tensors

    def _load_extras(self, extras: dict[str, torch.Tensor]) -> None:
        parameters, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        for key, value in extras.items():
            kind, name = key.split(":", 1)
            (parameters if kind == "p" else buffers)[name].data.copy_(value)


def _is_task_buffer(name: str) -> bool:
    return "parametrizations.weight." in name


def _default_init(parameter: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear / nn.Conv default: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(parameter[0].numel())
    return (torch.rand(parameter.shape, generator=generator) * 2 - 1).mul_(bound).to(parameter)
