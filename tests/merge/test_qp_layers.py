"""qp at scale: with memory for one layer's Grams per model, qp collects a layer, merges it and drops its Grams;
the merge equals the all-layers one, and the Grams held at once are one layer's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.merging import prepared_plan

from evomerge.merge.calibration.cache import cached_state
from evomerge.merge.engines.memory import merge_in_memory
from evomerge.merge.engines.resident import ResidentMerger
from evomerge.merge.engines.tiers import plan_resident
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.method_data import MethodDataProvider


@pytest.fixture(scope="module")
def micro(micro_zoo: Path) -> dict:
    z = micro_zoo
    names = ["add", "rev", "sort"]
    return {"zoo": z, "names": names, "paths": {"base": str(z / "base"), **{n: str(z / n) for n in names}}}


@pytest.mark.parametrize("options", [{"basis": "full"}, {"basis": "task", "sequential": True},
                                     {"basis": "full", "activations": "base"}])
def test_layer_at_a_time_equals_all_layers(micro: dict, options: dict) -> None:
    recipe = Recipe("qp", tuple(ModelEntry(n, {"weight": ParamValue.constant({"add": 1.0, "rev": 0.7, "sort": 0.4}[n])})
                                for n in micro["names"]), base_model="base",
                    options={"calibration": str(micro["zoo"] / "fitness.yaml"), **options})
    caches: dict[str, dict] = {"all": {}, "layer": {}}
    merged = {}
    for mode, cache in caches.items():
        plan = prepared_plan(recipe, micro["paths"], cache)
        if mode == "layer":  # the same plan, prepared one layer at a time
            plan = plan.for_full_tensors().prepare(micro["paths"], "cpu", cache=cache,
                                                   calibration=plan_calibration(recipe, micro), grams="layer")
        states = {k: cached_state(cache, p) for k, p in micro["paths"].items()}
        merged[mode] = merge_in_memory(plan, states)
    worst = max(float((merged["all"][n] - merged["layer"][n]).abs().max()) for n in merged["all"])
    assert worst <= 1e-6
    peak_all, peak_layer = caches["all"]["qp_gram_peak_bytes"], caches["layer"]["qp_gram_peak_bytes"]
    # the plan's estimate of one layer's Grams (3 models) bounds what was held; all layers hold several times more
    plan = plan_resident(micro["paths"]["base"], {n: micro["paths"][n] for n in micro["names"]}, methods=["qp"])
    qp_plan = next(c for c in plan.calibration if c.method == "qp")
    assert 0 < peak_layer <= qp_plan.grams_layer_bytes
    assert peak_all >= 2 * peak_layer and peak_all <= qp_plan.grams_all_bytes
    rho = caches["layer"]["qp_report"].overall()
    assert 0.0 <= rho <= 1.0 and rho == pytest.approx(caches["all"]["qp_report"].overall(), abs=1e-9)


def plan_calibration(recipe: Recipe, micro: dict):
    return MethodDataProvider(None, micro["paths"]["base"]).for_recipe(recipe).calibration


def test_resident_merger_in_layer_mode(micro: dict) -> None:
    recipe = Recipe("qp", tuple(ModelEntry(n) for n in micro["names"]), base_model="base",
                    options={"calibration": str(micro["zoo"] / "fitness.yaml"), "sequential": True, "basis": "task"})
    out = {}
    for mode in ("all", "layer"):
        rm = ResidentMerger(micro["paths"]["base"], {n: micro["paths"][n] for n in micro["names"]})
        rm.gram_mode = mode
        rm.calibration = plan_calibration(recipe, micro)
        out[mode] = rm.state_dict(recipe)
        assert rm.last_diagnostics(recipe)["qp_rho"] > 0
    assert max(float((out["all"][n] - out["layer"][n]).abs().max()) for n in out["all"]) <= 1e-5
    torch.testing.assert_close(out["all"]["model.norm.weight"], out["layer"]["model.norm.weight"])
