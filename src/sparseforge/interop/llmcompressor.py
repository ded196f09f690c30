"""Masks of a model pruned by llm-compressor, from the ``recipe.yaml`` it saves next to the weights.

llm-compressor 0.14 saves a pruned model dense (compressed-tensors no longer compresses sparsity), with exact zeros
and the recipe that made them. The recipe names which modules its sparsity modifiers targeted, so their zeros are
a mask and nobody else's are: only those modules get one, and their zeros are checked against what the recipe says
(the N:M pattern, or the sparsity) before they are believed.

Recipe layout: ``{stage: {group: {ModifierName: {arguments}}}}``. Targets and ignores follow compressed-tensors'
matching: ``re:<regex>`` matches module names from the start, anything else a module's exact name or class name.
llm-compressor's ``mask_structure: "N:M"`` prunes N of every M (keeps M - N); ``"0:0"`` is unstructured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..errors import SparseforgeError

RECIPE_FILE = "recipe.yaml"
SPARSITY_MODIFIERS = ("SparseGPTModifier", "WandaPruningModifier", "MagnitudePruningModifier",
                      "ConstantPruningModifier")
SPARSITY_TOLERANCE = 0.02  # exact zeros that pre-date pruning push a layer slightly above its target


class RecipeMaskError(SparseforgeError):
    """A ``recipe.yaml`` that cannot be read, or that disagrees with the zeros of the weights."""


@dataclass(frozen=True)
class SparsityModifier:
    name: str
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    sparsity: float | None  # None: per-layer values (a list, OWL) or a modifier that only keeps masks
    kept_of: tuple[int, int] | None  # (kept, group) for N:M structures, None for unstructured


def _as_list(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def _modifier(name: str, args: dict, source: str) -> SparsityModifier:
    structure = str(args.get("mask_structure", "0:0"))
    match = re.fullmatch(r"(\d+):(\d+)", structure)
    if not match:
        raise RecipeMaskError(f"{source}: {name} has mask_structure '{structure}', not 'N:M'")
    pruned, group = int(match[1]), int(match[2])
    sparsity = args.get("sparsity", args.get("final_sparsity"))
    return SparsityModifier(
        name=name, targets=_as_list(args.get("targets", ["Linear"])), ignore=_as_list(args.get("ignore")),
        sparsity=float(sparsity) if isinstance(sparsity, (int, float)) else None,
        kept_of=(group - pruned, group) if group else None)


def _walk(node, source: str, found: list[SparsityModifier]) -> None:
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in SPARSITY_MODIFIERS and isinstance(value, dict):
            found.append(_modifier(key, value, source))
        else:
            _walk(value, source, found)


def read_recipe(directory: Path) -> list[SparsityModifier] | None:
    """The sparsity modifiers of ``directory/recipe.yaml`` (None when there is no recipe or it prunes nothing)."""
    path = Path(directory) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        recipe = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeMaskError(f"{path} is not valid YAML: {(str(exc).splitlines() or ['?'])[0]}") from None
    found: list[SparsityModifier] = []
    _walk(recipe, str(path), found)
    return found or None


def _matches(name: str, class_name: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern in (name, class_name):
            return True
    return False


def _disagreement(modifier: SparsityModifier, mask: torch.Tensor) -> str | None:
    """What is wrong with ``mask`` as this modifier's result, or None."""
    if not bool((~mask).any()):
        return "no zeros"
    if modifier.kept_of is not None:
        kept, group = modifier.kept_of
        if mask.shape[1] % group:
            return f"{mask.shape[1]} inputs are not whole groups of {group}"
        most = int(mask.reshape(-1, group).sum(dim=1).max())
        return None if most <= kept else f"groups of {group} with {most} kept (the recipe keeps {kept})"
    if modifier.sparsity is not None:
        achieved = 1.0 - float(mask.float().mean())
        if achieved < modifier.sparsity - SPARSITY_TOLERANCE:
            return f"sparsity {achieved:.3f} (the recipe says {modifier.sparsity:.3f})"
    return None


def module_lineage(model: torch.nn.Module, name: str) -> tuple[tuple[str, str], ...]:
    """(name, class name) of the module ``name`` and of every module that contains it, outermost first: a target
    can name a container (``LlamaDecoderLayer``, ``re:.*mlp``), whose linears are then all pruned."""
    parts = name.split(".")
    paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return tuple((path, type(model.get_submodule(path)).__name__) for path in paths)


def recipe_masks(linears: dict[str, tuple[tuple[tuple[str, str], ...], torch.Tensor]],
                 modifiers: list[SparsityModifier], source: str) -> dict[str, torch.Tensor]:
    """{module name: mask} for the ``linears`` (the model's prunable linears: name -> (:func:`module_lineage`,
    weight as [out, in])) that a sparsity modifier targeted, each checked against the modifier; a disagreement
    names the modules and raises."""
    masks: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for modifier in modifiers:
        for name, (lineage, weight) in linears.items():
            targeted = any(_matches(path, class_name, modifier.targets) for path, class_name in lineage)
            if not targeted or _matches(name, lineage[-1][1], modifier.ignore):
                continue
            mask = (weight.detach() != 0).cpu()
            problem = _disagreement(modifier, mask)
            if problem is not None:
                problems.append(f"{name}: {problem}")
            masks[name] = mask
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise RecipeMaskError(f"{source}/{RECIPE_FILE} disagrees with the zeros of the weights it targets: {shown}")
    return masks
