"""The validated description of a run: model, data, stages, evaluation, export.

Recipes are plain YAML (read with ``yaml.safe_load``) or Python objects; every section rejects unknown keys and
names the offending one. A stage is a one-key mapping (``- prune: {...}``, ``- retrain: ...``, ``- shrink: ...``,
``finercut``, ``skip``, ``factorize``, ``dst``, ``search``), one optional field of :class:`StageEntry` each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.windows import BOS_POLICIES, DEFAULT_EVAL_WINDOWS
from .dtypes import DTYPES
from .dst.engine import METHODS as DST_METHODS
from .dst.masks import MASK_INITS
from .errors import RecipeError, SparseforgeError
from .evaluation.qa import DEFAULT_PROMPT, PROMPT_FORMATS
from .evaluation.tasks import QA_TASKS, ZERO_SHOT_TASKS, parse_task_names
from .moe.losses import DIRECTIONS
from .moe.partition import PARTITIONS
from .moe.routing import ROUTER_GRADS
from .prune.methods import METHODS
from .prune.pruner import ORDERS, REFINEMENTS, method_options
from .retrain.lora import LORA_VARIANTS
from .retrain.reconstruct import ReconstructConfig
from .retrain.recovery import DEFAULT_PARAMS, RETRAIN_METHODS
from .retrain.selection import PARAM_GROUPS
from .search.api import ALGORITHMS as SEARCH_ALGORITHMS, SearchConfig
from .sparsity.allocation import ALLOCATIONS
from .structured.divergence import DISTANCES
from .structured.importance import SCORES
from .skip.policy import SIMILARITIES
from .structured.width import HEAD_UNITS
from .sparsity.patterns import parse_pattern, resolve_sparsity


def _registered(value: str, registry: dict, what: str) -> str:
    if value not in registry:
        raise ValueError(f"unknown {what} '{value}'; available: {', '.join(sorted(registry))}")
    return value


def _is_number_annotation(annotation) -> bool:
    """int, float, or an optional/union of them (``int | None``, ``float | list[float]``)."""
    if annotation in (int, float):
        return True
    return any(_is_number_annotation(a) for a in get_args(annotation) if a is not type(None))


class _Strict(BaseModel):
    """Unknown keys are refused, and so is ``true``/``false`` where a number belongs (YAML's ``nsamples: true``
    would otherwise be read as 1)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data):
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and _is_number_annotation(field.annotation):
                    raise ValueError(f"'{name}' must be a number, got {str(data[name]).lower()}")
        return data


class DataConfig(_Strict):
    calibration: str = "default"
    evaluation: str = "default"
    seqlen: int = Field(512, ge=2, description="calibration window length (tokens)")
    nsamples: int = Field(64, ge=1, description="number of calibration windows")
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the calibration windows (and of training order)")
    bos: Literal[BOS_POLICIES] = Field("auto", description="BOS first in every window: auto (as the tokenizer "  # type: ignore[valid-type]
                                       "does), always, never")
    eval_seqlen: int | None = Field(None, ge=2, description="evaluation window length; defaults to seqlen")
    eval_windows: int | None = Field(DEFAULT_EVAL_WINDOWS, ge=0, description="cap on evaluation windows; 0 or null: "
                                                                             "every window")

    @property
    def evaluation_seqlen(self) -> int:
        return self.eval_seqlen or self.seqlen


class PruneStage(_Strict):
    """One-shot pruning; calibrated methods use the recipe's ``data`` section for their calibration windows."""

    method: str = "magnitude"
    sparsity: float | None = Field(None, description="required for unstructured; N:M patterns fix it")
    pattern: str = "unstructured"
    per_row: bool | None = Field(None, description="compare within output rows; default: the method's choice")
    allocation: str = "uniform"
    refine: Literal[REFINEMENTS] | None = None  # type: ignore[valid-type]
    batch_size: int = Field(8, ge=1, description="calibration windows per forward batch")
    order: Literal[ORDERS] = "sublayer"  # type: ignore[valid-type]
    owl: dict = Field(default_factory=dict, description="OWL options: m, lam")
    dsnot: dict = Field(default_factory=dict, description="DSnoT options: max_cycles, threshold, sign_check, layers")
    sparsegpt: dict = Field(default_factory=dict, description="SparseGPT options: block_size, dampening")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return _registered(value, METHODS, "method")

    @field_validator("allocation")
    @classmethod
    def _known_allocation(cls, value: str) -> str:
        return _registered(value, ALLOCATIONS, "allocation")

    @model_validator(mode="after")
    def _valid_pattern(self) -> "PruneStage":
        try:
            resolve_sparsity(parse_pattern(self.pattern, bool(self.per_row)), self.sparsity)
            method_options(self.owl, self.dsnot, self.sparsegpt)
        except SparseforgeError as exc:
            raise ValueError(str(exc)) from None
        return self


class LoRASettings(_Strict):
    variant: Literal[LORA_VARIANTS] = "mask"  # type: ignore[valid-type]
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)


class IMPSettings(_Strict):
    sparsity: float = Field(0.5, ge=0, lt=1)
    rounds: int = Field(3, ge=1)


class RetrainStage(_Strict):
    """Recovery training; ``reconstruct`` must directly follow a prune stage (it runs inside that stage's
    layer-sequential pass). Training text: the training side of ``data.calibration``, seeded by ``data.seed``."""

    method: Literal[RETRAIN_METHODS] = "perp"  # type: ignore[valid-type]
    params: list[Literal[PARAM_GROUPS]] = Field(default_factory=lambda: list(DEFAULT_PARAMS),  # type: ignore[valid-type]
                                                min_length=1, description="perp/reconstruct: bias, norm, lm_head, lora")
    lora: LoRASettings = LoRASettings()
    steps: int = Field(100, ge=1, description="optimizer steps (reconstruct: per block)")
    lr: float | None = Field(None, gt=0, description="learning rate; default per method")
    batch: int = Field(8, ge=1, description="windows per step (not used by reconstruct: it uses the prune batches)")
    seqlen: int | None = Field(None, ge=2, description="training window length; defaults to data.seqlen")
    warmup: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    imp: IMPSettings = IMPSettings()

    @model_validator(mode="after")
    def _valid_combination(self) -> "RetrainStage":
        if self.method == "reconstruct":
            try:
                ReconstructConfig.from_dict(self.reconstruct_options())
            except SparseforgeError as exc:
                raise ValueError(str(exc)) from None
        return self

    def reconstruct_options(self) -> dict:
        options = {"params": list(self.params), "lora": self.lora.model_dump(), "steps": self.steps,
                   "warmup": self.warmup, "max_grad_norm": self.max_grad_norm}
        return options | ({"lr": self.lr} if self.lr is not None else {})


def _check_ratios(value: float | list[float]) -> float | list[float]:
    for ratio in [value] if isinstance(value, (int, float)) else value:
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio {ratio:g} is outside [0, 1)")
    return value


class ShrinkStage(_Strict):
    """Width pruning: remove FFN neurons and attention heads physically; calibration from the recipe's ``data``."""

    ffn: float | list[float] = Field(0.0, description="fraction of FFN neurons to remove, one value or one per block")
    heads: float | list[float] = Field(0.0, description="fraction of query heads to remove, one value or per block")
    score: Literal[SCORES] = "fluctuation"  # type: ignore[valid-type]
    round_to: int = Field(1, ge=1, description="keep FFN widths a multiple of this (8, 64, ...)")
    head_unit: Literal[HEAD_UNITS] = "auto"  # type: ignore[valid-type]
    compensate: bool = Field(False, description="add removed channels' mean contribution to the output bias")
    batch_size: int = Field(8, ge=1)

    _ratios = field_validator("ffn", "heads")(classmethod(lambda cls, value: _check_ratios(value)))


class FinerCutStage(_Strict):
    """Remove whole sub-layers: greedily by output divergence (``unit: sublayer``, FinerCut) or whole blocks by
    input/output similarity (``unit: block``). Calibration text and seed from ``data``; its own window count."""

    remove: float = Field(0.25, gt=0, description="fraction of sub-layers (or blocks) to remove, or a count if >= 1")
    unit: Literal["sublayer", "block"] = "sublayer"
    distance: Literal[DISTANCES] = "js"  # type: ignore[valid-type]
    exclude: float = Field(0.0, ge=0, lt=1, description="protect the first blocks until this fraction is removed")
    nsamples: int = Field(8, ge=1)
    seqlen: int = Field(128, ge=2)
    batch_size: int = Field(4, ge=1)


class SkipStage(_Strict):
    """Calibrate an input-adaptive FFN-skip policy (FFN-SkipLLM) for the final model; evaluation and export then run
    with it. Calibration text and seed from ``data``."""

    target: float = Field(0.25, description="share of all FFN blocks to skip on generated tokens, in (0, 1)")
    k: int | None = Field(None, ge=1, description="FFNs skipped after a saturated one (default: searched, 1-4)")
    similarity: Literal[SIMILARITIES] = "residual"  # type: ignore[valid-type]
    cold_start: int | None = Field(None, ge=0, description="first layers never skipped (default: from calibration)")
    cold_end: int | None = Field(None, ge=0, description="last layers never skipped (default: from calibration)")
    warmup: int = Field(0, ge=0, description="generated tokens decoded densely before skipping starts")
    nsamples: int = Field(8, ge=1, description="calibration prompts")
    prompt_tokens: int = Field(48, ge=1)
    new_tokens: int = Field(32, ge=1, description="tokens the dense model generates per calibration prompt")
    tolerance: float = Field(0.005, gt=0, description="how close to the target the calibration ratio must get")

    @field_validator("target")
    @classmethod
    def _in_range(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"target skip ratio {value:g} is outside (0, 1)")
        return value


class FactorizeStage(_Strict):
    """Split every FFN into routed experts (FactorLLM), train the routers on the Prior-Approximate loss, then the
    experts on the LM loss; evaluation and export then run sparsely. Training text and seed from ``data``."""

    experts: int = Field(4, ge=1, description="experts per FFN (the shared one included); must divide the FFN width")
    topk: int = Field(1, ge=1, description="routed experts run per token")
    partition: Literal[PARTITIONS] = "contiguous"  # type: ignore[valid-type]
    shared_expert: bool = Field(False, description="one expert always runs; the router picks among the others")
    router_steps: int = Field(30, ge=0, description="stage 1 steps (0: untrained, random routers)")
    expert_steps: int = Field(10, ge=0, description="stage 2 steps (0: experts keep the dense weights)")
    router_lr: float = Field(1e-2, gt=0)
    expert_lr: float = Field(1e-3, gt=0)
    batch: int = Field(4, ge=1)
    seqlen: int = Field(256, ge=2)
    pa_weight: float = Field(0.05, ge=0, description="Prior-Approximate loss weight (summed over layers)")
    balance_weight: float = Field(0.01, ge=0, description="load-balancing weight (summed over layers)")
    lm_weight: float = Field(0.0, ge=0, description="LM loss weight in stage 1 (needs router_grad straight_through)")
    router_grad: Literal[ROUTER_GRADS] = "pa_only"  # type: ignore[valid-type]
    direction: Literal[DIRECTIONS] = "reverse_kl"  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _topk_fits(self) -> "FactorizeStage":
        routed = self.experts - int(self.shared_expert)
        if not 1 <= self.topk <= routed:
            raise ValueError(f"topk must be between 1 and the number of routed experts ({routed}), got {self.topk}")
        return self


class DstStage(_Strict):
    """Dynamic sparse training of the adapter's linears (SET, RigL, SNFS) on the recipe's training text; the final
    masks become the model's pruning masks. Starts from a dense model, so it must be the first stage."""

    method: Literal[tuple(m for m in DST_METHODS)] = "rigl"  # type: ignore[valid-type]
    density: float = Field(0.5, gt=0, le=1, description="share of each layer's weights kept")
    init: Literal[MASK_INITS] = "erk"  # type: ignore[valid-type]
    from_scratch: bool = Field(True, description="re-initialise the weights (sparse training from scratch)")
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch: int = Field(8, ge=1)
    seqlen: int = Field(256, ge=2)
    delta_t: int = Field(100, ge=1, description="optimizer steps between topology updates")
    drop_fraction: float = Field(0.3, ge=0, lt=1, description="share of active weights rewired at the first update")
    stop_fraction: float = Field(0.75, ge=0, le=1, description="no topology updates after this share of the steps")


class SearchStage(_Strict):
    """Search per-block sparsity levels (NSGA-II, EvoPress or the sub-network decomposition), then prune the model
    at the front point picked. Calibration text, window count, length and seed from ``data``; the KL objective
    scores its own ``windows`` x ``seqlen``. Starts from a dense model, so it must come before any pruning."""

    algorithm: Literal[SEARCH_ALGORITHMS] = "nsga2"  # type: ignore[valid-type]
    method: str = "wanda"
    pattern: str = Field("unstructured", description="unstructured, or an N:M family such as nm:8 (levels pick N)")
    per_row: bool | None = None
    levels: str | list[float] = Field("0.3:0.9:0.05", description="lo:hi:step or a list of sparsities")
    target: float | None = Field(None, description="evopress: the budget; otherwise the default pick")
    pick: float | None = Field(None, description="average sparsity of the front point to keep (default: target)")
    windows: int = Field(8, ge=1, description="calibration windows scored by the KL objective")
    seqlen: int = Field(128, ge=2)
    batch_size: int = Field(4, ge=1)
    population: int = Field(16, ge=4)
    generations: int = Field(12, ge=1)
    groups: int = Field(5, ge=1, description="decompose: groups of consecutive blocks")
    group_generations: int = Field(12, ge=1)
    gpir_points: int = Field(10, ge=1, description="decompose: front points per group measured in the full model")
    offspring: int = Field(16, ge=1, description="evopress: children per generation")
    stages: list[list[int]] = Field(default_factory=lambda: [[2, 4], [8, 1]],
                                    description="evopress: [windows, survivors] per selection stage")
    workers: int = Field(0, ge=0, description="0: serial; N: N Ray workers")
    ray_address: str | None = None
    ray_timeout: float = Field(10.0, gt=0)
    cache_dir: str | None = None
    cache_budget_gb: float = Field(4.0, gt=0)
    owl_m: float = 5.0
    owl_lam: float = 0.08
    reuse: bool = True

    @model_validator(mode="after")
    def _valid_search(self) -> "SearchStage":
        try:
            self.config().check()
        except SparseforgeError as exc:
            raise ValueError(str(exc)) from None
        if self.pick is None and self.target is None:
            raise ValueError("a search stage needs pick (the average sparsity to keep) or target")
        return self

    def config(self, seed: int = 0) -> SearchConfig:
        return SearchConfig(**self.model_dump(exclude={"pick"}), seed=seed)


class StageEntry(_Strict):
    """Exactly one of the stage types."""

    prune: PruneStage | None = None
    retrain: RetrainStage | None = None
    shrink: ShrinkStage | None = None
    finercut: FinerCutStage | None = None
    skip: SkipStage | None = None
    factorize: FactorizeStage | None = None
    dst: DstStage | None = None
    search: SearchStage | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "StageEntry":
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a stage must have exactly one type ({', '.join(type(self).model_fields)}), got {given or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def config(self) -> BaseModel:
        return getattr(self, self.kind)


class EvaluateConfig(_Strict):
    perplexity: bool = True
    tasks: list[str] = Field(default_factory=list, description="zero-shot tasks (lm-eval), e.g. [arc_easy, piqa]; [all]")
    qa: list[str] = Field(default_factory=list, description="knowledge QA by greedy generation: triviaqa, nq_open")
    limit: int | None = Field(None, ge=1, description="at most this many items per task (default all)")
    qa_prompt: str = DEFAULT_PROMPT
    speed: bool = False
    speed_batch_size: int = Field(1, ge=1)
    speed_prompt_tokens: int = Field(128, ge=1)
    speed_new_tokens: int = Field(32, ge=1)
    speed_repeats: int = Field(3, ge=1)
    speed_threads: int | None = Field(None, ge=1, description="torch threads while timing (default: unchanged)")

    @field_validator("tasks", "qa")
    @classmethod
    def _known_tasks(cls, value: list[str], info) -> list[str]:
        try:
            return parse_task_names(value, ZERO_SHOT_TASKS if info.field_name == "tasks" else QA_TASKS) if value else []
        except SparseforgeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("qa_prompt")
    @classmethod
    def _known_prompt(cls, value: str) -> str:
        return _registered(value, PROMPT_FORMATS, "QA prompt format")


class ExportConfig(_Strict):
    format: Literal["auto", "dense", "bitmask", "nm"] = "auto"
    dtype: Literal[tuple(DTYPES)] | None = None  # type: ignore[valid-type]


class Recipe(_Strict):
    model: str
    dtype: Literal[tuple(DTYPES)] | None = None  # type: ignore[valid-type]
    trust_remote_code: bool = False
    masks_from_zeros: bool = Field(False, description="read the exact zeros of a dense checkpoint pruned elsewhere as "
                                                      "its masks (never done unasked: zeros are not always a mask)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    data: DataConfig = DataConfig()
    stages: list[StageEntry] = []
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig | None = ExportConfig()

    @model_validator(mode="after")
    def _reconstruct_follows_prune(self) -> "Recipe":
        for index, stage in enumerate(self.stages):
            if stage.kind == "retrain" and stage.config.method == "reconstruct" and \
                    (index == 0 or self.stages[index - 1].kind != "prune"):
                raise ValueError(f"stages.{index}: retrain method 'reconstruct' runs inside pruning, so it must "
                                 "directly follow a prune stage")
            if stage.kind in ("shrink", "finercut") and any(s.kind == "prune" for s in self.stages[:index]):
                raise ValueError(f"stages.{index}: {stage.kind} removes whole neurons, heads or sub-layers from a "
                                 "dense model, so it must come before pruning")
            if stage.kind == "dst" and index != 0:
                raise ValueError(f"stages.{index}: dst trains a sparse model from a dense one, so it must be the "
                                 "first stage")
            if stage.kind in ("skip", "factorize") and index != len(self.stages) - 1:
                raise ValueError(f"stages.{index}: {stage.kind} is calibrated on the final weights, so it must be "
                                 "the last stage")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        else:
            message = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts)


def parse_recipe(data: object, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe must be a mapping with at least a 'model' key")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"invalid {origin}: {_describe(exc)}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no such recipe file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_recipe(data, origin=f"recipe {path}")
