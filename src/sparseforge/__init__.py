"""sparseforge: make LLMs smaller and faster through sparsity, and prove it with honest measurements.

The Python API mirrors the command line::

    import sparseforge as sf
    model = sf.load_model("default")               # or a Hub id, a local/exported directory, a .gguf, tiny-llama
    sf.prune(model, method="magnitude", sparsity=0.5, pattern="2:4")
    print(sf.evaluate(model, perplexity=True))
    sf.save_model(model, "out/model", format="auto")
    sf.run_recipe(sf.load_recipe("recipes/demo.yaml"), "runs/demo")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import SparseforgeError  # noqa: E402
from .export.saving import save_model  # noqa: E402
from .models.handle import LoadedModel  # noqa: E402
from .models.loading import load_model  # noqa: E402
from .prune.pruner import prune  # noqa: E402
from .recipe import Recipe, load_recipe, parse_recipe  # noqa: E402


def evaluate(model: LoadedModel, perplexity: bool = True, speed: bool = False, data: str = "default",
             seqlen: int = 512, windows: int | None = None, progress: bool = True, **speed_options) -> dict:
    """Measure ``model``: sparsity, parameters, and optionally perplexity (pinned protocol) and speed."""
    from .evaluation.suite import evaluate as _evaluate
    from .evaluation.suite import prepare_evaluation

    tokens, corpus = prepare_evaluation(model, data, seqlen, windows) if perplexity else (None, None)
    return _evaluate(model, tokens, corpus, speed=speed, speed_options=speed_options, progress=progress)


def run_recipe(recipe: Recipe | str, out_dir: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Run a recipe (object or YAML path) into the run directory ``out_dir``; returns the report."""
    from .pipeline import run_recipe as _run

    return _run(load_recipe(recipe) if isinstance(recipe, str) else recipe, out_dir, overwrite, progress)


__all__ = ["LoadedModel", "Recipe", "SparseforgeError", "evaluate", "load_model", "load_recipe", "parse_recipe",
           "prune", "run_recipe", "save_model", "__version__"]
