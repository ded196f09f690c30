"""The ``prune:`` stage: one-shot pruning through the layer-sequential pipeline, declared for the registry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..errors import SparseforgeError
from ..settings import StrictSettings, registered
from ..sparsity.allocation import ALLOCATIONS
from ..sparsity.patterns import parse_pattern, resolve_sparsity
from ..stages import StageContext, StageSpec, register_stage
from .dsnot import DSnoTConfig  # importing OWL and DSnoT registers their pipeline hooks
from .hooks import refinement_names
from .admm import ADMMConfig
from .owl import OWLConfig
from .methods import METHODS
from .pruner import ORDERS, check_calibration_memory, check_prune_request, method_options, prune


class PruneStage(StrictSettings):
    """One-shot pruning; calibrated methods use the recipe's ``data`` section for their calibration windows."""

    method: str = "magnitude"
    sparsity: float | None = Field(None, description="required for unstructured; N:M patterns fix it")
    pattern: str = "unstructured"
    per_row: bool | None = Field(None, description="compare within output rows; default: the method's choice")
    allocation: str = "uniform"
    refine: str | None = Field(None, description="training-free mask refinement after pruning: dsnot")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward batch")
    order: Literal[ORDERS] = "sublayer"  # type: ignore[valid-type]
    owl: dict = Field(default_factory=dict, description=f"OWL options: {', '.join(OWLConfig.__dataclass_fields__)}")
    dsnot: dict = Field(default_factory=dict,
                        description=f"DSnoT options: {', '.join(DSnoTConfig.__dataclass_fields__)}")
    sparsegpt: dict = Field(default_factory=dict, description="SparseGPT options: block_size, dampening")
    admm: dict = Field(default_factory=dict, description="options of admm, admm-gradual and alps: "
                                                         f"{', '.join(ADMMConfig.__dataclass_fields__)}")
    block_sparsity: list[float] | str | None = Field(
        None, description="explicit per-block sparsities (unstructured): a list, a .json file, or a search run "
                          "directory; sparsity is then their mean")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return registered(value, METHODS, "method")

    @field_validator("refine")
    @classmethod
    def _known_refinement(cls, value: str | None) -> str | None:
        return None if value is None else registered(value, refinement_names(), "refinement")

    @field_validator("allocation")
    @classmethod
    def _known_allocation(cls, value: str) -> str:
        return registered(value, ALLOCATIONS, "allocation")

    @model_validator(mode="after")
    def _valid_pattern(self) -> "PruneStage":
        try:
            if self.block_sparsity is None:  # checked against the model's depth in preflight
                resolve_sparsity(parse_pattern(self.pattern, bool(self.per_row)), self.sparsity)
            method_options(self.owl, self.dsnot, self.sparsegpt, self.admm)
        except SparseforgeError as exc:
            raise ValueError(str(exc)) from None
        return self


def _fused_reconstruction(context: StageContext) -> dict | None:
    """A reconstruct stage right after a prune stage runs inside it (the dense block outputs exist only there)."""
    following = context.next_stage
    if following is not None and getattr(following, "method", None) == "reconstruct":
        return following.reconstruct_options() | {"seed": context.recipe.data.seed}
    return None


def run_prune_stage(handle, config: PruneStage, context: StageContext) -> None:
    data = context.recipe.data
    prune(handle, method=config.method, sparsity=config.sparsity, pattern=config.pattern, per_row=config.per_row,
          allocation=config.allocation, refine=config.refine, calibration=data.calibration, nsamples=data.nsamples,
          seqlen=data.seqlen, seed=data.seed, batch_size=config.batch_size, order=config.order,
          checkpoint_dir=context.checkpoint_dir, owl=config.owl, dsnot=config.dsnot, sparsegpt=config.sparsegpt,
          admm=config.admm, block_sparsity=config.block_sparsity, reconstruct=_fused_reconstruction(context),
          progress=context.progress)


def preflight_prune_stage(handle, config: PruneStage, recipe) -> None:
    """The pattern against every layer's width, the options, and the calibration set against free memory."""
    _, needs_calibration = check_prune_request(
        handle, config.method, config.sparsity, config.pattern, config.per_row, config.allocation, config.refine,
        config.owl, config.dsnot, config.sparsegpt, config.batch_size, config.order, admm=config.admm,
        block_sparsity=config.block_sparsity)
    if needs_calibration:
        check_calibration_memory(handle, recipe.data.nsamples, recipe.data.seqlen)


def report_prune_stage(stage: dict, after: dict) -> tuple[str, list[str]]:
    """Method, pattern and target; calibration; OWL's block sparsities, DSnoT's swaps, reconstruction, events."""
    title = f"{stage.get('method')} {stage.get('pattern')}, target sparsity {stage.get('target_sparsity'):g}"
    lines = []
    calibration = stage.get("calibration")
    if calibration:
        lines.append(f"- calibration: {calibration['windows']} windows x {calibration['seqlen']} tokens, "
                     f"order `{stage.get('order')}`, {stage.get('seconds', 0):.1f} s")
    memory = stage.get("memory")
    if memory and "peak_rss_mib" in memory:
        lines.append(f"- memory: peak resident {memory['peak_rss_mib']:.0f} MiB ({memory['start_rss_mib']:.0f} MiB "
                     f"when the stage started), weights resident at peak {memory['weights_resident_peak_mib']:.0f} "
                     f"MiB, calibration activations {memory['activations_peak_mib']:.0f} MiB")
    if stage.get("allocation") in ("owl", "explicit") and stage.get("block_sparsity"):
        source = "OWL" if stage["allocation"] == "owl" else "given"
        lines.append(f"- {source} block sparsities: " + ", ".join(f"{s:.3f}" for s in stage["block_sparsity"]))
    if stage.get("refine_swaps") is not None:
        lines.append(f"- {stage['refine']} swaps: {stage['refine_swaps']:,}")
    if stage.get("resumed_from_block"):
        lines.append(f"- resumed from block {stage['resumed_from_block']} of an interrupted run")
    if stage.get("reconstruction"):
        rec = stage["reconstruction"]
        lines.append(f"- layer-wise reconstruction ({'+'.join(rec['settings']['params'])}, "
                     f"{rec['settings']['steps']} steps per block): summed block MSE "
                     f"{rec['mse_before_sum']:.4g} -> {rec['mse_after_sum']:.4g}")
    lines += [f"- event: {event}" for event in stage.get("events", [])]
    return f"prune ({title})", lines


register_stage(StageSpec("prune", PruneStage, run_prune_stage, preflight_prune_stage, report=report_prune_stage))
