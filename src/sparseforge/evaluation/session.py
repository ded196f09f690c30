"""One evaluation session: a model, and optionally its dense baseline, measured under identical settings in one
process, so that "percent of dense retained" and speed ratios compare like with like.

``sparseforge eval`` and :func:`sparseforge.evaluate` both go through :func:`evaluate_session`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_directory
from ..errors import EvaluationError
from ..models.handle import LoadedModel
from .qa import DEFAULT_PROMPT
from .report import peak_memory_mb, render_eval_markdown, versions
from .runner import check_limit
from .speed import compare_with_settings
from .suite import check_window_length, evaluate, prepare_evaluation


@dataclass
class EvalSettings:
    perplexity: bool = True
    data: str = "default"
    seqlen: int = 512
    windows: int | None = None
    tasks: list[str] = field(default_factory=list)
    qa: list[str] = field(default_factory=list)
    limit: int | None = None
    qa_prompt: str = DEFAULT_PROMPT
    speed: bool = False
    speed_batch_size: int = 1
    speed_prompt_tokens: int = 128
    speed_new_tokens: int = 32
    speed_repeats: int = 3
    speed_threads: int | None = None
    bos: str = "auto"

    def __post_init__(self) -> None:
        """Refuse impossible settings before anything is loaded or measured."""
        from ..data.windows import BOS_POLICIES

        at_least_one = {"windows": self.windows, "batch size": self.speed_batch_size,
                        "prompt tokens": self.speed_prompt_tokens, "new tokens": self.speed_new_tokens,
                        "repeats": self.speed_repeats, "threads": self.speed_threads}
        for name, value in at_least_one.items():
            if value is not None and value < 1:
                raise EvaluationError(f"{name} must be at least 1, got {value}")
        if self.seqlen < 2:
            raise EvaluationError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.bos not in BOS_POLICIES:
            raise EvaluationError(f"unknown BOS policy '{self.bos}'; use one of {', '.join(BOS_POLICIES)}")

    def check_positions(self, handle: LoadedModel) -> None:
        """Windows and the speed prompt plus its new tokens must fit the positions the model can encode."""
        if self.perplexity:
            check_window_length(handle, self.seqlen)
        if self.speed:
            check_window_length(handle, self.speed_prompt_tokens + self.speed_new_tokens,
                                "the speed prompt plus its new tokens")


def evaluate_session(handle: LoadedModel, settings: EvalSettings, baseline: LoadedModel | None = None,
                     progress: bool = True) -> dict:
    """Metrics of ``handle`` (and of ``baseline``, measured first) as a report dict."""
    check_limit(settings.limit)
    for model in (handle, baseline):
        if model is not None:
            settings.check_positions(model)
            model.bos = settings.bos
    timings = {}
    windows = corpus = None
    if settings.perplexity:
        windows, corpus = prepare_evaluation(handle, settings.data, settings.seqlen, settings.windows)
    options = {"tasks": settings.tasks, "qa": settings.qa, "limit": settings.limit, "qa_prompt": settings.qa_prompt}
    reference = None
    if baseline is not None:
        start = time.perf_counter()
        reference = evaluate(baseline, windows, corpus, progress=progress, **options)
        timings["evaluate_baseline"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    metrics = evaluate(handle, windows, corpus, progress=progress, reference=reference, **options)
    timings["evaluate_model"] = round(time.perf_counter() - start, 1)
    if settings.speed:
        start = time.perf_counter()
        models = {"model": handle.model} if baseline is None else {"baseline": baseline.model, "model": handle.model}
        speed = compare_with_settings(models, settings, skip=handle.attachment("skip"))
        metrics["speed"] = speed["model"]
        if reference is not None:
            reference["speed"] = speed["baseline"]
        timings["speed"] = round(time.perf_counter() - start, 1)
    return {"model": {"source": handle.source, "model_type": handle.model_type,
                      "dtype": str(handle.dtype).removeprefix("torch.")},
            "baseline": None if baseline is None else {"source": baseline.source},
            "settings": asdict(settings), "metrics": {"before": reference, "after": metrics},
            "timings": timings, "peak_memory_mb": peak_memory_mb(), "versions": versions()}


def write_eval_report(report: dict, out_dir: str | Path, overwrite: bool = False) -> None:
    """``report.json`` and ``report.md`` in ``out_dir``, written complete or not at all."""
    import json

    with atomic_directory(out_dir, overwrite=overwrite, kind="eval") as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(render_eval_markdown(report))
