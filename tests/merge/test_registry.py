"""Registry: duplicates refused, recipe validation errors, per-tensor parameter resolution, generators."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.builtin import BY_NAME
from evomerge.merge.methods.registry import REGISTRY, get_method, validate_recipe
from evomerge.merge.methods.resolve import plan_inputs, resolve_tensor_params, tensor_generator
from evomerge.merge.methods.spec import MergeMethod, Registry
from evomerge.merge.recipe import Recipe

BUILTIN_METHODS = tuple(BY_NAME)  # the plain methods' names


def _recipe(**data: Any) -> Recipe:
    data.setdefault("models", [{"model": "a"}, {"model": "b"}])
    return Recipe.from_dict(data)


def test_duplicate_names_are_refused() -> None:
    reg = Registry()
    m = MergeMethod("x", lambda *a: torch.zeros(1))
    reg.register(m)
    with pytest.raises(ValueError, match="already registered"):
        reg.register(m)
    with pytest.raises(ValueError, match="already registered"):
        REGISTRY.register(MergeMethod("ties", lambda *a: torch.zeros(1)))


def test_unknown_method_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="unknown merge method 'tie'.*ties"):
        get_method("tie")
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "breadcrumbs",
            "model_stock"} <= set(BUILTIN_METHODS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"method": "ties", "base_model": "base", "parameters": {"density": 1.5}},
         r"recipe.parameters.density: density = 1.5 outside \[0, 1\]"),
        ({"method": "ties", "base_model": "base", "parameters": {"density": [0.2, 1.2]}},
         r"recipe.parameters.density\[1\]: density = 1.2 outside"),
        ({"method": "ties", "base_model": "base",
          "parameters": {"density": [{"filter": "mlp", "value": -0.1}, {"value": 0.5}]}},
         r"density\[0\] \(filter 'mlp'\): density = -0.1"),
        ({"method": "ties", "base_model": "base",
          "models": [{"model": "a", "parameters": {"density": [0.1, 2.0]}}]},
         r"recipe.models\[0\].parameters.density\[1\]: density = 2.0"),
        ({"method": "ties"}, r"recipe.base_model: method ties needs a base model"),
        ({"method": "slerp", "models": ["a", "b", "c"]}, r"needs exactly 2 input models, got 3"),
        ({"method": "slerp", "base_model": "a", "models": ["a", "b", "c"]}, r"needs exactly 2"),
        ({"method": "model_stock", "base_model": "base", "models": ["a"]}, r"at least 2 models besides the base"),
        ({"method": "ties", "base_model": "base", "parameters": {"densty": 0.5}},
         r"recipe.parameters.densty: unknown parameter for method ties"),
        ({"method": "slerp", "models": [{"model": "a", "parameters": {"t": 0.3}}, {"model": "b"}]},
         r"models\[0\].parameters.t: t is a global parameter"),
        ({"method": "ties", "base_model": "base", "options": {"sign_rule": "vote"}},
         r"options.sign_rule: sign_rule = 'vote' is not one of"),
        ({"method": "linear", "options": {"normalize": "yes"}}, r"normalize = 'yes' must be true or false"),
        ({"method": "ties", "base_model": "base", "options": {"global_threshold": 0.1}},
         r"set by the merge engine"),
        ({"method": "ties", "base_model": "base", "options": {"trim_scope": "global"},
          "parameters": {"density": [0.1, 0.3]}}, r"trim_scope global needs one constant density"),
        ({"method": "linear", "parameters": {"weight": float("nan")}}, r"not a finite number"),
    ],
)
def test_validation_errors_name_field_and_value(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_recipe(_recipe(**data))


def test_valid_recipes_pass() -> None:
    assert validate_recipe(_recipe(method="ties", base_model="base", parameters={"density": [0.1, 0.9]})).name == "ties"
    assert validate_recipe(_recipe(method="slerp", base_model="a", parameters={"t": [0, 0.5, 1]})).name == "slerp"


def test_resolution_precedence_per_model_over_global_over_default() -> None:
    r = _recipe(
        method="ties",
        base_model="base",
        models=[{"model": "a", "parameters": {"density": [0.1, 0.5]}}, {"model": "b"}, {"model": "base"}],
        parameters={"weight": [{"filter": "kind:attention", "value": 2.0}, {"value": 0.5}], "lambda": [1.0, 3.0]},
    )
    per, glob = resolve_tensor_params(r, get_method("ties"), "model.layers.2.self_attn.q_proj.weight", 2, 5, "attention")
    assert len(per) == 2  # the base listed among models is not an input
    assert per[0] == {"weight": 2.0, "density": pytest.approx(0.3)}  # u = 0.5 on [0.1, 0.5]
    assert per[1] == {"weight": 2.0, "density": 0.2}  # ties' default density
    assert glob["lambda"] == pytest.approx(2.0)
    per, glob = resolve_tensor_params(r, get_method("ties"), "model.embed_tokens.weight", None, 5, "embedding")
    assert per[1]["weight"] == 0.5 and per[0]["density"] == pytest.approx(0.1) and glob["lambda"] == 1.0


def test_slerp_base_is_the_first_input() -> None:
    r = _recipe(method="slerp", base_model="b", models=["a", "b"], parameters={"t": [0.0, 1.0]})
    assert plan_inputs(r, get_method(r.method)).models == ("b", "a")
    _, glob = resolve_tensor_params(r, get_method(r.method), "model.layers.3.mlp.up_proj.weight", 3, 4)
    assert glob["t"] == pytest.approx(1.0)


def test_tensor_generator_is_deterministic_per_name() -> None:
    a = torch.rand(5, generator=tensor_generator(7, "x"))
    assert torch.equal(a, torch.rand(5, generator=tensor_generator(7, "x")))
    assert not torch.equal(a, torch.rand(5, generator=tensor_generator(7, "y")))
    assert not torch.equal(a, torch.rand(5, generator=tensor_generator(8, "x")))


@pytest.mark.parametrize("name", REGISTRY.names())
def test_every_method_describes_itself(name: str) -> None:
    """Every registered method (plain, extended, data-aware): documented, defaults within their bounds."""
    d = get_method(name).describe()
    assert d["doc"] and d["name"] == name
    for p in d["parameters"]:
        assert p["doc"]
        if p["default"] is not None:  # None: given by the recipe or supplied by the caller (mergeability's base_score)
            assert p["lower"] is None or p["lower"] <= p["default"]
            assert p["upper"] is None or p["default"] <= p["upper"]
