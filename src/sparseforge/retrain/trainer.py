"""The training loop every recovery method shares: global retraining, reconstruction, IMP rounds.

AdamW, linear warm-up then linear decay to zero, gradient clipping, optional gradient checkpointing, bf16 (fp16
where the GPU lacks bf16) autocast on CUDA and plain fp32 on CPU, all through ``accelerate`` (which also gives
multi-GPU data parallelism under ``accelerate launch``). Batches are a pure function of the step number, so a run
resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen.

A non-finite loss or gradient stops training: the parameters are put back to the last state that gave a finite
loss (a copy of the trainable tensors is kept in host memory before every update: tiny for PERP, one model copy
for full retraining) and the report says so, instead of a NaN model silently going on to evaluation and export.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..errors import RetrainError
from ..memory import PeakMemory
from ..errors import CorruptCheckpointError
from ..export.integrity import sha256_of
from ..calibration.checkpoint import Checkpoint, load_tensors, save_tensors, verify_tensors


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 5e-4
    batch: int = 8
    seqlen: int = 512
    warmup: float = 0.1  # fraction of steps with a linear warm-up
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        checks = [(self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
                  (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be positive, got {self.lr}"),
                  (self.batch >= 1, f"batch must be at least 1, got {self.batch}"),
                  (self.seqlen >= 2, f"seqlen must be at least 2, got {self.seqlen}"),
                  (0 <= self.warmup < 1, f"warmup is a fraction of the steps in [0, 1), got {self.warmup}"),
                  (self.weight_decay >= 0, f"weight decay must be non-negative, got {self.weight_decay}"),
                  (self.max_grad_norm is None or self.max_grad_norm > 0,
                   f"max_grad_norm must be positive, got {self.max_grad_norm}"),
                  (self.checkpoint_every >= 1, f"checkpoint_every must be at least 1, got {self.checkpoint_every}")]
        for ok, message in checks:
            if not ok:
                raise RetrainError(message)


def warmup_linear_decay(config: TrainConfig) -> Callable[[int], float]:
    warm = max(1, round(config.warmup * config.steps)) if config.warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (config.steps - step) / max(1, config.steps - warm))

    return factor


def _mixed_precision(device: torch.device) -> str:
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class TrainCheckpoint(Checkpoint):
    """Trainable tensors, optimizer and scheduler state every ``checkpoint_every`` steps; resumes if settings match."""

    def save_step(self, step: int, params: list[nn.Parameter], optimizer, scheduler, losses: list[float]) -> None:
        self.state.update(step=step, losses=losses)
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        save_tensors({f"p{i}": p for i, p in enumerate(params)}, self.directory / "trainable.safetensors")
        tmp = self.directory / ".optimizer.pt.tmp"
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
        os.replace(tmp, self.directory / "optimizer.pt")
        self.state["optimizer_sha256"] = sha256_of(self.directory / "optimizer.pt")
        atomic_write_text(self.directory / "state.json", json.dumps(self.state, indent=1))

    def _intact(self) -> bool:
        """Both files of the last checkpoint match their checksums (a damaged one is not used)."""
        optimizer = self.directory / "optimizer.pt"
        try:
            verify_tensors(self.directory / "trainable.safetensors")
        except CorruptCheckpointError:
            return False
        recorded = self.state.get("optimizer_sha256")
        return optimizer.is_file() and (recorded is None or recorded == sha256_of(optimizer))

    def restore(self, params: list[nn.Parameter], optimizer, scheduler) -> tuple[int, list[float]]:
        state = self.resume()
        step = int(state.get("step", 0))
        if not step:
            return 0, []
        if not self._intact():
            print(f"› training checkpoint in {self.directory} is missing or corrupted (SHA-256 mismatch); training "
                  "again from step 0", file=sys.stderr)
            self.state.update(step=0, losses=[])
            return 0, []
        tensors = load_tensors(self.directory / "trainable.safetensors")
        if len(tensors) != len(params):
            raise RetrainError(f"training checkpoint {self.directory} holds {len(tensors)} tensors, this run trains "
                               f"{len(params)}; delete it (or pass --restart) to start over")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"p{i}"].to(p.device, p.dtype))
        saved = torch.load(self.directory / "optimizer.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        return step, list(state.get("losses", []))


def train(params: list[nn.Parameter], loss_of_step: Callable[[int], torch.Tensor], config: TrainConfig,
          module: nn.Module, checkpoint_dir: str | os.PathLike | None = None, settings: dict | None = None,
          progress: bool = True, desc: str = "retrain", on_step: Callable[[int], None] | None = None,
          on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None) -> dict:
    """Minimise ``loss_of_step(step)`` over ``params`` for ``config.steps`` steps; returns a report.

    ``module`` is switched to training mode (and gradient checkpointing, if asked) for the duration. With a
    ``checkpoint_dir`` the run saves every ``checkpoint_every`` steps and resumes from there when restarted with
    the same ``settings``. ``on_step(step)`` runs after each update (tests use it to interrupt a run).
    ``on_optimizer(optimizer)`` sees the torch optimizer once, before training (dynamic sparse training attaches
    its topology updates there).
    """
    from accelerate import Accelerator

    if not params:
        raise RetrainError("nothing to train: the chosen parameter groups are empty for this model")
    torch.manual_seed(config.seed)
    device = params[0].device
    accelerator = Accelerator(mixed_precision=_mixed_precision(device), cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(config))
    if on_optimizer is not None:
        on_optimizer(optimizer)
    optimizer = accelerator.prepare(optimizer)
    if accelerator.num_processes > 1:
        module = accelerator.prepare(module)
    checkpoint = TrainCheckpoint(checkpoint_dir, {**(settings or {}), "train": asdict(config)})
    start, losses = checkpoint.restore(params, optimizer, scheduler)
    was_training = module.training
    module.train()
    checkpointing = config.gradient_checkpointing and hasattr(module, "gradient_checkpointing_enable")
    if checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stopped = None
    good: list[torch.Tensor] | None = None  # the parameters that gave the last finite loss
    started = time.perf_counter()
    memory = PeakMemory(device)
    memory.__enter__()  # closed in the finally below, which also restores the module's modes
    bar = tqdm(range(start, config.steps), desc=desc, disable=not progress, unit="step", initial=start,
               total=config.steps)
    try:
        for step in bar:
            snapshot = [p.detach().to("cpu", copy=True) for p in params]  # host memory, also when on a GPU
            with accelerator.autocast():
                loss = loss_of_step(step)
            if not torch.isfinite(loss):
                stopped, good = step, good or snapshot
                break
            good = snapshot
            accelerator.backward(loss)
            norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
            if not torch.isfinite(torch.as_tensor(norm)):
                stopped = step
                break
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 5))
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                checkpoint.save_step(step + 1, params, optimizer, scheduler, losses)
            if on_step is not None:
                on_step(step)
    finally:
        memory.__exit__()
        optimizer.zero_grad(set_to_none=True)
        if checkpointing:
            module.gradient_checkpointing_disable()
        module.train(was_training)
    report = {"steps_done": len(losses) if stopped is None else stopped, "resumed_from_step": start or None,
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              "losses": losses, "seconds": round(time.perf_counter() - started, 3), "stopped": None,
              "mixed_precision": accelerator.mixed_precision, "peak_memory_mb": round(memory.peak_mb, 1),
              "memory_at_start_mb": round(memory.start_mb, 1)}
    if stopped is not None:
        with torch.no_grad():
            for p, value in zip(params, good):
                p.copy_(value.to(p.device))
        report["stopped"] = (f"loss or gradient became non-finite at step {stopped + 1} (learning rate "
                             f"{config.lr:g} too high?); restored the parameters of the last finite loss and "
                             f"stopped after {stopped} of {config.steps} steps")
    checkpoint.remove()
    return report


def checkpoint_path(root: str | os.PathLike | None, name: str) -> Path | None:
    return None if root is None else Path(root) / name
