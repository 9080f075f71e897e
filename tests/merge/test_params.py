"""Per-layer parameter resolution: mergekit's gradient and filter semantics, hand-computed."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.params import ParamValue, interpolate, layer_position


@pytest.mark.parametrize(
    ("values", "layer", "num_layers", "expected"),
    [
        ((0.5,), 3, 8, 0.5),
        ((0.0, 1.0), 0, 5, 0.0),
        ((0.0, 1.0), 4, 5, 1.0),
        ((0.0, 1.0), 1, 5, 0.25),
        # u = 2/4 = 0.5, s = 0.5 * 4 = 2 -> exactly the middle entry
        ((0.0, 0.5, 0.3, 0.7, 1.0), 2, 5, 0.3),
        # u = 1/3, s = 4/3: 2/3 of the way from 0.5 to 0.3
        ((0.0, 0.5, 0.3, 0.7, 1.0), 1, 4, 0.5 + (0.3 - 0.5) / 3),
        # outside the layer stack (embeddings, final norm, head): u = 0, as mergekit 0.1.5
        ((0.2, 0.9), None, 4, 0.2),
    ],
)
def test_gradient_interpolation(values: tuple[float, ...], layer: int | None, num_layers: int, expected: float) -> None:
    assert interpolate(values, layer_position(layer, num_layers)) == pytest.approx(expected, abs=1e-12)


def test_single_layer_model_uses_the_last_value_like_mergekit() -> None:
    assert ParamValue.per_layer([0.1, 0.9]).resolve("model.layers.0.mlp.up_proj.weight", 0, 1) == pytest.approx(0.9)


def test_filters_first_match_wins_and_default_applies() -> None:
    value = ParamValue.parse(
        [
            {"filter": "self_attn", "value": [0.0, 1.0]},
            {"filter": "mlp", "value": 0.25},
            {"value": 0.5},
        ]
    )
    assert value.resolve("model.layers.3.self_attn.q_proj.weight", 3, 4) == pytest.approx(1.0)
    assert value.resolve("model.layers.1.mlp.down_proj.weight", 1, 4) == pytest.approx(0.25)
    assert value.resolve("model.norm.weight", None, 4) == pytest.approx(0.5)


def test_kind_filters_use_the_layer_map_kind() -> None:
    value = ParamValue.parse([{"filter": "kind:attention", "value": 0.9}, {"filter": "kind:mlp", "value": 0.1}])
    assert value.resolve("transformer.h.0.attn.c_attn.weight", 0, 2, tensor_kind="attention") == pytest.approx(0.9)
    assert value.resolve("transformer.h.0.mlp.c_fc.weight", 0, 2, tensor_kind="mlp") == pytest.approx(0.1)
    assert value.resolve("transformer.wte.weight", None, 2, tensor_kind="embedding") is None


@pytest.mark.parametrize("spec", [0.3, [0.1, 0.2, 0.7], [{"filter": "mlp", "value": [1.0, 2.0]}, {"value": 3.0}]])
def test_yaml_round_trip(spec: object) -> None:
    value = ParamValue.parse(spec)
    assert ParamValue.parse(value.to_yaml()) == value
    assert value.to_yaml() == spec


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (True, "expected a number"),
        ("0.5", "expected a number"),
        ([], "empty list"),
        ([{"filter": "mlp"}], "with 'value'"),
        ([{"filter": "mlp", "value": 1, "weight": 2}], "unknown keys"),
        ([{"filter": 3, "value": 1}], "filter: expected a string"),
    ],
)
def test_bad_values_name_the_field(spec: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match="models\\[0\\].parameters.weight") as err:
        ParamValue.parse(spec, "models[0].parameters.weight")
    assert fragment in str(err.value)
