"""``sparseforge.factorize``: split the FFNs into experts, train routers then experts, keep the result installed.

The one call behind the CLI command and the recipe stage; it records what it did in ``handle.history``.
"""

from __future__ import annotations

import time

import torch

from ..models.handle import LoadedModel
from ..retrain.data import training_windows
from ..retrain.trainer import TrainConfig
from .cost import ideal_expert_speedups
from .factorize import check_factorize_request, factorize
from .partition import DATA_PARTITIONS
from .routing import ExpertRouting
from .train import train_factorized

COST_PROMPT, COST_NEW_TOKENS = 128, 32  # the speed harness's defaults, for the ideal speed-up in the report
CALIBRATION_WINDOWS = 8  # training windows whose activations the coactivation partition clusters


def factorize_model(handle: LoadedModel, experts: int = 4, topk: int = 1, partition: str = "contiguous",
                    shared_expert: bool = False, router_steps: int = 30, expert_steps: int = 10,
                    router_lr: float = 1e-2, expert_lr: float = 1e-3, batch: int = 4, seqlen: int = 256,
                    pa_weight: float = 0.05, balance_weight: float = 0.01, lm_weight: float = 0.0,
                    router_grad: str = "pa_only", direction: str = "reverse_kl", data: str | torch.Tensor = "default",
                    seed: int = 0, checkpoint_dir=None, progress: bool = True) -> ExpertRouting:
    """FactorLLM on ``handle`` in place. ``router_steps=0`` leaves the routers untrained (random), and
    ``expert_steps=0`` leaves the experts as the dense weights."""
    check_factorize_request(handle, experts, topk, partition, shared_expert)
    started = time.perf_counter()
    windows = calibration = None
    if partition in DATA_PARTITIONS or router_steps or expert_steps:  # tokenised once, for every use
        windows = training_windows(handle, data, seqlen)
    if partition in DATA_PARTITIONS:  # a few training windows are enough to see which neurons fire together
        calibration = windows[:CALIBRATION_WINDOWS]
    routing = factorize(handle, experts, topk, partition, shared_expert, seed, calibration)

    def config(steps: int, lr: float) -> TrainConfig | None:
        return TrainConfig(steps=steps, lr=lr, batch=batch, seqlen=seqlen, seed=seed) if steps else None

    training = train_factorized(handle, config(router_steps, router_lr), config(expert_steps, expert_lr), windows,
                                checkpoint_dir, progress, pa_weight=pa_weight, balance_weight=balance_weight,
                                lm_weight=lm_weight, router_grad=router_grad, direction=direction)
    budget = {"router_steps": router_steps, "expert_steps": expert_steps, "router_lr": router_lr,
              "expert_lr": expert_lr, "batch": batch, "seqlen": seqlen,
              "train_tokens": (router_steps + expert_steps) * batch * seqlen}
    routing.settings.training = {**budget, **{stage: {k: v for k, v in report.items() if k != "losses"}
                                              for stage, report in training.items()}}
    cost = ideal_expert_speedups(handle.adapter, routing, COST_PROMPT, COST_NEW_TOKENS)
    handle.history.append({"stage": "factorize", "method": "factorllm",
                           "settings": routing.settings.model_dump(mode="json", exclude={"model"}),
                           "cost": {**cost, "prompt_tokens": COST_PROMPT, "new_tokens": COST_NEW_TOKENS},
                           "losses": {stage: report["losses"] for stage, report in training.items()},
                           "seconds": round(time.perf_counter() - started, 2)})
    return routing
