"""mergekit YAML for every method: round trips keep the recipe hash, layer slices in both forms, defaults that
differ between the tools made explicit, and refusals that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.merge.formats.mergekit import SHARED_METHODS, from_mergekit, to_mergekit
from evomerge.merge.formats.recipe_yaml import parse_recipe
from evomerge.merge.methods.registry import validate_recipe
from evomerge.merge.params import FilterEntry, ParamValue
from evomerge.merge.recipe import LayerSlice, ModelEntry, Recipe

PER_LAYER = [0.2, 0.9]
FILTERED = [{"filter": "mlp", "value": [0.3, 0.6]}, {"value": 0.5}]


def _m(name: str, **params: Any) -> dict[str, Any]:
    return {"model": name, "parameters": params}


# One expressible evomerge recipe per mergekit method, with the values mergekit requires written out.
RECIPES: dict[str, dict[str, Any]] = {
    "linear": {"models": [_m("a", weight=PER_LAYER), _m("b", weight=0.5)], "options": {"normalize": False}},
    "task_arithmetic": {"base_model": "base", "models": [_m("a", weight=1.0), _m("b", weight=FILTERED)],
                        "parameters": {"lambda": 0.7}},
    "ties": {"base_model": "base", "models": [_m("a", weight=1.0, density=0.3), _m("b", weight=0.5, density=PER_LAYER)]},
    "dare_ties": {"base_model": "base", "models": [_m("a", weight=1.0), _m("b", weight=0.5)],
                  "parameters": {"density": 0.4}, "options": {"rescale": "l1_norm"}},
    "dare_linear": {"base_model": "base", "models": [_m("a", weight=1.0, density=0.5), _m("b", weight=0.5, density=0.6)],
                    "options": {"rescale": "none"}},
    "slerp": {"base_model": "a", "models": [_m("a"), _m("b")], "parameters": {"t": FILTERED}},
    "breadcrumbs": {"base_model": "base", "models": [_m("a", weight=1.0, density=0.8, gamma=0.02), _m("b", weight=1.0,
                                                                                                 density=0.9)]},
    "breadcrumbs_ties": {"base_model": "base", "models": [_m("a", weight=1.0), _m("b", weight=1.0)],
                         "parameters": {"density": 0.7, "gamma": 0.05}},
    "model_stock": {"base_model": "base", "models": [_m("a"), _m("b"), _m("c")], "options": {"filter_wise": True}},
    "della": {"base_model": "base", "models": [_m("a", weight=1.0, density=0.5, epsilon=0.1),
                                               _m("b", weight=PER_LAYER, density=FILTERED)],
              "parameters": {"lambda": 1.2}, "options": {"rescale": "l1_norm", "normalize": False}},
    "della_linear": {"base_model": "base", "models": [_m("a", weight=1.0), _m("b", weight=0.5)],
                     "parameters": {"density": 0.6, "epsilon": 0.05}, "options": {"rescale": "l1_norm"}},
    "sce": {"base_model": "base", "models": [_m("a"), _m("b"), _m("c")], "parameters": {"select_topk": PER_LAYER}},
    "nuslerp": {"base_model": "base", "models": [_m("a", weight=1.0), _m("b", weight=PER_LAYER)],
                "options": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "multislerp": {"models": [_m("a", weight=1.0), _m("b", weight=2.0), _m("c", weight=FILTERED)],
                   "options": {"normalize_weights": False, "eps": 1e-6}},
    "karcher": {"models": [_m("a"), _m("b"), _m("c")], "options": {"max_iter": 20, "tol": 1e-6}},
    "nearswap": {"base_model": "base", "models": [_m("a")], "parameters": {"t": PER_LAYER}},
    "arcee_fusion": {"base_model": "base", "models": [_m("a")]},
    "ram": {"base_model": "base", "models": [_m("a"), _m("b")], "parameters": {"epsilon": 1e-4}},
    "ramplus_tl": {"base_model": "base", "models": [_m("a"), _m("b")],
                   "parameters": {"epsilon": 1e-4, "r": [0.1, 0.4], "alpha": 0.3}},
    "passthrough": {"slices": [{"model": "a", "layer_range": [0, 2]},
                               {"model": "b", "layer_range": [1, 3], "parameters": {"scale": FILTERED}},
                               {"model": "a", "layer_range": [2, 3], "parameters": {"scale": 0.5}}]},
}


def _recipe(method: str) -> Recipe:
    recipe = Recipe.from_dict({"method": method, **RECIPES[method]})
    validate_recipe(recipe)
    return recipe


def test_every_mergekit_method_has_a_round_trip_case() -> None:
    assert set(RECIPES) == set(SHARED_METHODS)
    assert len(SHARED_METHODS) == 20  # every method mergekit 0.1.5 registers


@pytest.mark.parametrize("method", SHARED_METHODS)
def test_round_trip_keeps_the_recipe_hash(method: str) -> None:
    recipe = _recipe(method)
    text = yaml.safe_dump(to_mergekit(recipe), sort_keys=False)
    back = from_mergekit(yaml.safe_load(text))
    assert back == recipe
    assert back.content_hash() == recipe.content_hash()
    validate_recipe(back)


def test_passthrough_slices_in_both_forms() -> None:
    mk = to_mergekit(_recipe("passthrough"))
    assert "models" not in mk
    assert mk["slices"][1] == {"sources": [{"model": "b", "layer_range": [1, 3], "parameters": {"scale": FILTERED}}]}
    r = _recipe("passthrough")
    assert r.models == (ModelEntry("a"), ModelEntry("b"))  # each sliced model once
    assert r.slices[2] == LayerSlice("a", 2, 3, {"scale": ParamValue.constant(0.5)})
    assert Recipe.from_dict(r.to_dict()) == r
    assert "slices" not in _recipe("ties").to_dict()  # recipes without slices keep their form and hash


def test_slice_parameters_apply_after_the_source_parameters() -> None:
    raw = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}]}}],
         "parameters": {"scale": 0.5}}]}
    r = from_mergekit(raw)
    scale = r.slices[0].parameters["scale"]
    assert scale == ParamValue((FilterEntry("o_proj", (0.0,)), FilterEntry(None, (0.5,))))
    assert scale.resolve("model.layers.0.self_attn.o_proj.weight", 0, 2) == 0.0
    assert scale.resolve("model.layers.0.mlp.up_proj.weight", 0, 2) == 0.5


def test_differing_defaults_are_made_explicit() -> None:
    # mergekit's density default is 1.0, evomerge's TIES default 0.2: a config without density means 1.0
    r = from_mergekit({"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]})
    assert r.parameters["density"] == ParamValue.constant(1.0)
    # a recipe relying on evomerge's defaults gets them written out for mergekit
    mk = to_mergekit(Recipe("della", (ModelEntry("a"),), base_model="base", options={"rescale": "l1_norm"}))
    assert mk["parameters"]["density"] == 0.5
    assert to_mergekit(Recipe("nearswap", (ModelEntry("a"),), base_model="base"))["parameters"] == {"t": 1e-4}
    # DELLA without rescale in mergekit restores the L1 norm; evomerge's default (the paper's) has no switch
    r = from_mergekit({"merge_method": "della", "base_model": "base", "models": [{"model": "a"}]})
    assert r.options["rescale"] == "l1_norm"
    with pytest.raises(ConfigError, match="inverse_probability"):
        to_mergekit(Recipe("della", (ModelEntry("a"),), base_model="base"))
    # numbers in YAML's exponent form without a dot are strings to PyYAML, numbers to mergekit
    r = from_mergekit(yaml.safe_load("merge_method: karcher\nmodels: [{model: a}, {model: b}]\n"
                                     "parameters: {tol: 1e-6, max_iter: 3}\n"))
    assert r.options == {"tol": 1e-6, "max_iter": 3}
    r = from_mergekit(yaml.safe_load("merge_method: ram\nbase_model: base\nmodels: [{model: a}]\n"
                                     "parameters: {epsilon: 1e-4}\n"))
    assert r.parameters["epsilon"] == ParamValue.constant(1e-4)


def test_a_base_that_the_method_ignores_is_left_out() -> None:
    mk = to_mergekit(Recipe("linear", (ModelEntry("a"), ModelEntry("b")), base_model="base"))
    assert "base_model" not in mk  # mergekit would add the base as a third input
    mk = to_mergekit(Recipe("karcher", (ModelEntry("a"), ModelEntry("b")), base_model="base"))
    assert mk["base_model"] == "base"  # karcher's base is one of the inputs, in both tools


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                                  {"model": "b", "layer_range": [0, 2]}]}]},
         r"slices\[0\].sources: method passthrough takes one source per slice, got 2"),
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}],
                                                     "residual_weight": 0.5}]}, "unknown keys"),
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2],
                                                                  "parameters": {"scale": True}}]}]},
         r"sources\[0\].parameters.scale: expected a number"),
        ({"merge_method": "sce", "base_model": "base", "models": [{"model": "a"}],
          "parameters": {"select_topk": [{"filter": "mlp", "value": "x"}]}}, r"parameters.select_topk"),
    ],
)
def test_refusals_name_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_recipe(raw, "cfg")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"method": "della", "base_model": "base", "models": [_m("a", densty=0.5)]},
         r"recipe.models\[0\].parameters.densty: unknown parameter for method della"),
        ({"method": "sce", "base_model": "base", "models": ["a"], "parameters": {"select_topk": 1.5}},
         r"select_topk = 1.5 outside \[0, 1\]"),
        ({"method": "karcher", "models": [_m("a", weight=-1.0), "b"]}, r"weight = -1.0 outside \[0, inf\]"),
        ({"method": "nuslerp", "models": ["a", "b", "c"]}, "needs exactly 2 input models"),
        ({"method": "nuslerp", "base_model": "base", "models": ["a"]}, "needs exactly 2 models besides the base"),
        ({"method": "nearswap", "base_model": "base", "models": ["a", "b"]}, "exactly 1 models besides the base"),
        ({"method": "sce", "base_model": "base", "models": ["a"], "options": {"base_given": True}},
         "set by the merge engine"),
        ({"method": "ties", "base_model": "base", "slices": [{"model": "a", "layer_range": [0, 2]}]},
         r"recipe.slices: method ties does not stack layers"),
        ({"method": "passthrough", "models": ["b"], "slices": [{"model": "a", "layer_range": [0, 2]}]},
         r"recipe.models: with slices, models lists each sliced model once"),
        ({"method": "passthrough", "slices": [{"model": "a", "layer_range": [0, 2], "parameters": {"sc": 1}}]},
         r"recipe.slices\[0\].parameters.sc: unknown parameter for method passthrough"),
        ({"method": "passthrough", "slices": [{"model": "a", "layer_range": [3, 3]}]},
         r"recipe.slices\[0\].layer_range: \[3, 3\] is empty"),
        ({"method": "passthrough", "slices": [{"model": "a", "layers": [0, 2]}]}, r"slices\[0\]: unknown keys"),
        ({"method": "passthrough", "models": ["a", "b"]}, "needs exactly 1 input models"),
    ],
)
def test_bad_recipes_name_field_and_value(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_recipe(Recipe.from_dict(data))


def test_slices_beyond_the_model_are_refused_when_the_recipe_is_read(tmp_path: Path) -> None:
    import json

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3}))
    raw = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(tmp_path / "a"),
                                                                   "layer_range": [2, 4]}]}]}
    with pytest.raises(ConfigError, match=r"cfg.slices\[0\].layer_range: \[2, 4\] of model .*a exceeds its 3 layers"):
        parse_recipe(raw, "cfg")


def test_a_base_listed_among_the_models_gets_no_weight() -> None:
    raw = {"merge_method": "nuslerp", "base_model": "base",
           "models": [{"model": "base"}, {"model": "a", "parameters": {"weight": 0.3}}, {"model": "b"}]}
    recipe = from_mergekit(raw)
    mk = to_mergekit(recipe)
    assert mk["models"][0] == {"model": "base"} and mk["models"][2]["parameters"] == {"weight": 1.0}
    assert to_mergekit(from_mergekit(mk)) == mk
