"""llm-compressor's output (dense weights with zeros plus recipe.yaml): masks of exactly the targeted modules.

``recipe-wanda-2of4.yaml`` is the file llm-compressor 0.14 wrote after ``oneshot`` with
``WandaPruningModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])``."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml

import sparseforge as sf
from sparseforge.interop.llmcompressor import RecipeMaskError
from helpers import assert_clean_failure, run_cli

RECIPE = Path(__file__).parents[1] / "fixtures" / "llmcompressor" / "recipe-wanda-2of4.yaml"


def _pruned_dense(tmp_path: Path, pattern: str = "2:4", recipe: dict | None = None) -> Path:
    """A tiny Llama pruned by sparseforge and saved the way llm-compressor saves: plain transformers + recipe."""
    handle = sf.load_model("tiny-llama")
    sf.prune(handle, method="magnitude", pattern=pattern, sparsity=None if ":" in pattern else 0.5, progress=False)
    directory = tmp_path / "llmc"
    handle.model.save_pretrained(directory)
    handle.tokenizer.save_pretrained(directory)
    if recipe is None:
        shutil.copy2(RECIPE, directory / "recipe.yaml")
    else:
        (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return directory


def _recipe(**modifier) -> dict:
    args = {"sparsity": 0.5, "mask_structure": "2:4", "targets": ["Linear"], "ignore": ["re:.*lm_head"], **modifier}
    return {"default_stage": {"default_modifiers": {"SparseGPTModifier": args}}}


def test_the_real_recipe_gives_the_masks_of_every_targeted_linear(tmp_path):
    handle = sf.load_model(str(_pruned_dense(tmp_path)))
    views = {v.name: v for v in handle.adapter.linears()}
    assert handle.masks.keys() == views.keys()
    for name, mask in handle.masks.items():
        assert torch.equal(mask, views[name].weight.detach() != 0)
        assert int(mask.reshape(-1, 4).sum(dim=1).max()) <= 2


def test_only_targeted_modules_get_masks(tmp_path):
    directory = _pruned_dense(tmp_path, recipe=_recipe(ignore=["re:.*lm_head", "re:.*mlp.*"]))
    handle = sf.load_model(str(directory))
    assert handle.masks and all("self_attn" in name for name in handle.masks)


def test_a_container_class_as_target_covers_its_linears(tmp_path):
    directory = _pruned_dense(tmp_path, recipe=_recipe(targets=["LlamaDecoderLayer"], ignore=[]))
    assert len(sf.load_model(str(directory)).masks) == 14


def test_a_recipe_that_disagrees_with_the_zeros_names_the_modules(tmp_path, capsys, monkeypatch):
    directory = _pruned_dense(tmp_path, pattern="unstructured")  # 50% unstructured, but the recipe says 2:4
    with pytest.raises(RecipeMaskError, match=r"model\.layers\.0\.self_attn\.q_proj: groups of 4 with [34] kept"):
        sf.load_model(str(directory))
    code, _, err = run_cli(capsys, monkeypatch, "info", directory)
    assert_clean_failure(code, err, "disagrees with the zeros")


def test_a_targeted_module_without_zeros_is_a_disagreement(tmp_path):
    directory = _pruned_dense(tmp_path, recipe=_recipe(mask_structure="0:0", sparsity=0.5))
    model = sf.load_model(str(directory))  # fine as it is: 2:4 is 50% sparse
    assert len(model.masks) == 14
    dense = sf.load_model("tiny-llama")
    dense.model.save_pretrained(tmp_path / "dense")
    shutil.copy2(directory / "recipe.yaml", tmp_path / "dense" / "recipe.yaml")
    with pytest.raises(RecipeMaskError, match="no zeros"):
        sf.load_model(str(tmp_path / "dense"))


def test_zeros_without_a_recipe_are_masks_only_when_asked(tmp_path):
    directory = _pruned_dense(tmp_path)
    (directory / "recipe.yaml").unlink()
    assert not sf.load_model(str(directory)).masks
    assert len(sf.load_model(str(directory), masks_from_zeros=True).masks) == 14


def test_masks_from_zeros_on_a_model_without_zeros_is_an_error(capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "info", "tiny-llama", "--masks-from-zeros")
    assert_clean_failure(code, err, "no exact zeros")


def test_a_broken_recipe_is_a_clear_error(tmp_path):
    directory = _pruned_dense(tmp_path)
    (directory / "recipe.yaml").write_text("default_stage: [unclosed\n")
    with pytest.raises(RecipeMaskError, match="not valid YAML"):
        sf.load_model(str(directory))
