"""Shared set-up printing for benchmark scripts: every result says how it was measured."""

from __future__ import annotations

import json
import platform
import sys

import torch
import transformers

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def print_setup(**settings) -> dict:
    setup = {**settings, "threads": torch.get_num_threads(), "torch": torch.__version__,
             "python": sys.version.split()[0], "machine": platform.machine(), "processor": platform.processor()}
    print("setup: " + json.dumps(setup))
    return setup


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
