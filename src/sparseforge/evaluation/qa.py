"""Knowledge-intensive generation: TriviaQA and Natural Questions (open), greedy, through lm-eval.

lm-eval runs the generation (its prompts, stop sequences and batching); this module adds what lm-eval does not
report: the exact match after SQuAD-style normalisation against *any* of the gold answers (lm-eval's own
``exact_match`` is kept next to it, it differs in how it normalises), the model's answers themselves, and their
agreement with a reference model's answers (the share of questions on which a compressed model says the same as the
dense one), which moves long before accuracy does.

Prompt formats (``PROMPT_FORMATS``) were measured on the dense default model; the default is the best one there
(see ``bench/README.md``).
"""

from __future__ import annotations

import re
import string
import time

from ..errors import EvaluationError
from ..models.handle import LoadedModel
from .harness import lm_eval_model
from .runner import check_limit, run_lm_eval_task
from .tasks import OFFLINE_TASKS, QA_TASKS, parse_task_names

# name -> (lm-eval task overrides, simple_evaluate chat options)
PROMPT_FORMATS: dict[str, tuple[dict, dict]] = {
    "plain": ({}, {}),
    "plain-5shot": ({"num_fewshot": 5}, {}),
    "chat": ({}, {"apply_chat_template": True}),
    "chat-5shot": ({"num_fewshot": 5}, {"apply_chat_template": True, "fewshot_as_multiturn": True}),
}
DEFAULT_PROMPT = "plain-5shot"


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _answers(target) -> list[str]:
    return [str(a) for a in target] if isinstance(target, (list, tuple)) else [str(target)]


def _score_samples(samples: list[dict]) -> tuple[list[str], list[bool]]:
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    predictions = [s["filtered_resps"][0] for s in ordered]  # one generation per question, after lm-eval's filters
    correct = [normalize_answer(p) in {normalize_answer(a) for a in _answers(s["target"])}
               for p, s in zip(predictions, ordered)]
    return predictions, correct


def agreement(predictions: list[str], reference: list[str]) -> float:
    """Share of questions answered the same (after normalisation) as ``reference``; lists align by question."""
    n = min(len(predictions), len(reference))
    if n == 0:
        return float("nan")
    return sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(predictions[:n], reference[:n])) / n


def knowledge_qa(handle: LoadedModel, tasks="all", limit: int | None = None, prompt: str = DEFAULT_PROMPT,
                 reference: dict | None = None, batch_size: int = 32, lm=None) -> dict:
    """Greedy QA on ``tasks``; ``reference`` is an earlier result of this function (the dense model's) to agree with."""
    from lm_eval.api.metrics import mean_stderr

    names = parse_task_names(tasks, QA_TASKS)
    check_limit(limit)
    if prompt not in PROMPT_FORMATS:
        raise EvaluationError(f"unknown QA prompt format '{prompt}'; available: {', '.join(PROMPT_FORMATS)}")
    overrides, chat = PROMPT_FORMATS[prompt]
    lm = lm or lm_eval_model(handle, batch_size=batch_size)
    report = {}
    for name in names:
        task = OFFLINE_TASKS[name]
        start = time.perf_counter()
        out = run_lm_eval_task(lm, task, limit, log_samples=True, chat=chat, **overrides)
        predictions, correct = _score_samples(out["samples"])
        em = sum(correct) / len(correct)
        error = mean_stderr([float(c) for c in correct]) if len(correct) > 1 else 0.0
        metrics = {"exact_match": em, "exact_match_stderr": error,
                   "lm_eval_exact_match": float(out["results"]["exact_match,remove_whitespace"])}
        entry = {"metrics": metrics, "items": len(correct), "items_available": out["n_samples"]["original"],
                 "split": task.split, "note": task.split_note, "prompt": prompt,
                 "seconds": round(time.perf_counter() - start, 1), "predictions": predictions}
        ref = (reference or {}).get(name)
        if ref:
            metrics["agreement_with_reference"] = agreement(predictions, ref["predictions"])
        report[name] = entry
    return report

