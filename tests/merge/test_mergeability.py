"""Mergeability: the weighted method, correlations, the estimate on the micro zoo, base-score measuring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.lab import ZooLab, correlation, estimate_mergeability
from evomerge.merge.kernels.linear import linear
from evomerge.merge.kernels.mergeability import base_score_weights, mergeability_weighted
from evomerge.merge.methods.registry import get_method, plan_recipe, validate_recipe
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.method_data import MethodDataProvider
from evomerge.models.layers import LayerMap

NAMES = ["add", "rev", "sort", "enc"]


def test_huge_tau_is_the_uniform_mean() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 4, generator=g)
    models = [base + torch.randn(5, 4, generator=g) for _ in range(3)]
    mp = [{"base_score": s} for s in (0.1, 0.5, 0.9)]
    out = mergeability_weighted(base, models, mp, {"tau": 1e12}, {}, None)
    mean = linear(None, models, [{"weight": 1.0}] * 3, {}, {}, None)
    torch.testing.assert_close(out, mean, rtol=1e-6, atol=1e-6)
    # deltas in, same answer
    deltas = [m - base for m in models]
    torch.testing.assert_close(mergeability_weighted(base, deltas, mp, {"tau": 1e12}, {"inputs_are_deltas": True}),
                               mean, rtol=1e-6, atol=1e-6)


def test_weights_hand_case_and_small_tau() -> None:
    w = base_score_weights([0.2, 0.8], 0.5)
    e1, e2 = math.exp(1.6), math.exp(0.4)
    assert w.tolist() == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2)])
    base = torch.zeros(2)
    models = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    out = mergeability_weighted(base, models, [{"base_score": 0.9}, {"base_score": 0.1}], {"tau": 1e-3}, {})
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0]))  # all weight on the least-known skill
    out = mergeability_weighted(base, models, [{}, {}], {"tau": 0.5},  # unset: the caller's measured scores
                                {"base_scores": [0.2, 0.8]})
    torch.testing.assert_close(out, w.float())
    with pytest.raises(ValueError, match="base_score"):
        mergeability_weighted(base, models, [{}, {"base_score": 0.5}], {"tau": 0.5}, {})
    with pytest.raises(ValueError, match="tau"):
        base_score_weights([0.1], 0.0)


def test_correlation_hand_cases() -> None:
    assert correlation([1, 2, 3], [2, 4, 7], "pearson") == pytest.approx(0.9933992677987828)
    assert correlation([1, 2, 3], [2, 4, 7], "spearman") == pytest.approx(1.0)
    assert correlation([1, 2, 2, 3], [4, 3, 3, 1], "spearman") == pytest.approx(-1.0)
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3]))


def test_registry_entry() -> None:
    m = get_method("mergeability_weighted")
    assert m.needs_base and m.param("tau") is not None and m.param("base_score").per_model
    with pytest.raises(ConfigError, match="base_score"):
        validate_recipe(Recipe.from_dict({"method": "mergeability_weighted", "base_model": "b",
                                          "models": [{"model": "a", "parameters": {"base_score": 1.5}}]}))


@pytest.fixture(scope="module")
def lab(micro_zoo: Path) -> ZooLab:
    from evomerge.fitness.spec import FitnessSpec
    z = micro_zoo
    spec = FitnessSpec.from_dict({"tasks": [{"name": n, "jsonl": {"search": str(z / "data" / n / "search.jsonl"),
                                                                  "test": str(z / "data" / n / "test.jsonl")},
                                             "metric": "token_acc"} for n in NAMES]})
    return ZooLab(str(z / "base"), {n: str(z / n) for n in NAMES}, spec)


def test_estimate_mergeability_on_micro_zoo(lab: ZooLab) -> None:
    rep = estimate_mergeability(lab, m=1, n=2, method="linear", seed=5, progress=False)
    assert [r.model for r in rep.rows] == NAMES
    for r in rep.rows:
        assert len(r.trials) == 2 and all(0 <= v <= 1 for v in r.trials)
        assert r.mergeability == pytest.approx(sum(r.trials) / 2)
        assert all(r.model not in p and len(p) == 1 for p in r.partners)
    again = estimate_mergeability(lab, m=1, n=2, method="linear", seed=5, progress=False)
    assert [r.partners for r in rep.rows] == [r.partners for r in again.rows]
    assert [r.trials for r in rep.rows] == [r.trials for r in again.rows]
    assert -1 <= rep.correlation("pearson") <= 1
    assert "correlation(base score, mergeability)" in rep.table()
    with pytest.raises(ConfigError, match="M = 4"):
        estimate_mergeability(lab, m=4, n=1, progress=False)


def test_base_scores_come_from_the_provider_and_prepare_uses_them(lab: ZooLab, tmp_path) -> None:
    import yaml

    spec_file = tmp_path / "fitness.yaml"
    spec_file.write_text(yaml.safe_dump(lab.spec.model_dump(exclude_none=True)))
    recipe = Recipe("mergeability_weighted", tuple(ModelEntry(n) for n in NAMES), base_model="base",
                    options={"fitness": str(spec_file)})
    paths = {"base": lab.paths[lab.base_key], **{n: lab.paths[n] for n in NAMES}}
    # the provider measures the base on options.fitness (no fitness of its own): the lab's base scores
    provider = MethodDataProvider(None, lab.paths[lab.base_key])
    data = provider.for_recipe(recipe)
    want = lab.base_scores()
    assert data.calibration is None
    assert data.base_scores == pytest.approx({n: want[n] for n in NAMES})
    lm = LayerMap.from_config(lab.config.to_dict())
    plan = plan_recipe(recipe, lm).prepare(paths, "cpu", base_scores=data.base_scores)
    assert plan.prepared["*"]["base_scores"] == pytest.approx([want[n] for n in NAMES])
    # scores from the caller (the search archive) are used without measuring
    given = {n: 0.1 * i for i, n in enumerate(NAMES)}
    plain = Recipe("mergeability_weighted", recipe.models, "base")
    out = plan_recipe(plain, lm).prepare(paths, "cpu", base_scores=given)
    assert out.prepared["*"]["base_scores"] == [given[n] for n in NAMES]
    with pytest.raises(ConfigError, match="base_score"):
        plan_recipe(plain, lm).prepare(paths, "cpu")
    # all given per model: nothing to prepare, nothing needed
    full = Recipe.from_dict({**plain.to_dict(),
                             "models": [{"model": n, "parameters": {"base_score": 0.5}} for n in NAMES]})
    assert plan_recipe(full, lm).prepare(paths, "cpu").prepared == {}
    assert provider.for_recipe(full).base_scores is None
