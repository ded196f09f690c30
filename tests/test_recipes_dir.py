"""Every example recipe in recipes/ parses, and runs end to end (on a tiny model, with a capped evaluation)."""

from pathlib import Path

import pytest

from sparseforge.models.loading import load_model
from sparseforge.pipeline import run_recipe
from sparseforge.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_example_recipes():
    assert any(p.name == "demo.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_example_recipe_runs(path, tmp_path):
    recipe = load_recipe(path)
    if not recipe.model.startswith("tiny-"):  # the real-model recipes run here on a tiny stand-in
        recipe = recipe.model_copy(update={"model": "tiny-llama"})
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"eval_windows": 2, "seqlen": 64})})
    if recipe.evaluate.tasks or recipe.evaluate.qa:  # the task machinery is tested elsewhere; two items show it runs
        recipe = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"limit": 2})})
    report = run_recipe(recipe, tmp_path / "run", progress=False)
    assert report["metrics"]["after"]["perplexity"]["windows"] == 2
    for stage in recipe.stages:
        if stage.kind == "prune":
            assert report["sparsity"]["overall"] > 0
    if recipe.export is not None:
        reloaded = load_model(str(tmp_path / "run"))
        assert set(reloaded.masks) == {row["name"] for row in report["sparsity"]["per_layer"] if row["zeros"]}
