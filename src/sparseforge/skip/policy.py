"""What an FFN-skipping policy is, checked and stored: the decision rule, its settings, and the model it belongs to.

A policy decides, for every generated token and every FFN sub-layer, whether that FFN runs. Attention always runs,
so the KV cache stays complete. Modes:

* ``adaptive`` (FFN-SkipLLM): outside the cold regions, after an FFN has run, the cosine similarity between the
  residual stream before and after it is compared with ``threshold``; above it, the next ``k`` FFNs are skipped,
  then one runs again and is measured, and so on. ``similarity="ffn_only"`` compares the FFN's own input (the
  normalised stream) and output instead.
* ``static``: the FFNs of ``layers`` are skipped for every token (non-adaptive baseline).
* ``random``: each FFN outside the cold regions is skipped with probability ``probability`` (baseline).
* ``early_exit``: every sub-layer after ``exit_layer`` is skipped, attention included; the skipped layers write zero
  keys and values, the naive way that leaves holes in the KV cache (baseline).

The policy file (``skip_policy.json``) sits next to the model's weights; it records a fingerprint of the model so
that a policy calibrated for one model is not silently applied to another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..atomic import atomic_write_text
from ..errors import SkipError
from ..models.fingerprint import require_same_model
from ..settings import read_json_settings

POLICY_FILE = "skip_policy.json"
MODES = ("adaptive", "static", "random", "early_exit")
SIMILARITIES = ("residual", "ffn_only")


class SkipPolicy(BaseModel):
    """Settings of one skipping rule. ``warmup``: generated tokens decoded with the full model before the policy acts
    (the prompt always runs densely)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal[MODES] = "adaptive"  # type: ignore[valid-type]
    threshold: float = Field(1.01, description="adaptive: skip after an FFN whose similarity exceeds this")
    k: int = Field(1, ge=1, description="adaptive: FFNs skipped after a saturated one")
    similarity: Literal[SIMILARITIES] = "residual"  # type: ignore[valid-type]
    cold_start: int = Field(1, ge=0, description="first layers whose FFN always runs")
    cold_end: int = Field(1, ge=0, description="last layers whose FFN always runs")
    warmup: int = Field(0, ge=0, description="generated tokens decoded densely before skipping starts")
    layers: list[int] = Field(default_factory=list, description="static: the FFNs skipped for every token")
    probability: float = Field(0.0, ge=0, le=1, description="random: chance of skipping each eligible FFN")
    seed: int = 0
    exit_layer: int | None = Field(None, ge=0, description="early_exit: last layer that runs")
    model: dict = Field(default_factory=dict, description="fingerprint of the model this policy was made for")
    calibration: dict = Field(default_factory=dict, description="how it was calibrated (target, measured ratio)")

    def check(self, num_layers: int) -> None:
        """Refuse settings that cannot work on a model with ``num_layers`` blocks."""
        if self.cold_start + self.cold_end >= num_layers and self.mode in ("adaptive", "random"):
            raise SkipError(f"cold regions {self.cold_start} + {self.cold_end} cover all {num_layers} layers: "
                            "no FFN is left to skip")
        if self.mode == "static" and any(not 0 <= layer < num_layers for layer in self.layers):
            raise SkipError(f"static layers {self.layers} outside 0..{num_layers - 1}")
        if self.mode == "early_exit" and (self.exit_layer is None or self.exit_layer >= num_layers):
            raise SkipError(f"early_exit needs exit_layer in 0..{num_layers - 1}, got {self.exit_layer}")

    def eligible(self, layer: int, num_layers: int) -> bool:
        """Whether ``layer``'s FFN is outside the cold regions."""
        return self.cold_start <= layer < num_layers - self.cold_end

    def describe(self) -> str:
        if self.mode == "adaptive":
            return (f"adaptive (threshold {self.threshold:.4f}, k {self.k}, {self.similarity} similarity, cold "
                    f"{self.cold_start}+{self.cold_end}, warm-up {self.warmup})")
        if self.mode == "static":
            return f"static (FFNs of layers {self.layers} always skipped, warm-up {self.warmup})"
        if self.mode == "random":
            return f"random (p {self.probability:.3f} outside cold {self.cold_start}+{self.cold_end}, seed {self.seed})"
        return f"early exit after layer {self.exit_layer} (warm-up {self.warmup})"


def max_adaptive_ratio(num_layers: int, cold_start: int, cold_end: int) -> float:
    """Highest skip ratio the adaptive policy can reach: the first eligible FFN must run to be measured, every other
    eligible one can be skipped (threshold below every similarity, k as large as the eligible span)."""
    eligible = num_layers - cold_start - cold_end
    return max(eligible - 1, 0) / num_layers


def check_fingerprint(policy: SkipPolicy, adapter, origin: str) -> None:
    require_same_model(policy.model, adapter, origin, SkipError, "calibrate it again")


def save_policy(policy: SkipPolicy, directory: str | Path) -> Path:
    path = Path(directory) / POLICY_FILE
    atomic_write_text(path, json.dumps(policy.model_dump(mode="json"), indent=1))
    return path


def read_policy(path: str | Path) -> SkipPolicy:
    """A policy from a JSON file (a directory means its ``skip_policy.json``), with one-line errors."""
    path = Path(path)
    if path.is_dir():
        from ..models.loading import resolve_model_directory

        path = resolve_model_directory(path) / POLICY_FILE
    return read_json_settings(path, SkipPolicy, SkipError, "skip policy")
