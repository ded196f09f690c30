"""Which prompt format lets a small instruct model answer TriviaQA and NQ-open at all: measured on the dense model.

    .venv/bin/python bench/qa_prompts.py [--model default] [--limit 100] [--formats plain,plain-5shot,chat,chat-5shot]

Greedy generation through lm-eval (its prompts and stop sequences), at most 32 new tokens. Exact match is
SQuAD-normalised against any gold answer; lm-eval's own exact match is shown next to it. The best format on the
dense default model is the library's default (``sparseforge.evaluation.qa.DEFAULT_PROMPT``).
"""

from __future__ import annotations

import argparse

import sparseforge as sf
from _common import markdown_table, print_setup
from sparseforge.evaluation.harness import lm_eval_model
from sparseforge.evaluation.qa import PROMPT_FORMATS, knowledge_qa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--formats", default=",".join(PROMPT_FORMATS))
    args = parser.parse_args()
    handle = sf.load_model(args.model)
    print_setup(model=args.model, limit=args.limit, decoding="greedy, max 32 new tokens", dtype=str(handle.dtype))
    lm = lm_eval_model(handle)
    rows = []
    for prompt in args.formats.split(","):
        report = knowledge_qa(handle, "all", limit=args.limit, prompt=prompt, lm=lm)
        for task, result in report.items():
            m = result["metrics"]
            rows.append([prompt, task, f"{m['exact_match']:.3f}", f"{m['lm_eval_exact_match']:.3f}", result["items"],
                         result["seconds"], repr(result["predictions"][0])[:40]])
            print(rows[-1], flush=True)
    print(markdown_table(["prompt", "task", "EM (normalised, any answer)", "lm-eval EM", "items", "seconds",
                          "first answer"], rows))


if __name__ == "__main__":
    main()
