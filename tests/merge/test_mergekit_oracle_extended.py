"""Cross-check of the methods mergekit 0.1.5 added (DELLA, SCE, NuSLERP, Multi-SLERP, Karcher, NearSwap, Arcee
Fusion, RAM, RAM+, passthrough with slices) against mergekit itself: every tensor within 1e-5 in float32.

Each case is one mergekit YAML config on tiny Llamas built in the test. mergekit merges it with ``run_merge``;
evomerge reads the same config (``parse_recipe``: the mergekit form) and merges it with its disk engine, so
the format mapping, the engine and the kernel are all checked. DELLA is random: where mergekit's result is
deterministic (density 1) the whole merge is compared; the random path is compared draw for draw through
mergekit's in-memory API, its global generator seeded like evomerge's per-tensor generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.tiny_models import load_state

from evomerge.merge.engines.disk import merge_to_disk
from evomerge.merge.formats.recipe_yaml import parse_recipe
from evomerge.merge.kernels.della import della, della_linear

mergekit_config = pytest.importorskip("mergekit.config", reason="mergekit not installed: oracle cross-check skipped")
from mergekit.merge import run_merge  # noqa: E402
from mergekit.merge_methods.api import merge_tensors  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

NUM_LAYERS = 3


def _models(paths: list[Path], idx: list[int], params: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    out = []
    for i, p in zip(idx, params):
        item: dict[str, Any] = {"model": str(paths[i])}
        if p:
            item["parameters"] = p
        out.append(item)
    return out


def _case(name: str, paths: list[Path]) -> dict[str, Any]:
    """The mergekit config of case ``name`` (paths[0] is the base, paths[1..3] the fine-tunes)."""
    base = str(paths[0])
    w3 = [{"weight": 0.6}, {"weight": 1.0}, {"weight": [0.3, 1.2]}]
    cases: dict[str, dict[str, Any]] = {
        "della_density1": {"merge_method": "della", "base_model": base,
                           "models": _models(paths, [1, 2, 3], [{**w, "density": 1.0, "epsilon": 0.1} for w in w3])},
        "della_linear_density1": {"merge_method": "della_linear", "base_model": base,
                                  "models": _models(paths, [1, 2, 3], [{**w, "density": 1.0} for w in w3]),
                                  "parameters": {"lambda": 1.3, "normalize": True}},
        "sce_all": {"merge_method": "sce", "base_model": base, "models": _models(paths, [1, 2, 3], [None] * 3)},
        "sce_topk_per_layer": {"merge_method": "sce", "base_model": base,
                               "models": _models(paths, [0, 1, 2, 3], [None] * 4),
                               "parameters": {"select_topk": [0.1, 0.7], "int8_mask": True}},
        "nuslerp_base": {"merge_method": "nuslerp", "base_model": base,
                         "models": _models(paths, [1, 2], [{"weight": 1.0}, {"weight": [0.2, 0.9]}])},
        "nuslerp_rows": {"merge_method": "nuslerp",
                         "models": _models(paths, [1, 3], [{"weight": 0.4}, {"weight": 0.6}]),
                         "parameters": {"nuslerp_flatten": False}},
        "nuslerp_columns": {"merge_method": "nuslerp",
                            "models": _models(paths, [2, 3], [{"weight": 0.7}, {"weight": 0.3}]),
                            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "multislerp": {"merge_method": "multislerp",
                       "models": _models(paths, [1, 2, 3], [{"weight": 0.2}, {"weight": [0.5, 1.0]}, {"weight": 0.3}])},
        "multislerp_base": {"merge_method": "multislerp", "base_model": base,
                            "models": _models(paths, [1, 2, 3], [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}]),
                            "parameters": {"normalize_weights": False}},
        "karcher": {"merge_method": "karcher", "models": _models(paths, [1, 2, 3], [None] * 3)},
        "karcher_with_base": {"merge_method": "karcher", "base_model": base,
                              "models": _models(paths, [1, 2], [None] * 2),
                              "parameters": {"max_iter": 3, "tol": "1e-6"}},
        "nearswap": {"merge_method": "nearswap", "base_model": base,
                     "models": _models(paths, [0, 2], [None, None]),
                     "parameters": {"t": [{"filter": "mlp", "value": [0.005, 0.03]}, {"value": 0.01}]}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": _models(paths, [3], [None])},
        "ram": {"merge_method": "ram", "base_model": base, "models": _models(paths, [1, 2, 3], [None] * 3),
                "parameters": {"epsilon": 0.012}},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base,
                       "models": _models(paths, [1, 2, 3], [None] * 3),
                       "parameters": {"epsilon": [0.01, 0.02], "r": 0.5, "alpha": 0.8}},
        "passthrough_scale": {"merge_method": "passthrough",
                              "models": _models(paths, [2], [{"scale": [{"filter": "down_proj", "value": 0.5},
                                                                        {"value": 1.0}]}])},
        "passthrough_slices": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(paths[1]), "layer_range": [0, 2]}],
                 "parameters": {"scale": [{"filter": "embed_tokens", "value": 0.5}]}},
                {"sources": [{"model": str(paths[2]), "layer_range": [1, 3],
                              "parameters": {"scale": [{"filter": "o_proj", "value": [0.0, 1.0]}]}}],
                 "parameters": {"scale": [{"filter": "down_proj", "value": 0.25}, {"value": 1.0}]}},
                {"sources": [{"model": str(paths[3]), "layer_range": [1, 2]}]},
                {"sources": [{"model": str(paths[1]), "layer_range": [2, 3]}],
                 "parameters": {"scale": [{"filter": "mlp", "value": 2.0}, {"filter": "lm_head", "value": 0.25}]}},
            ],
        },
    }
    conf = cases[name]
    conf["dtype"] = "float32"
    return conf


CASES = ["della_density1", "della_linear_density1", "sce_all", "sce_topk_per_layer", "nuslerp_base", "nuslerp_rows",
         "nuslerp_columns", "multislerp", "multislerp_base", "karcher", "karcher_with_base", "nearswap",
         "arcee_fusion", "ram", "ramplus_tl", "passthrough_scale", "passthrough_slices"]


@pytest.mark.parametrize("name", CASES)
def test_every_tensor_matches_mergekit(name: str, tiny_llamas: list[Path], tmp_path: Path) -> None:
    conf = _case(name, tiny_llamas)
    mk_out = tmp_path / "mergekit_out"
    run_merge(mergekit_config.MergeConfiguration.model_validate(conf), str(mk_out),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    expected = load_state(mk_out)
    assert expected, "mergekit wrote no tensors"
    recipe, _ = parse_recipe(conf, name)
    ev_out = tmp_path / "evomerge_out"
    merge_to_disk(recipe, ev_out, dtype="float32", progress=False, workers=1)
    got = load_state(ev_out)
    assert sorted(got) == sorted(expected)
    base = load_state(tiny_llamas[0])
    moved = 0
    for tensor_name, want in expected.items():
        torch.testing.assert_close(got[tensor_name], want.float(), rtol=0, atol=1e-5,
                                   msg=lambda m, n=tensor_name: f"{name}: {n}: {m}")
        if tensor_name in base and base[tensor_name].shape == want.shape:
            moved += not torch.equal(want, base[tensor_name])
    assert moved, f"{name}: every tensor equals the base: the case checks nothing"
    ev_cfg = json.loads((ev_out / "config.json").read_text())
    mk_cfg = json.loads((mk_out / "config.json").read_text())
    assert ev_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]
    if name == "passthrough_slices":
        assert ev_cfg["num_hidden_layers"] == 2 + 2 + 1 + 1


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("rescale", [True, False])
def test_della_random_drops_match_mergekit_draw_for_draw(method: str, rescale: bool, tiny_llamas: list[Path]) -> None:
    """mergekit draws its MAGPRUNE masks from torch's global generator; seeded like evomerge's per-tensor
    generator, the two give the same masks, so the random path is checked exactly too."""
    states = [load_state(p) for p in tiny_llamas]
    weights, densities, epsilons = [0.6, 1.0, 0.8], [0.5, 0.3, 0.7], [0.1, 0.2, 0.25]
    kernel = della if method == "della" else della_linear
    mp = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, densities, epsilons)]
    checked = 0
    for i, name in enumerate(sorted(states[0])):
        seed = 1000 + i
        torch.manual_seed(seed)
        want = merge_tensors([s[name] for s in states], method, base_index=0, name=name,
                             parameters={"weight": weights, "density": densities, "epsilon": epsilons,
                                         "rescale": rescale, "lambda": 1.1})
        got = kernel(states[0][name], [s[name] for s in states[1:]], mp, {"lambda": 1.1},
                     {"rescale": "l1_norm" if rescale else "none"}, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked == len(states[0])
