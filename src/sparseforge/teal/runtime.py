"""Activation thresholds acting inside a model: forward pre-hooks that zero the small entries of each site's input.

The zeroing is elementwise and per token, so a teacher-forced pass (perplexity, lm-eval scoring) computes exactly
what decoding the same tokens one at a time computes; the prompt is treated the same way. Hooks only: the module
tree and the state dict stay the model's, so exports and adapters see the plain model, and removing the
attachment gives the dense model back. The sparse runtime, installed after the thresholds, replaces the hooked
linears by column-layout products that zero and skip the inputs themselves (:meth:`threshold_for`); the hooks
then sit on modules outside the model and act again once the runtime is removed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ActivationSparsityError
from .sites import SITES, model_sites
from .thresholds import THRESHOLDS_FILE, ActivationThresholds, check_fingerprint, read_thresholds, save_thresholds


class SiteCounter:
    """Zeroed and total input entries per block and site since the last :meth:`reset`."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.reset()

    def reset(self) -> None:
        self.zeroed = [dict.fromkeys(SITES, 0) for _ in range(self.num_blocks)]
        self.total = [dict.fromkeys(SITES, 0) for _ in range(self.num_blocks)]

    def per_block(self) -> list[dict[str, float]]:
        return [{site: zeroed[site] / total[site] for site in SITES if total[site]}
                for zeroed, total in zip(self.zeroed, self.total)]

    def summary(self, weights: list[dict[str, int]]) -> dict:
        """Realised sparsity per block and site, and model-wide weighted by each site's weights (what the bytes
        saved follow)."""
        realised = self.per_block()
        total = sum(weights[b][s] for b, block in enumerate(realised) for s in block)
        overall = sum(value * weights[b][s] for b, block in enumerate(realised) for s, value in block.items())
        return {"overall": overall / total if total else 0.0, "per_block": realised}


class ActivationSparsity:
    """The model attachment of kind ``activation_sparsity``: hooks zeroing every site's input entries whose
    magnitude is below the site's threshold, with counts of what was zeroed."""

    kind = "activation_sparsity"
    takes_over_ffn = False

    def __init__(self, handle, thresholds: ActivationThresholds, count: bool = True):
        thresholds.check(handle.adapter.num_blocks)
        if handle.attachment("runtime") is not None:
            raise ActivationSparsityError("activation thresholds go on the model before the sparse runtime (which "
                                          "builds its column layouts from them): remove the runtime, install the "
                                          "thresholds, then install the runtime")
        self.handle, self.thresholds = handle, thresholds
        self.counter = SiteCounter(handle.adapter.num_blocks)
        self.count = count  # counting costs a reduction per site and call; calibration turns it off
        self._hooks: list = []
        self._site_of: dict[str, tuple[int, str]] = {}  # linear name -> (block, site)
        self.rebind()

    def rebind(self) -> None:
        """Hook the model's current linears (again): called on install and by the sparse runtime when it puts
        ordinary linears back."""
        self.remove()
        for block, sites in enumerate(model_sites(self.handle.adapter)):
            for name, site in sites.items():
                for position, view in enumerate(site.linears):
                    self._site_of[view.name] = (block, name)
                    # the first linear of a site counts for the site: its siblings read the same tensor
                    hook = self._hook(block, name, counted=position == 0)
                    self._hooks.append(view.module.register_forward_pre_hook(hook))

    def _hook(self, block: int, site: str, counted: bool):
        def zero_small(module, args):
            threshold = self.thresholds.thresholds[block].get(site, 0.0)
            if threshold <= 0:
                return None
            x = args[0]
            keep = x.abs() >= threshold
            if counted and self.count:
                self.counter.zeroed[block][site] += int(keep.numel() - keep.sum())
                self.counter.total[block][site] += keep.numel()
            return (x * keep, *args[1:])
        return zero_small

    def threshold_for(self, linear: str) -> float | None:
        """The threshold applied to the input of the block linear named ``linear`` (None: not a site's linear).
        The sparse runtime reads it to build products that zero and skip inputs themselves."""
        if linear not in self._site_of:
            return None
        block, site = self._site_of[linear]
        return self.thresholds.thresholds[block].get(site, 0.0)

    def set_thresholds(self, thresholds: ActivationThresholds) -> None:
        """Switch to another allocation of the same statistics without reinstalling the hooks."""
        thresholds.check(self.handle.adapter.num_blocks)
        self.thresholds = thresholds

    def summary(self) -> dict:
        return self.counter.summary(self.thresholds.weights)

    def describe(self) -> str:
        return (f"activation sparsity {self.thresholds.allocation} {self.thresholds.target:g} "
                f"(allocated {self.thresholds.overall():.3f} of the weights read)")

    def save(self, directory: Path) -> None:
        save_thresholds(self.thresholds, directory)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def install_thresholds(handle, thresholds: ActivationThresholds) -> ActivationSparsity:
    """Put ``thresholds`` on ``handle`` (replacing any installed ones); ``handle.attachment("activation_sparsity")``
    is the attachment."""
    handle.detach(ActivationSparsity.kind)
    attachment = ActivationSparsity(handle, thresholds)
    handle.attach(attachment)
    return attachment


def restore_thresholds(handle, directory: Path) -> None:
    """A directory saved with activation thresholds comes back with them installed, after checking they were
    calibrated for these weights."""
    path = Path(directory) / THRESHOLDS_FILE
    if path.exists():
        thresholds = read_thresholds(path)
        check_fingerprint(thresholds, handle.adapter, str(path))
        install_thresholds(handle, thresholds)
