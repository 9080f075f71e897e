"""Cross-check against mergekit 0.1.5: whole tiny-Llama merges, every tensor within 1e-5 in float32."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.tiny_models import load_state

from evomerge.merge.methods.registry import validate_recipe
from evomerge.merge.methods.resolve import plan_inputs, resolve_tensor_params, tensor_generator
from evomerge.merge.recipe import Recipe

mergekit_config = pytest.importorskip("mergekit.config", reason="mergekit not installed: oracle cross-check skipped")
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

NUM_LAYERS = 3
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Layer index of a Llama tensor name (a test-local stand-in for evomerge.models.LayerMap)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def kind_of(name: str) -> str:
    if "self_attn" in name:
        return "attention"
    return "mlp" if ".mlp." in name else "other"
T_ATTN = [0.0, 0.5, 0.3, 0.7, 1.0]
T_MLP = [1.0, 0.7, 0.3, 0.5, 0.0]


CASES: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear", "weights": [[0.2, 0.9], 0.5, 1.0], "params": {}},
    "task_arithmetic": {"method": "task_arithmetic", "weights": [0.5, [0.1, 0.8], 0.3], "params": {"lambda": 1.4}},
    "ties": {"method": "ties", "weights": [0.6, 1.0, [0.3, 1.2]], "density": [0.3, [0.2, 0.7], 0.5], "params": {}},
    "dare_ties_density1": {"method": "dare_ties", "weights": [0.6, 1.0, 0.4], "density": [1.0, 1.0, 1.0], "params": {}},
    "breadcrumbs": {"method": "breadcrumbs", "weights": [0.6, 1.0, 0.4], "density": [0.8, 0.9, 0.7],
                    "gamma": [0.05, 0.01, 0.1], "params": {}},
    "slerp_layers": {"method": "slerp", "params": {"t": [0.1, 0.6, 0.9]}},
    "slerp_filtered": {"method": "slerp", "params": {"t": [{"filter": "self_attn", "value": T_ATTN},
                                                           {"filter": "mlp", "value": T_MLP}, {"value": 0.5}]}},
}


def _mergekit_config(case: dict[str, Any], paths: list[Path]) -> dict[str, Any]:
    method = case["method"]
    if method == "slerp":
        models = [{"model": str(paths[0])}, {"model": str(paths[2])}]
    else:
        models = []
        for i, p in enumerate(paths[1:]):
            params: dict[str, Any] = {"weight": case["weights"][i]}
            for key in ("density", "gamma"):
                if key in case:
                    params[key] = case[key][i]
            models.append({"model": str(p), "parameters": params})
    conf: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32",
                            "parameters": dict(case["params"])}
    if method != "linear":
        conf["base_model"] = str(paths[0])
    return conf


def _evomerge_recipe(conf: dict[str, Any]) -> Recipe:
    params = dict(conf["parameters"])
    options: dict[str, Any] = {}
    return Recipe.from_dict({
        "method": conf["merge_method"],
        "base_model": conf.get("base_model"),
        "models": conf["models"],
        "parameters": params,
        "options": options,
    })


@pytest.mark.parametrize("case_name", list(CASES))
def test_every_tensor_matches_mergekit(case_name: str, tiny_llamas: list[Path], tmp_path: Path) -> None:
    conf = _mergekit_config(CASES[case_name], tiny_llamas)
    out = tmp_path / "mergekit_out"
    run_merge(
        mergekit_config.MergeConfiguration.model_validate(conf), str(out),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    expected = load_state(out)
    recipe = _evomerge_recipe(conf)
    method = validate_recipe(recipe)
    plan = plan_inputs(recipe, method)
    inputs = {str(p): load_state(p) for p in tiny_llamas}
    assert expected, "mergekit wrote no tensors"
    for name, want in expected.items():
        per_model, glob = resolve_tensor_params(recipe, method, name, layer_of(name), NUM_LAYERS, kind_of(name))
        base = inputs[plan.base][name] if plan.base else None
        tensors = [inputs[m][name] for m in plan.models]
        got = method.fn(base, tensors, per_model, glob, dict(recipe.options), tensor_generator(recipe.seed, name))
        torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
