"""APL: gradient importance ranks partitions like the exact intervention; drop rates, weights, the method."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.merging import prepared_plan

from evomerge.lab import correlation
from evomerge.merge.calibration.cache import cached_state
from evomerge.merge.calibration.importance import importance
from evomerge.merge.engines.memory import merge_in_memory
from evomerge.merge.kernels.apl import (
    ImportanceStats,
    apl,
    keep_probabilities,
    merge_weights,
    partition_importance,
)
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.method_data import MethodDataProvider
from evomerge.models.hf import load_causal_lm
from evomerge.models.layers import LayerMap

NAMES = ["add", "rev", "sort", "enc"]


@pytest.fixture(scope="module")
def micro(micro_zoo: Path) -> dict:
    from evomerge.fitness.spec import FitnessSpec
    z = micro_zoo
    cache: dict = {}
    probe = load_causal_lm(z / "base")
    lm = LayerMap.from_config(probe.config.to_dict())
    return {
        "zoo": z, "cache": cache, "probe": probe, "layer_of": lm.layer_of,
        "calib": MethodDataProvider(FitnessSpec.from_yaml(z / "fitness.yaml"), z / "base").fitness_calibration(),
        "base": cached_state(cache, z / "base"),
        "tuned": {n: cached_state(cache, z / n) for n in NAMES},
        "paths": {"base": str(z / "base"), **{n: str(z / n) for n in NAMES}},
    }


@pytest.mark.parametrize("grad_point", ["finetuned", "midpoint"])
def test_gradient_ranks_layers_like_exact_intervention(micro: dict, grad_point: str) -> None:
    pooled_g, pooled_e, per_model = [], [], []
    for n in NAMES:
        batch = micro["calib"].loss_batch(n, 16)
        args = (micro["probe"], micro["base"], micro["tuned"][n], batch, "layer")
        g = partition_importance(importance(*args, "gradient", grad_point, micro["layer_of"]), "layer", micro["layer_of"])
        e = partition_importance(importance(*args, "exact", grad_point, micro["layer_of"]), "layer", micro["layer_of"])
        assert sorted(g) == sorted(e) == ["layer.0", "layer.1", "lm_head.weight", "model.embed_tokens.weight",
                                          "model.norm.weight"]
        keys = sorted(g)
        per_model.append(correlation([g[k] for k in keys], [e[k] for k in keys], "spearman"))
        pooled_g += [g[k] for k in keys]
        pooled_e += [e[k] for k in keys]
    # acceptance: over all 20 layer-level partitions of the four task vectors (5 per model is too few for a
    # stable per-model rank correlation; those are printed for the record)
    pooled = correlation(pooled_g, pooled_e, "spearman")
    print(f"grad_point={grad_point}: pooled Spearman {pooled:.3f}, per model {per_model}")
    if grad_point == "midpoint":  # the method's default estimator: the acceptance threshold
        assert pooled >= 0.8, (pooled, per_model)
    else:  # the plain first-order point: 0.75-0.86 across micro-zoo rebuilds, so only a clear positive rank link
        assert pooled >= 0.5, (pooled, per_model)
    # the probe is left holding the last fine-tune, untouched by the interventions
    for k, v in micro["probe"].state_dict().items():
        torch.testing.assert_close(v, micro["tuned"][NAMES[-1]][k])


def test_exact_reset_of_whole_model_is_base_loss(micro: dict) -> None:
    n = "sort"
    batch = micro["calib"].loss_batch(n, 8)
    imp = importance(micro["probe"], micro["base"], micro["tuned"][n], batch, "model", "exact")
    with torch.no_grad():
        micro["probe"].load_state_dict(micro["base"])
        lb = float(micro["probe"](input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss)
        micro["probe"].load_state_dict(micro["tuned"][n])
        lt = float(micro["probe"](input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss)
    assert float(imp["model.norm.weight"][0]) == pytest.approx(abs(lb - lt), rel=1e-5)


def test_row_level_gradient_sums_to_layer_level(micro: dict) -> None:
    n = "enc"
    batch = micro["calib"].loss_batch(n, 8)
    args = (micro["probe"], micro["base"], micro["tuned"][n], batch)
    rows = importance(*args, "row", "gradient", "finetuned", micro["layer_of"])
    model = importance(*args, "model", "gradient", "finetuned", micro["layer_of"])
    assert rows["model.layers.0.self_attn.q_proj.weight"].shape == (64,)
    # |sum| <= sum |.|: the whole-model importance is bounded by the summed row importance
    assert float(model["lm_head.weight"][0]) <= sum(float(v.sum()) for v in rows.values()) + 1e-9
    with pytest.raises(ValueError, match="max_exact"):
        importance(*args, "row", "exact", max_exact=10)


def test_keep_probabilities_and_weights_hand_cases() -> None:
    imp = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    stats = ImportanceStats.from_importance({"w": imp}, {"w": torch.Size([4, 3])})
    keep = keep_probabilities(imp, stats, 0.3, 1.0)
    assert float(keep.mean()) == pytest.approx(0.3, rel=1e-12)  # mean keep rate = density (no clipping)
    assert torch.all(keep[1:] > keep[:-1])  # less important -> dropped more
    expected = 0.3 * torch.exp(imp / 4) / torch.exp(imp / 4).mean()
    torch.testing.assert_close(keep, expected)
    flat = keep_probabilities(imp, stats, 0.3, 1e9)
    torch.testing.assert_close(flat, torch.full((4,), 0.3, dtype=torch.float64))  # huge T: DARE
    w = merge_weights([torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])], 1.0)
    # row 0: mean 2 -> logits 0.5, 1.5; row 1: all zero -> uniform
    torch.testing.assert_close(w[:, 0], torch.softmax(torch.tensor([0.5, 1.5], dtype=torch.float64), 0))
    torch.testing.assert_close(w[:, 1], torch.tensor([0.5, 0.5], dtype=torch.float64))
    big = merge_weights([torch.tensor([1.0]), torch.tensor([9.0])], 1e9)
    torch.testing.assert_close(big[:, 0], torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_apl_kernel_identities() -> None:
    base = torch.zeros(4, 3)
    models = [torch.ones(4, 3), 3 * torch.ones(4, 3)]
    # no importance, density 1: uniform mean of the task vectors, times lambda
    out = apl(base, models, [{"density": 1.0}] * 2, {"lambda": 2.0}, {}, None)
    torch.testing.assert_close(out, 4 * torch.ones(4, 3))
    imps = [torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)]
    stats = [ImportanceStats.from_importance({"w": i}, {"w": torch.Size([4, 3])}) for i in imps]
    opts = {"apl_importance": imps, "apl_stats": stats}
    a = apl(base, models, [{"density": 0.5}] * 2, {}, opts, torch.Generator().manual_seed(1))
    b = apl(base, models, [{"density": 0.5}] * 2, {}, opts, torch.Generator().manual_seed(1))
    c = apl(base, models, [{"density": 0.5}] * 2, {}, opts, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="generator"):
        apl(base, models, [{"density": 0.5}] * 2, {}, opts, None)
    # unbiased: averaged over many draws, the dropped-and-rescaled merge approaches the weighted mean
    w = merge_weights(imps, 1.0)
    want = (w[0] * 1 + w[1] * 3).unsqueeze(1).expand(4, 3).float()
    mean = torch.stack([apl(base, models, [{"density": 0.5}] * 2, {}, opts, torch.Generator().manual_seed(s))
                        for s in range(400)]).mean(0)
    assert float((mean - want).abs().max()) < 0.35


def test_apl_method_on_micro_zoo(micro: dict) -> None:
    recipe = Recipe("apl", tuple(ModelEntry(n) for n in NAMES), base_model="base", seed=3,
                    options={"calibration": str(micro["zoo"] / "fitness.yaml"), "examples": 8})
    plan = prepared_plan(recipe, micro["paths"], micro["cache"])
    prepared = plan.prepared
    states = {"base": micro["base"], **micro["tuned"]}
    merged = merge_in_memory(plan, states)
    assert set(merged) == set(micro["base"])
    assert all(torch.isfinite(v).all() for v in merged.values())
    again = merge_in_memory(prepared_plan(recipe, micro["paths"], micro["cache"]), states)
    assert all(torch.equal(merged[k], again[k]) for k in merged)  # seeded, cached importance
    imp = prepared["model.layers.0.mlp.down_proj.weight"]["apl_importance"]
    assert len(imp) == 4 and all(v.shape == (64,) and not math.isnan(float(v.sum())) for v in imp)
