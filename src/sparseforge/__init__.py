"""sparseforge: make LLMs smaller and faster through sparsity, and prove it with honest measurements.

The Python API mirrors the command line::

    import sparseforge as sf
    model = sf.load_model("default")               # or a Hub id, a local/exported directory, a .gguf, tiny-llama
    sf.prune(model, method="magnitude", sparsity=0.5, pattern="2:4")
    sf.retrain(model, method="perp", params=["norm", "lora"], lora={"variant": "mask"}, steps=100)
    sf.shrink(dense, ffn=0.25, heads=0.25)          # physically smaller: FFN neurons and heads removed
    sf.finercut(dense, remove=0.25)                 # whole attention / FFN sub-layers removed, greedily
    sf.calibrate_skip(dense, target=0.25)           # FFN blocks skipped per token while decoding
    sf.factorize(other, experts=4, topk=1)          # FFNs split into routed experts (FactorLLM), trained
    sf.search(dense, sf.SearchConfig(algorithm="evopress", target=0.7))   # per-block sparsity, searched
    sf.continual(sf.ContinualConfig(density=0.2, init="erk", growth="gradient"), "runs/cl", seeds=3)
    sf.DynamicSparsity.install(any_module, sf.DSTConfig(density=0.2, method="rigl")).attach(optimizer)
    sf.sparse_train_lm(sf.load_model("tiny-llama"), method="set", density=0.5, steps=200)   # DST of an LM
    print(sf.generate(dense, "The capital of France is")["texts"])
    print(sf.evaluate(model, perplexity=True))
    sf.save_model(model, "out/model", format="auto")
    sf.export_model(shrunk, "out/shrunk.gguf", format="gguf", gguf_type="q8_0")   # for llama.cpp
    sf.run_recipe(sf.load_recipe("recipes/demo.yaml"), "runs/demo")
"""

from __future__ import annotations

from .version import __version__  # noqa: E402

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models.handle import LoadedModel
    from .recipe import Recipe

# name -> (module, attribute). Resolved on first use (PEP 562), so ``import sparseforge`` and the command line start
# without importing torch, transformers and every method package up front.
_LAZY = {
    "ContinualConfig": (".dst", "ContinualConfig"), "DSTConfig": (".dst", "DSTConfig"),
    "DynamicSparsity": (".dst", "DynamicSparsity"), "SparseTrainConfig": (".dst", "SparseTrainConfig"),
    "continual": (".dst", "continual"), "sparse_train_lm": (".dst", "sparse_train_lm"),
    "train_sparse": (".dst", "train_sparse"), "SparseforgeError": (".errors", "SparseforgeError"),
    "save_model": (".export.saving", "save_model"), "export_model": (".export.exporting", "export_model"),
    "LoadedModel": (".models.handle", "LoadedModel"),
    "factorize": (".moe", "factorize_model"), "install_runtime": (".runtime", "install_runtime"),
    "prune": (".prune.pruner", "prune"), "prune_streamed": (".streaming.prune", "prune_streamed"), "Recipe": (".recipe", "Recipe"), "load_recipe": (".recipe", "load_recipe"),
    "parse_recipe": (".recipe", "parse_recipe"), "retrain": (".retrain.recovery", "retrain"),
    "SearchConfig": (".search", "SearchConfig"), "run_search": (".search", "run_search"),
    "search": (".search", "search"), "calibrate_skip": (".skip", "calibrate_skip"), "generate": (".skip", "generate"),
    "finercut": (".structured", "finercut"), "remove_blocks": (".structured", "remove_blocks"),
    "shrink": (".structured", "shrink"),
}


class _PublicApi(types.ModuleType):
    """Keeps the API's functions ahead of subpackages of the same name (``prune``, ``retrain``, ``search``): the
    import system binds a subpackage as an attribute of its parent when it first loads it, which would otherwise
    replace ``sparseforge.prune`` the function with ``sparseforge.prune`` the package."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PublicApi


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sparseforge' has no attribute '{name}'")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value


def load_model(source: str = "default", *args, runtime: str | None = None, runtime_dtype: str | None = None,
               **kwargs) -> "LoadedModel":
    """Load a model (see :func:`sparseforge.models.loading.load_model` for ``source`` and the options) and, with
    ``runtime`` ("sparse", "dense" or "auto"), put it in the CPU sparse-weight runtime for inference
    (:func:`sparseforge.runtime.install_runtime`; ``runtime_dtype``: "float16" or "bfloat16" weights)."""
    from .models.loading import load_model as load

    handle = load(source, *args, **kwargs)
    if runtime is not None:
        from .runtime import install_runtime

        install_runtime(handle, runtime, values_dtype=runtime_dtype)
    return handle


def evaluate(model: "LoadedModel", perplexity: bool = True, speed: bool = False, data: str = "default",
             seqlen: int = 512, windows: int | None = None, tasks: str | list[str] | None = None,
             qa: str | list[str] | None = None, limit: int | None = None, qa_prompt: str = "plain-5shot",
             baseline: "LoadedModel | None" = None, progress: bool = True, **speed_options) -> dict:
    """Measure ``model`` like ``sparseforge eval``: sparsity, parameters, and optionally perplexity (pinned protocol),
    zero-shot ``tasks`` and knowledge ``qa`` through lm-eval (``limit`` items each), and speed (``speed_options``:
    batch_size, prompt_len, new_tokens, repeats, threads).

    Returns the model's metrics. With a ``baseline`` (the dense model), it is measured first with the same settings,
    its metrics are returned under ``"baseline"``, QA answers are compared with its answers, and speed is measured
    alternately with it.
    """
    from .evaluation.session import EvalSettings, evaluate_session
    from .evaluation.tasks import QA_TASKS, ZERO_SHOT_TASKS, parse_task_names

    renamed = {"batch_size": "speed_batch_size", "prompt_len": "speed_prompt_tokens", "new_tokens": "speed_new_tokens",
               "repeats": "speed_repeats", "threads": "speed_threads"}
    settings = EvalSettings(perplexity=perplexity, data=data, seqlen=seqlen, windows=windows, limit=limit,
                            tasks=parse_task_names(tasks, ZERO_SHOT_TASKS) if tasks else [],
                            qa=parse_task_names(qa, QA_TASKS) if qa else [], qa_prompt=qa_prompt, speed=speed,
                            **{renamed.get(k, k): v for k, v in speed_options.items()})
    report = evaluate_session(model, settings, baseline, progress=progress)
    metrics = report["metrics"]["after"]
    if baseline is not None:
        metrics["baseline"] = report["metrics"]["before"]
    return metrics


def run_recipe(recipe: "Recipe | str", out_dir: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Run a recipe (object or YAML path) into the run directory ``out_dir``; returns the report."""
    from .pipeline import run_recipe as _run

    from .recipe import load_recipe

    return _run(load_recipe(recipe) if isinstance(recipe, str) else recipe, out_dir, overwrite, progress)


__all__ = ["ContinualConfig", "DSTConfig", "DynamicSparsity", "LoadedModel", "Recipe", "SearchConfig",
           "SparseTrainConfig", "run_search", "search",
           "SparseforgeError", "calibrate_skip", "continual", "evaluate", "factorize", "finercut", "generate",
           "sparse_train_lm", "train_sparse",
           "install_runtime", "load_model", "load_recipe",
           "parse_recipe", "prune", "prune_streamed", "remove_blocks", "retrain", "run_recipe", "save_model", "shrink", "__version__"]
