"""Dynamic sparse training for any ``nn.Module``: masks at a fixed count per layer, rewired every ``delta_t`` steps.

One call integrates it with an existing loop (in the spirit of jaxpruner's ``wrap_optax``)::

    sparsity = DynamicSparsity.install(model, DSTConfig(density=0.2, method="rigl", total_steps=steps))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)   # before or after install: same parameters
    sparsity.attach(optimizer)                                   # topology updates run after optimizer.step()

Pruned weights are zero because of the sparsity core's mask parametrization (``weight = original * mask``), not a
loop that zeroes them after each step, so no code path can compute with a pruned weight. A topology update rewrites
the mask buffer in place, sets grown weights to zero (they start from zero, as in RigL and SET) and clears the
optimizer's state (Adam moments, SGD momentum) at every dropped or grown position, so a revived weight does not
inherit the momentum of the weight that died there.

The fraction of active weights rewired decays with a cosine from ``drop_fraction`` to ``final_drop_fraction`` over
``total_steps`` (the study: 0.5 -> 0.005 over the task). Updates stop after ``stop_fraction`` of the steps
(RigL stops at 0.75; the study never stops, 1.0). Every layer keeps exactly its initial number of active weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import SparseTrainingError
from ..sparsity.masks import KeepMask, enforce_weight_mask, release_weight_mask, trainable_weight
from .masks import MASK_INITS, check_density, random_masks, sparse_targets
from .rules import DROP_RULES, GRADIENT_GROWTH, GROWTH_RULES, LayerState, check_rule, top_positions

# Named methods: (drop rule, growth rule). "static" keeps the initial random mask (no updates).
METHODS: dict[str, tuple[str, str] | None] = {
    "set": ("set", "random"),
    "rigl": ("magnitude", "gradient"),
    "snfs": ("magnitude", "momentum"),
    "static": None,
}
OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


@dataclass(frozen=True)
class DSTConfig:
    """Settings of one sparse-training run. ``method`` presets drop and growth; otherwise give them yourself."""

    density: float = 0.2
    init: str = "erk"
    method: str | None = None
    drop: str = "magnitude"
    growth: str = "random"
    delta_t: int = 100
    drop_fraction: float = 0.5
    final_drop_fraction: float = 0.005
    total_steps: int = 1000
    stop_fraction: float = 1.0
    grad_beta: tuple[float, float] = (0.9, 0.999)
    seed: int = 0

    def __post_init__(self) -> None:
        check_density(self.density)
        if self.init not in MASK_INITS:
            raise SparseTrainingError(f"unknown mask initialisation '{self.init}'; available: {', '.join(MASK_INITS)}")
        if self.method is not None:
            if self.method not in METHODS:
                raise SparseTrainingError(f"unknown sparse-training method '{self.method}'; available: "
                                          f"{', '.join(METHODS)} (or give drop and growth rules)")
            if METHODS[self.method] is not None:
                drop, growth = METHODS[self.method]
                object.__setattr__(self, "drop", drop)
                object.__setattr__(self, "growth", growth)
        check_rule("drop", self.drop, DROP_RULES)
        check_rule("growth", self.growth, GROWTH_RULES)
        checks = [(self.delta_t >= 1, f"delta_t must be at least 1 step, got {self.delta_t}"),
                  (0 <= self.drop_fraction < 1, f"drop_fraction must be in [0, 1), got {self.drop_fraction}"),
                  (0 <= self.final_drop_fraction <= self.drop_fraction,
                   f"final_drop_fraction must be in [0, drop_fraction], got {self.final_drop_fraction}"),
                  (self.total_steps >= 1, f"total_steps must be at least 1, got {self.total_steps}"),
                  (0 <= self.stop_fraction <= 1, f"stop_fraction must be in [0, 1], got {self.stop_fraction}")]
        for ok, message in checks:
            if not ok:
                raise SparseTrainingError(message)

    @property
    def dynamic(self) -> bool:
        return self.method != "static"

    def with_steps(self, total_steps: int) -> "DSTConfig":
        return replace(self, total_steps=total_steps)


def cosine_fraction(config: DSTConfig, step: int) -> float:
    progress = min(1.0, step / config.total_steps)
    spread = config.drop_fraction - config.final_drop_fraction
    return config.final_drop_fraction + 0.5 * spread * (1 + math.cos(math.pi * progress))


@dataclass
class SparseLayer:
    module: nn.Module
    keeper: KeepMask
    fired: torch.Tensor
    grad_mean: torch.Tensor | None = None
    grad_sq_mean: torch.Tensor | None = None

    @property
    def parameter(self) -> nn.Parameter:
        return trainable_weight(self.module)


@dataclass
class UpdateRecord:
    step: int
    fraction: float
    rewired: dict[str, int] = field(default_factory=dict)


class DynamicSparsity:
    """Owns the masks of a model's sparse layers and rewires them; see the module docstring."""

    def __init__(self, layers: dict[str, SparseLayer], config: DSTConfig):
        self.layers = layers
        self.config = config
        self.step = 0
        self.history: list[UpdateRecord] = []
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self._hooks: list = []
        for layer in layers.values():
            layer.keeper.record_gradient = config.dynamic and config.growth in GRADIENT_GROWTH

    @classmethod
    def install(cls, model: nn.Module, config: DSTConfig,
                targets: dict[str, nn.Module] | None = None) -> "DynamicSparsity":
        """Draw random masks (``config.init``) for every linear/conv weight of ``model`` (or only ``targets``, e.g.
        the linears a model adapter exposes) and enforce them."""
        targets = targets if targets is not None else sparse_targets(model)
        masks = random_masks(targets, config.density, config.init, torch.Generator().manual_seed(config.seed))
        layers = {}
        for name, module in targets.items():
            keeper = enforce_weight_mask(module, masks[name].to(module.weight.device))
            layers[name] = SparseLayer(module, keeper, keeper.mask.clone())
        return cls(layers, config)

    @classmethod
    def over(cls, modules: dict[str, nn.Module], keepers: dict[str, KeepMask], config: DSTConfig) -> "DynamicSparsity":
        """Rewire masks someone else installed (the continual-learning harness's per-task parametrizations)."""
        return cls({name: SparseLayer(modules[name], keepers[name], keepers[name].mask.clone())
                    for name in modules}, config)

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Run :meth:`after_step` after every ``optimizer.step()``; returns the same optimizer."""
        self._hooks.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step(opt)))
        return optimizer

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for layer in self.layers.values():
            layer.keeper.record_gradient = False
            layer.keeper.dense_grad = None

    def release(self) -> None:
        """Stop updating and bake the masked weights into plain parameters (for export or inference elsewhere)."""
        self.detach()
        for layer in self.layers.values():
            release_weight_mask(layer.module)

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: layer.keeper.mask.detach().cpu().clone() for name, layer in self.layers.items()}

    def density(self) -> float:
        active = sum(int(layer.keeper.mask.sum()) for layer in self.layers.values())
        return active / sum(layer.keeper.mask.numel() for layer in self.layers.values())

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> UpdateRecord | None:
        self.step += 1
        if self.config.dynamic and self.config.growth == "momentum":
            self._accumulate_moments()
        due = self.step % self.config.delta_t == 0 and self.step <= self.config.stop_fraction * self.config.total_steps
        if self.config.dynamic and due:
            return self.update(optimizer)
        return None

    def _accumulate_moments(self) -> None:
        beta1, beta2 = self.config.grad_beta
        for layer in self.layers.values():
            grad = layer.keeper.dense_grad
            if grad is None:
                continue
            if layer.grad_mean is None:
                layer.grad_mean, layer.grad_sq_mean = torch.zeros_like(grad), torch.zeros_like(grad)
            layer.grad_mean.mul_(beta1).add_(grad, alpha=1 - beta1)
            layer.grad_sq_mean.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    @torch.no_grad()
    def update(self, optimizer: torch.optim.Optimizer | None = None) -> UpdateRecord:
        """One prune-and-regrow on every layer; the number of active weights per layer does not change."""
        fraction = cosine_fraction(self.config, self.step)
        record = UpdateRecord(self.step, fraction)
        drop, grow = DROP_RULES[self.config.drop], GROWTH_RULES[self.config.growth]
        for name, layer in self.layers.items():
            mask = layer.keeper.mask
            active = int(mask.sum())
            n = min(math.ceil(fraction * active), mask.numel() - active)
            if n <= 0:
                continue
            state = LayerState(layer.module.weight.detach().cpu(), mask.cpu().clone(), layer.fired.cpu(),
                               _cpu(layer.keeper.dense_grad), _cpu(layer.grad_mean), _cpu(layer.grad_sq_mean))
            dropped = drop(state, n, self.generator)
            survivors = state.mask & ~dropped
            grown = top_positions(grow(state, self.generator), ~survivors, n, self.generator)
            new_mask = survivors | grown
            mask.copy_(new_mask.to(mask.device))
            layer.fired |= mask
            changed = (dropped | grown).to(mask.device)
            layer.parameter[grown.to(mask.device)] = 0
            _reset_optimizer_state(optimizer, layer.parameter, changed)
            record.rewired[name] = int((grown & ~state.mask).sum())
        self.history.append(record)
        return record


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().cpu()


def _reset_optimizer_state(optimizer: torch.optim.Optimizer | None, parameter: nn.Parameter,
                           positions: torch.Tensor) -> None:
    if optimizer is None:
        return
    state = optimizer.state.get(parameter, {})
    for key in OPTIMIZER_STATE_KEYS:
        buffer = state.get(key)
        if isinstance(buffer, torch.Tensor) and buffer.shape == parameter.shape:
            buffer[positions] = 0
