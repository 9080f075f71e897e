"""Recipes: parsing with clear errors, round trips, and a content hash that identifies a recipe."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe, format_model_rows, parse_model_rows

RAW = {
    "method": "ties",
    "base_model": "base",
    "models": [
        {"model": "a", "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
        {"model": "b", "parameters": {"weight": 1.0, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}},
    ],
    "parameters": {"lambda": 1.2},
    "options": {"normalize": True, "trim_scope": "tensor"},
    "seed": 7,
}


def test_round_trip_and_hash_are_stable() -> None:
    recipe = Recipe.from_dict(RAW)
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe
    assert again.content_hash() == recipe.content_hash()
    assert len(recipe.content_hash()) == 64
    assert recipe.models[0].parameters["weight"] == ParamValue.per_layer([0.2, 0.8])
    assert recipe.model_keys() == ["base", "a", "b"]


def test_hash_changes_with_any_value_and_ignores_key_order() -> None:
    base = Recipe.from_dict(RAW)
    reordered = Recipe.from_dict({k: RAW[k] for k in reversed(list(RAW))})
    assert reordered.content_hash() == base.content_hash()
    changed = dict(RAW, parameters={"lambda": 1.2000001})
    assert Recipe.from_dict(changed).content_hash() != base.content_hash()
    reseeded = dict(RAW, seed=8)
    assert Recipe.from_dict(reseeded).content_hash() != base.content_hash()


def test_models_may_be_bare_paths() -> None:
    recipe = Recipe.from_dict({"method": "linear", "models": ["x", "y"]})
    assert recipe.models == (ModelEntry("x", {}), ModelEntry("y", {}))
    assert recipe.base_model is None


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"models": ["a"]}, "recipe.method: missing"),
        ({"method": "linear"}, "recipe.models: expected a non-empty list"),
        ({"method": "linear", "models": [{"path": "a"}]}, "recipe.models[0]"),
        ({"method": "linear", "models": ["a"], "colour": 1}, "unknown keys ['colour']"),
        ({"method": "linear", "models": ["a"], "seed": 1.5}, "recipe.seed"),
        ({"method": "linear", "models": ["a"], "options": {"x": [1]}}, "recipe.options.x"),
        ({"method": "linear", "models": [{"model": "a", "parameters": {"weight": "heavy"}}]},
         "recipe.models[0].parameters.weight"),
    ],
)
def test_bad_recipes_name_the_field(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        Recipe.from_dict(raw)
    assert fragment in str(err.value)


def test_map_models_renames_the_models_the_rows_option_names() -> None:
    recipe = Recipe("qp", (ModelEntry("g2.1"), ModelEntry("sort")), base_model=BASE_KEY,
                    options={"rows": format_model_rows({"g2.1": ("add", "rev")}), "sequential": True})
    moved = recipe.map_models(lambda k: f"/models/{k}")
    assert [m.model for m in moved.models] == ["/models/g2.1", "/models/sort"]
    assert parse_model_rows(str(moved.options["rows"])) == {"/models/g2.1": ("add", "rev")}
    assert moved.options["sequential"] is True
    assert Recipe("qp", recipe.models, base_model=BASE_KEY).map_models(str).options == {}
