"""One call that measures a model the same way for every method: perplexity, sparsity, parameters, zero-shot tasks,
knowledge QA and speed."""

from __future__ import annotations

import contextlib

import torch

from ..data.sources import load_corpus
from ..data.windows import bos_label, evaluation_windows, tokenize_corpus
from ..errors import DataError
from ..models.handle import LoadedModel
from .harness import lm_eval_model
from .perplexity import perplexity
from .qa import DEFAULT_PROMPT, knowledge_qa
from .speed import measure_speed
from .stats import parameter_counts, sparsity_summary
from .zeroshot import zero_shot


def check_window_length(handle: LoadedModel, seqlen: int, what: str = "seqlen") -> None:
    """Refuse, up front, windows longer than the positions the model was built for: learned position embeddings
    (GPT-2, OPT) would crash past their table, rotary models would run for minutes on positions they never saw."""
    limit = handle.position_limit
    if limit and seqlen > limit:
        raise DataError(f"{what} ({seqlen} tokens) exceeds the {limit} positions this {handle.model_type} model "
                        "can encode")


def prepare_evaluation(handle: LoadedModel, data: str = "default", seqlen: int = 512,
                       max_windows: int | None = None) -> tuple[torch.Tensor, dict]:
    """Tokenised evaluation windows and the description of where they came from."""
    check_window_length(handle, seqlen)
    corpus = load_corpus(data, "evaluation")
    bos = handle.window_bos("perplexity")
    windows = evaluation_windows(tokenize_corpus(handle.require_tokenizer("perplexity"), corpus), seqlen, max_windows,
                                 bos)
    return windows, {**corpus.describe(), "bos": bos_label(bos), "bos_policy": handle.bos}


def evaluate(handle: LoadedModel, windows: torch.Tensor | None = None, corpus: dict | None = None,
             speed: bool = False, speed_options: dict | None = None, progress: bool = True,
             tasks: list[str] | None = None, qa: list[str] | None = None, limit: int | None = None,
             qa_prompt: str = DEFAULT_PROMPT, reference: dict | None = None) -> dict:
    """Metrics of ``handle`` as one dict; perplexity only when ``windows`` are given.

    ``tasks`` are zero-shot tasks and ``qa`` knowledge-QA tasks (see :mod:`.tasks`), each capped at ``limit`` items;
    ``reference`` is another model's metrics from this function (the dense model's), whose QA answers the new
    answers are compared with.
    """
    metrics: dict = {"sparsity": sparsity_summary(handle)["overall"], "parameters": parameter_counts(handle)}
    skip = _SkipRecorder(handle, metrics)
    experts = handle.attachment("experts")  # a factorized model: which experts the evaluation routed to
    if experts is not None:
        experts.reset_usage()
    if windows is not None:
        with skip.scoring("perplexity"):
            metrics["perplexity"] = {**perplexity(handle.model, windows, progress=progress), **(corpus or {})}
    if tasks or qa:
        lm = lm_eval_model(handle)
        if tasks:
            with skip.scoring("zero_shot"):
                metrics["zero_shot"] = zero_shot(handle, tasks, limit=limit, lm=lm)
        if qa:
            with skip.counting("qa"):
                metrics["qa"] = knowledge_qa(handle, qa, limit=limit, prompt=qa_prompt, lm=lm,
                                             reference=(reference or {}).get("qa"))
    if speed:
        with skip.counting("speed"):
            metrics["speed"] = measure_speed(handle.model, **(speed_options or {}))
    if experts is not None:
        metrics["experts"] = experts.usage_summary()
    return metrics


class _SkipRecorder:
    """With an FFN-skip policy installed (``handle.attachment("skip")``), every measurement runs with it: text is scored
    teacher-forced as if the policy had generated it (after its warm-up), generation skips for real; what it
    skipped in each part is recorded under ``metrics["skip"]``. Without a policy, nothing happens."""

    def __init__(self, handle: LoadedModel, metrics: dict):
        self.controller = handle.attachment("skip")
        if self.controller is not None:
            metrics["skip"] = {"policy": self.controller.policy.describe()}
            self.record = metrics["skip"]

    @contextlib.contextmanager
    def counting(self, part: str):
        if self.controller is None:
            yield
            return
        self.controller.accounting.reset()
        yield
        self.record[part] = self.controller.accounting.summary(self.controller.policy)

    @contextlib.contextmanager
    def scoring(self, part: str):
        if self.controller is None:
            yield
            return
        with self.controller.scoring(), self.counting(part):
            yield
