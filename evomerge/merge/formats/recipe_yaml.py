"""Reading and writing recipe files: evomerge or mergekit YAML (auto-detected), with paths made usable.

A recipe file's relative model paths are relative to the file's folder (so a recipe next to its models works
from any working directory); ``zoo:SIZE/...`` paths name models of the built-in demo zoo. Every error names
the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError
from evomerge.files import read_yaml
from evomerge.merge.formats.layer_stack import check_slice_ranges, config_layer_counts
from evomerge.merge.formats.mergekit import from_mergekit, is_mergekit_config, slice_layer_range, to_mergekit
from evomerge.merge.methods.registry import validate_recipe
from evomerge.merge.recipe import Recipe
from evomerge.models.adapter import join_ref, split_ref
from evomerge.models.layers import LayerMap
from evomerge.paths import resolve_path, scheme_of

RECIPE_FILE = "evomerge_recipe.yaml"  # the recipe written next to a merged model


def resolve_model_path(ref: str, folder: Path | None) -> str:
    """Scheme paths (``zoo:``) resolved, ``~`` expanded, relative paths against ``folder``; each side of a
    ``BASE+ADAPTER`` reference (mergekit's LoRA syntax) likewise."""
    base, model = split_ref(ref)
    if base is not None:
        return join_ref(resolve_model_path(base, folder), resolve_model_path(model, folder))
    if scheme_of(ref) is not None:
        return str(resolve_path(ref))
    p = Path(ref).expanduser()
    if not p.is_absolute() and folder is not None:
        p = folder / p
    return str(p.resolve()) if p.exists() else str(p)


def resolve_paths(recipe: Recipe, folder: Path | None) -> Recipe:
    """The recipe with every model reference resolved (see :func:`resolve_model_path`)."""
    def r(ref: str) -> str:
        return resolve_model_path(ref, folder)

    tok = recipe.tokenizer_source
    return dataclasses.replace(recipe.map_models(r), tokenizer_source=r(tok) if tok is not None else None)


def parse_recipe(data: Any, where: str, folder: Path | None = None, validate: bool = True) -> tuple[Recipe, str]:
    """A recipe from parsed YAML in either form; returns (recipe, "evomerge" | "mergekit")."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with 'method' (evomerge) or 'merge_method' (mergekit), "
                          f"got {type(data).__name__}")
    if is_mergekit_config(data):
        recipe, form = from_mergekit(data, where), "mergekit"
    elif "method" in data:
        recipe, form = Recipe.from_dict(data, where), "evomerge"
    else:
        raise ConfigError(f"{where}: neither an evomerge recipe ('method:') nor a mergekit config ('merge_method:')")
    recipe = resolve_paths(recipe, folder)
    if validate:
        validate_recipe(recipe, where)
        if recipe.slices:  # a stack's ranges against the models' layer counts, before any work
            check_slice_ranges(recipe, config_layer_counts(recipe), where)
    if form == "mergekit":
        _check_slice_range(data, recipe, where)
    return recipe, form


def _check_slice_range(data: dict[str, Any], recipe: Recipe, where: str) -> None:
    """A ``slices:`` config equals ``models:`` only when its one range is every layer of the models."""
    rng = slice_layer_range(data)
    if rng is None:
        return
    ref = recipe.base_model or split_ref(recipe.models[0].model)[0] or recipe.models[0].model
    cfg_path = Path(ref) / "config.json"
    if not cfg_path.is_file():
        return  # the model check reports the missing folder with its own message
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {cfg_path} to check slices.layer_range: {exc}") from None
    n = LayerMap.from_config(config).num_layers
    if rng != (0, n):
        raise ConfigError(
            f"{where}.slices[0].sources.layer_range: {list(rng)} does not cover every layer of {ref} "
            f"([0, {n}]); evomerge merges whole models"
        )


def load_recipe(path: str | os.PathLike[str], validate: bool = True) -> Recipe:
    """Read an evomerge recipe or a mergekit config (auto-detected), paths resolved from the file's folder."""
    return load_recipe_with_form(path, validate)[0]


def load_recipe_with_form(path: str | os.PathLike[str], validate: bool = True) -> tuple[Recipe, str]:
    """:func:`load_recipe` and which form the file was in ("evomerge" or "mergekit")."""
    p = Path(path)
    return parse_recipe(read_yaml(p, "recipe file"), str(p), p.resolve().parent, validate)


def recipe_yaml(recipe: Recipe) -> str:
    """The evomerge YAML of a recipe (what ``evomerge merge`` embeds in its output)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)


def mergekit_yaml(recipe: Recipe) -> str:
    """The mergekit YAML of a recipe; ConfigError when not expressible (see :func:`to_mergekit`)."""
    return yaml.safe_dump(to_mergekit(recipe), sort_keys=False, default_flow_style=None)
