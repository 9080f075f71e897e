"""mergekit YAML <-> evomerge recipes: field mapping, round trips, and refusals of what cannot be expressed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.merge.formats.mergekit import from_mergekit, is_mergekit_config, to_mergekit
from evomerge.merge.formats.recipe_yaml import load_recipe, load_recipe_with_form, parse_recipe
from evomerge.merge.params import FilterEntry, ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe

TIES_MK = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [
        {"model": "a", "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
        {"model": "b", "parameters": {"weight": 1.0, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}},
    ],
    "parameters": {"normalize": False, "int8_mask": True, "lambda": 1.5},
    "dtype": "bfloat16",
}


def test_models_form_maps_numbers_to_parameters_and_switches_to_options() -> None:
    r = from_mergekit(TIES_MK)
    assert r.method == "ties" and r.base_model == "base" and r.dtype == "bfloat16"
    assert [m.model for m in r.models] == ["a", "b"]
    assert r.models[0].parameters["weight"] == ParamValue.per_layer([0.2, 0.8])
    assert r.models[1].parameters["density"] == ParamValue(
        (FilterEntry("mlp", (0.3,)), FilterEntry(None, (0.6,)))
    )
    assert r.parameters == {"lambda": ParamValue.constant(1.5)}
    assert r.options == {"normalize": False}  # int8_mask dropped: memory only
    assert is_mergekit_config(TIES_MK) and not is_mergekit_config({"method": "ties"})


def test_round_trip_evomerge_to_mergekit_and_back() -> None:
    recipe = from_mergekit(TIES_MK)
    mk = to_mergekit(recipe)
    assert mk["merge_method"] == "ties"
    assert mk["parameters"] == {"normalize": False, "lambda": 1.5}
    assert mk["models"][1]["parameters"]["density"] == [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]
    assert from_mergekit(mk) == recipe
    # and through YAML text
    assert from_mergekit(yaml.safe_load(yaml.safe_dump(mk))) == recipe


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "slerp", "breadcrumbs", "model_stock"])
def test_round_trip_every_shared_method(method: str) -> None:
    params = {"linear": {}, "task_arithmetic": {"lambda": 0.7}, "slerp": {"t": [0.0, 0.5, 1.0]},
              "breadcrumbs": {}, "model_stock": {}}[method]
    per_model = {"linear": {"weight": 0.3}, "task_arithmetic": {"weight": [1.0, 0.0]}, "slerp": {},
                 "breadcrumbs": {"density": 0.8, "gamma": 0.02}, "model_stock": {}}[method]
    models = ({"model": "a", "parameters": per_model} if per_model else {"model": "a"}), {"model": "b"}
    raw = {"merge_method": method, "base_model": "base", "models": list(models)}
    if method == "model_stock":
        raw["models"].append({"model": "c"})
    if params:
        raw["parameters"] = params
    recipe = from_mergekit(raw)
    mk = to_mergekit(recipe)
    back = from_mergekit(mk)
    assert to_mergekit(back) == mk  # a fixed point
    if method in ("linear", "task_arithmetic", "breadcrumbs"):  # mergekit needs every weight: made explicit
        assert back.models[1].parameters["weight"] == ParamValue.constant(1.0)
        assert back.models[0] == recipe.models[0] if "weight" in per_model else True
    else:
        assert back == recipe


def test_dare_rescale_follows_mergekit_default() -> None:
    raw = {"merge_method": "dare_ties", "base_model": "base",
           "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}}]}
    assert from_mergekit(raw).options["rescale"] == "l1_norm"  # mergekit rescales DARE by the L1 norm
    raw["parameters"] = {"rescale": False}
    assert from_mergekit(raw).options["rescale"] == "none"
    ev = Recipe("dare_ties", (ModelEntry("a"),), base_model="base")  # evomerge default: divide by density
    with pytest.raises(ConfigError, match="inverse_density"):
        to_mergekit(ev)
    mk = to_mergekit(Recipe("dare_ties", (ModelEntry("a"),), base_model="base", options={"rescale": "l1_norm"}))
    assert mk["parameters"] == {"rescale": True, "density": 0.5}  # evomerge's default density, written out


def test_single_slice_equals_models_form() -> None:
    raw = {
        "merge_method": "slerp", "base_model": "a",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 3]}, {"model": "b", "layer_range": [0, 3]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]},
    }
    r = from_mergekit(raw)
    assert [m.model for m in r.models] == ["a", "b"]
    assert r.parameters["t"].resolve("model.layers.2.self_attn.q_proj.weight", 2, 3) == 1.0
    assert r.parameters["t"].resolve("model.layers.2.mlp.up_proj.weight", 2, 3) == 0.5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"merge_method": "della_ties"}, "no evomerge equivalent"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                     {"sources": [{"model": "a", "layer_range": [2, 3]}]}], "models": None}, "2 slices"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 3]}, {"model": "b", "layer_range": [1, 3]}]}],
          "models": None}, r"\[1, 3\] gives 2 layers but sources\[0\] gives 3"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [1, 3]}, {"model": "b", "layer_range": [1, 3]}]}],
          "models": None}, "same full layer range"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [2, 1]}]}], "models": None}, "empty or negative"),
        ({"models": [{"model": "a+lora/x+lora/y"}]}, "BASE\\+ADAPTER"),
        ({"tokenizer_source": "union"}, "union"),
        ({"parameters": {"normalize": [True, False]}}, "one constant"),
        ({"models": [{"model": "a", "parameters": {"normalize": True}}]}, "switch"),
        ({"modules": {"x": {}}}, "modules"),
        ({"wat": 1}, "unknown mergekit keys"),
    ],
)
def test_refuses_what_evomerge_cannot_express(change: dict, message: str) -> None:
    raw = {"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}]}
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        from_mergekit(raw)


def test_lora_references_are_read() -> None:
    """mergekit's MODEL+LORA is evomerge's BASE+ADAPTER reference (the merge reads the adapter over MODEL)."""
    recipe = from_mergekit({"merge_method": "ties", "base_model": "base", "models": [{"model": "base+lora/x"}]})
    assert recipe.models[0].model == "base+lora/x"


def test_to_mergekit_refuses_evomerge_only_features() -> None:
    kind = Recipe("ties", (ModelEntry("a", {"density": ParamValue((FilterEntry("kind:mlp", (0.3,)),))}),),
                  base_model="base")
    with pytest.raises(ConfigError, match="kind"):
        to_mergekit(kind)
    for opt, val in (("trim_scope", "global"), ("sign_rule", "majority_count"), ("variant", "paper")):
        r = Recipe("ties", (ModelEntry("a"),), base_model="base", options={opt: val})
        with pytest.raises(ConfigError, match=opt):
            to_mergekit(r)
    with pytest.raises(ConfigError, match="no mergekit equivalent"):
        to_mergekit(Recipe("qp", (ModelEntry("a"),), base_model="base"))


def test_recipe_files_resolve_relative_paths_and_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").mkdir()
    f = tmp_path / "sub" / "r.yaml"
    f.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                                    {"model": "/abs/b"}]}))
    recipe, form = load_recipe_with_form(f)
    assert form == "mergekit"
    assert recipe.models[0].model == str((tmp_path / "sub" / "a").resolve())
    assert recipe.models[1].model == "/abs/b"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ties\nmodels: [a\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*line"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    dens = tmp_path / "dens.yaml"
    dens.write_text(yaml.safe_dump({"method": "ties", "base_model": "b",
                                    "models": [{"model": "a", "parameters": {"density": 1.5}}]}))
    with pytest.raises(ConfigError, match=r"dens\.yaml.*density = 1\.5"):
        load_recipe(dens)
    with pytest.raises(ConfigError, match="neither"):
        parse_recipe({"foo": 1}, "x")


def test_zoo_paths_go_through_the_zoo_resolver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import evomerge.zoo.build as zoo

    seen: list[str] = []

    def fake(rest: str) -> Path:
        seen.append(f"zoo:{rest}")
        return tmp_path / rest.split("/", 1)[1]

    monkeypatch.setattr(zoo, "resolve", fake)  # the zoo: scheme of evomerge.paths
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({"method": "linear", "models": ["zoo:micro/add", "local"]}))
    recipe = load_recipe(f, validate=False)
    assert seen == ["zoo:micro/add"]
    assert recipe.models[0].model == str(tmp_path / "add")
    assert recipe.models[1].model == str(tmp_path / "local")
