import pytest

from sparseforge.errors import RecipeError
from sparseforge.recipe import load_recipe, parse_recipe


def test_issue_example_recipe_parses(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("""
model: tiny-llama
data: {calibration: default, evaluation: default, seqlen: 512, nsamples: 64, seed: 0}
stages:
  - prune: {method: magnitude, sparsity: 0.5, pattern: "2:4"}
evaluate: {perplexity: true}
export: {format: auto}
""")
    recipe = load_recipe(path)
    assert recipe.stages[0].kind == "prune"
    assert recipe.stages[0].config.pattern == "2:4"
    assert parse_recipe(__import__("yaml").safe_load(recipe.to_yaml())) == recipe


@pytest.mark.parametrize("data,message", [
    ({"model": "x", "stages": [{"prune": {"sparsty": 0.5}}]}, "unknown key 'stages.0.prune.sparsty'"),
    ({"model": "x", "stages": [{"prnue": {}}]}, "unknown key 'stages.0.prnue'"),
    ({"model": "x", "evaluation": {}}, "unknown key 'evaluation'"),
    ({"model": "x", "data": {"seqlen": "long"}}, "data.seqlen"),
    ({"model": "x", "stages": [{"prune": {"sparsity": 1.5}}]}, r"\[0, 1\)"),
    ({"model": "x", "stages": [{"prune": {"pattern": "4:2"}}]}, "0 < N < M"),
    ({"model": "x", "stages": [{"prune": {"method": "nope", "sparsity": 0.5}}]}, "unknown method"),
    ({"model": "x", "stages": [{}]}, "exactly one"),
    ({"model": "x", "export": {"format": "zip"}}, "export.format"),
    ({"stages": []}, "model"),
    ({"model": "x", "stages": [{"retrain": {"method": "lora"}}]}, "stages.0.retrain.method"),
    ({"model": "x", "stages": [{"retrain": {"params": ["weights"]}}]}, "stages.0.retrain.params"),
    ({"model": "x", "stages": [{"retrain": {"lora": {"variant": "dora"}}}]}, "stages.0.retrain.lora.variant"),
    ({"model": "x", "stages": [{"retrain": {"lora": {"rnak": 4}}}]}, "unknown key 'stages.0.retrain.lora.rnak'"),
    ({"model": "x", "stages": [{"retrain": {"steps": 0}}]}, "stages.0.retrain.steps"),
    ({"model": "x", "stages": [{"retrain": {"method": "reconstruct"}}]}, "must directly follow a prune stage"),
    ({"model": "x", "stages": [{"prune": {"sparsity": 0.5}},
                               {"retrain": {"method": "reconstruct", "lora": {"variant": "plain"}}}]}, "dense"),
    (["not", "a", "mapping"], "mapping"),
])
def test_bad_recipes_name_the_problem(data, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_yaml_errors_are_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError):
        load_recipe(path)
