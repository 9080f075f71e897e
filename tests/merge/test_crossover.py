"""The split-point crossover method: hand cases of the kernel, depths from the plan, identities, linear form."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.kernels.crossover import crossover, crossover_coefficients, crossover_weight, tensor_depth
from evomerge.merge.methods.registry import get_method, plan_recipe
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.models.layers import LayerMap

NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.layers.2.mlp.down_proj.weight", "model.layers.3.self_attn.o_proj.weight", "model.norm.weight",
         "lm_head.weight"]


def _recipe(boundary: float, w: float) -> Recipe:
    return Recipe("crossover", (ModelEntry("a"), ModelEntry("b")),
                  parameters={"boundary": ParamValue.constant(boundary), "w": ParamValue.constant(w)})


def test_depths_and_weights_by_hand() -> None:
    assert tensor_depth(None, 4, "embedding") == 0.0
    assert [tensor_depth(layer, 4, "attention") for layer in range(4)] == [0.125, 0.375, 0.625, 0.875]
    assert tensor_depth(None, 4, "head") == 1.0 and tensor_depth(None, 4, "norm") == 1.0
    assert crossover_weight(0.375, 0.5, 0.9) == 0.9
    assert crossover_weight(0.625, 0.5, 0.9) == pytest.approx(0.1)
    assert crossover_weight(0.5, 0.5, 0.7) == 0.7  # at the boundary: before it


def test_kernel_hand_case() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    # before the boundary: 0.75 a + 0.25 b
    out = crossover(None, [a, b], [{}, {}], {"boundary": 0.5, "w": 0.75}, {"depth": 0.25})
    torch.testing.assert_close(out, torch.tensor([1.5, 1.0]))
    # after it: 0.25 a + 0.75 b
    out = crossover(None, [a, b], [{}, {}], {"boundary": 0.5, "w": 0.75}, {"depth": 0.75})
    torch.testing.assert_close(out, torch.tensor([2.5, -1.0]))
    with pytest.raises(ValueError, match="depth"):
        crossover(None, [a, b], [{}, {}], {"boundary": 0.5, "w": 0.75}, {})
    with pytest.raises(ValueError, match="exactly 2"):
        crossover(None, [a, b, a], [{}, {}, {}], {}, {"depth": 0.1})


def _merge_all(boundary: float, w: float) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    plan = plan_recipe(_recipe(boundary, w), LayerMap.generic(4))
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in NAMES:
        a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
        out[name] = (plan.merge_tensor(name, None, [a, b]), a, b)
    return out


def test_identity_w_one_everywhere_is_model_a() -> None:
    for merged, a, _ in _merge_all(1.0, 1.0).values():
        torch.testing.assert_close(merged, a, rtol=0, atol=0)
    for merged, _, b in _merge_all(1.0, 0.0).values():  # weight 0 of A everywhere: model B
        torch.testing.assert_close(merged, b, rtol=0, atol=0)


def test_split_at_layer_granularity_through_the_plan() -> None:
    # boundary 0.5 of 4 layers: embedding, layers 0 and 1 before it (w = 1: A), layers 2, 3, norm, head after (B)
    out = _merge_all(0.5, 1.0)
    for name, (merged, a, b) in out.items():
        before = "embed" in name or ".layers.0." in name or ".layers.1." in name
        torch.testing.assert_close(merged, a if before else b, rtol=0, atol=0)
    # w = 0.5 is the plain average on both sides
    for merged, a, b in _merge_all(0.3, 0.5).values():
        torch.testing.assert_close(merged, 0.5 * (a + b))


def test_linear_form_matches_the_kernel() -> None:
    plan = plan_recipe(_recipe(0.4, 0.8), LayerMap.generic(4))
    assert get_method("crossover").positional and get_method("crossover").is_linear
    base = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    a, b = base + 1.0, base - 2.0
    for name in NAMES:
        c = plan.coefficients(name)
        assert c is not None
        via = c.beta * base + c.coefficients[0] * (a - base) + c.coefficients[1] * (b - base)
        torch.testing.assert_close(plan.merge_tensor(name, None, [a, b]), via)
    assert crossover_coefficients([{}, {}], {"boundary": 0.4, "w": 0.8}, {"depth": 0.9}).coefficients == \
        pytest.approx((0.2, 0.8))
