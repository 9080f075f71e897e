"""QP merging: closed form, optimality over task arithmetic, the rho diagnostic, calibration Grams, the method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.merging import prepared_plan

from evomerge.errors import ConfigError
from evomerge.merge.calibration.cache import cached_state, model_state
from evomerge.merge.calibration.grams import collect_grams
from evomerge.merge.engines.memory import merge_in_memory
from evomerge.merge.kernels.qp import (
    QPReport,
    basis_masks,
    objective,
    qp,
    qp_solve,
    regularize,
    residual_rho,
    solve_diagonal,
)
from evomerge.merge.methods.qp import qp_or_fallback
from evomerge.merge.methods.registry import validate_recipe
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.method_data import MethodDataProvider
from evomerge.models.hf import load_causal_lm


def _problem(seed: int, t: int = 3, out: int = 5, d_in: int = 4, tokens: int = 7):
    g = torch.Generator().manual_seed(seed)
    taus = torch.randn((t, out, d_in), generator=g, dtype=torch.float64)
    xs = [torch.randn((d_in, tokens), generator=g, dtype=torch.float64) for _ in range(t)]
    grams = [x @ x.T for x in xs]
    return taus, xs, grams


def test_full_basis_equals_regmean_closed_form() -> None:
    taus, _, grams = _problem(0)
    for ridge in (0.0, 0.1):
        reg = [regularize(g, ridge) for g in grams]
        closed = sum(t @ g for t, g in zip(taus, reg)) @ torch.linalg.inv(sum(reg))
        sol = qp_solve(taus, grams, basis="full", ridge=ridge)
        torch.testing.assert_close(sol.delta, closed, rtol=1e-9, atol=1e-9)
        # the closed form is the global minimizer: no other basis does better
        for basis in ("task", "masked", "diagonal"):
            assert qp_solve(taus, grams, basis=basis, ridge=ridge, generator=torch.Generator().manual_seed(1)).jstar \
                >= sol.jstar - 1e-9


def test_objective_matches_output_space_definition() -> None:
    taus, xs, grams = _problem(1)
    delta = torch.randn(taus.shape[1:], dtype=torch.float64)
    direct = sum(float(((delta @ x - t @ x) ** 2).sum()) for t, x in zip(taus, xs))
    assert objective(delta, taus, grams) == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_task_basis_never_worse_than_task_arithmetic(seed: int) -> None:
    taus, _, grams = _problem(seed, t=4, out=6, d_in=5, tokens=4)
    sol = qp_solve(taus, grams, basis="task", ridge=0.0)
    assert objective(sol.delta, taus, grams) == pytest.approx(sol.jstar, rel=1e-9)
    total = taus.sum(dim=0)
    for lam in torch.linspace(-1.0, 3.0, 81).tolist():
        assert sol.jstar <= objective(lam * total, taus, grams) + 1e-9
    # soups (the mean) are feasible points too
    assert sol.jstar <= objective(taus.mean(dim=0), taus, grams) + 1e-9


def test_rho_bounds_and_spanning_basis() -> None:
    for seed in range(5):
        taus, _, grams = _problem(seed)
        for basis in ("task", "masked", "full"):
            rho = qp_solve(taus, grams, basis=basis, ridge=0.01, generator=torch.Generator().manual_seed(0)).rho
            assert -1e-12 <= rho <= 1 + 1e-12
    taus, _, grams = _problem(7, t=1)
    assert qp_solve(taus, grams, basis="task").rho == pytest.approx(1.0, abs=1e-10)
    assert qp_solve(taus, grams, basis="full", ridge=0.0).rho == pytest.approx(1.0, abs=1e-8)
    # tasks see disjoint input subspaces and each task vector acts only on its own: sum_t tau_t reproduces
    # every target, so the task basis (and the full one) spans them and captures all residual energy
    g = torch.Generator().manual_seed(9)
    taus = torch.zeros((3, 4, 6), dtype=torch.float64)
    grams = []
    for t in range(3):
        cols = slice(2 * t, 2 * t + 2)
        taus[t][:, cols] = torch.randn((4, 2), generator=g, dtype=torch.float64)
        x = torch.zeros((6, 5), dtype=torch.float64)
        x[cols] = torch.randn((2, 5), generator=g, dtype=torch.float64)
        grams.append(x @ x.T)
    for basis in ("task", "full"):
        assert qp_solve(taus, grams, basis=basis, ridge=0.0).rho == pytest.approx(1.0, abs=1e-9)
    # ... but not the masked basis once masks cut entries away (rho < 1)
    assert qp_solve(taus, grams, basis="masked", mask="magnitude", densities=[0.05] * 3).rho < 1
    assert residual_rho(0.0, 0.0) == 1.0
    assert residual_rho(4.0, 1.0) == 0.75


def test_diagonal_hand_case() -> None:
    # two tasks, diagonal Grams: column j averages tau_t[:, j] with weights g_t[j]
    taus = torch.tensor([[[1.0, 2.0]], [[3.0, -2.0]]], dtype=torch.float64)
    grams = [torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)),
             torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))]
    delta = solve_diagonal(taus, grams)
    torch.testing.assert_close(delta, torch.tensor([[2.5, 1.0]], dtype=torch.float64))
    # with diagonal Grams the diagonal QP IS the full QP
    torch.testing.assert_close(qp_solve(taus, grams, basis="full").delta, delta)


def test_masks() -> None:
    taus = torch.tensor([[[0.5, -0.1, 0.3, 0.0, -0.8]], [[-0.4, 0.25, 0.1, 0.6, -0.2]], [[0.1, -0.3, -0.7, 0.2, 0.05]]],
                        dtype=torch.float64)
    m = basis_masks(taus, "magnitude", [0.6, 0.6, 0.6], None)
    assert m.sum(dim=(1, 2)).tolist() == [3, 3, 3]
    ties = basis_masks(taus, "ties", [0.6, 0.6, 0.6], None)
    # TIES hand case (methods.md): elected signs [+,-,-,+,-]; agreeing trimmed entries only
    merged = (taus * ties).sum(dim=0) / ties.sum(dim=0).clamp(min=1)
    torch.testing.assert_close(merged, torch.tensor([[0.5, -0.3, -0.7, 0.4, -0.8]], dtype=torch.float64))
    d1 = basis_masks(taus, "dare", [0.5] * 3, torch.Generator().manual_seed(3))
    d2 = basis_masks(taus, "dare", [0.5] * 3, torch.Generator().manual_seed(3))
    assert torch.equal(d1, d2)
    with pytest.raises(ValueError, match="generator"):
        basis_masks(taus, "dare", [0.5] * 3, None)


def test_kernel_fallback_and_report() -> None:
    base = torch.zeros(3, 2)
    models = [torch.ones(3, 2), 3 * torch.ones(3, 2)]
    mp = [{"weight": 1.0, "density": 0.5}] * 2
    report = QPReport()
    # no Grams: the method's fallback (linear mean); the kernel alone refuses
    out = qp_or_fallback(base, models, mp, {"ridge": 0.01}, {"fallback": "linear", "qp_report": report, "qp_tensor": "n"})
    with pytest.raises(ValueError, match="no calibration Grams"):
        qp(base, models, mp, {"ridge": 0.01}, {"qp_tensor": "n"})
    torch.testing.assert_close(out, 2 * torch.ones(3, 2))
    assert report.fallback == ["n"]
    grams = [torch.eye(2, dtype=torch.float64)] * 2
    out = qp(base, models, mp, {"ridge": 0.0}, {"qp_grams": grams, "basis": "task", "qp_report": report, "qp_tensor": "w"})
    torch.testing.assert_close(out, 2 * torch.ones(3, 2))
    assert 0 <= report.rho("w") <= 1
    with pytest.raises(ValueError, match="non-negative"):
        qp(base, models, [{"weight": -1.0}, {"weight": 1.0}], {}, {"qp_grams": grams})


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 4)
        self.a = torch.nn.Linear(4, 3, bias=False)
        self.b = torch.nn.Linear(4, 2, bias=False)
        self.c = torch.nn.Linear(3, 5, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.c(torch.relu(self.a(h))) + self.b(h).sum()


def test_collect_grams_matches_direct_computation() -> None:
    torch.manual_seed(0)
    toy = _Toy()
    batches = [torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (1, 3))]
    grams = collect_grams(toy, batches)
    x = torch.cat([toy.emb(b).reshape(-1, 4) for b in batches]).double().detach()
    torch.testing.assert_close(grams["a.weight"], x.T @ x / x.shape[0])
    assert grams["b.weight"] is grams["a.weight"]  # shared input, one Gram
    h = torch.relu(toy.a(torch.cat([toy.emb(b).reshape(-1, 4) for b in batches]))).double().detach()
    torch.testing.assert_close(grams["c.weight"], h.T @ h / h.shape[0])
    summed = collect_grams(toy, batches, normalize="sum")
    torch.testing.assert_close(summed["a.weight"], x.T @ x)


@pytest.fixture(scope="module")
def micro(micro_zoo: Path) -> dict:
    z = micro_zoo
    names = ["add", "rev", "sort", "enc"]
    return {"zoo": z, "names": names, "paths": {"base": str(z / "base"), **{n: str(z / n) for n in names}},
            "cache": {}}


def _recipe(micro: dict, **options: object) -> Recipe:
    return Recipe("qp", tuple(ModelEntry(n) for n in micro["names"]), base_model="base",
                  options={"calibration": str(micro["zoo"] / "fitness.yaml"), **options})


@pytest.mark.parametrize("options", [{"basis": "full"}, {"basis": "task"}, {"basis": "diagonal", "sequential": True}])
def test_qp_method_on_micro_zoo(micro: dict, options: dict) -> None:
    recipe = _recipe(micro, **options)
    validate_recipe(recipe)
    plan = prepared_plan(recipe, micro["paths"], micro["cache"])
    states = {k: cached_state(micro["cache"], p) for k, p in micro["paths"].items()}
    merged = merge_in_memory(plan, states)
    report = micro["cache"]["qp_report"]
    linears = [n for n in states["base"] if n.endswith("proj.weight") or n == "lm_head.weight"]
    assert sorted(report.records) == sorted(linears)
    if options["basis"] != "diagonal":
        assert 0.0 <= report.overall() <= 1.0
    # non-linear tensors: the fallback's plain mean
    norm = "model.norm.weight"
    torch.testing.assert_close(merged[norm], torch.stack([states[n][norm] for n in micro["names"]]).mean(0))
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_qp_full_has_highest_rho_on_micro_zoo(micro: dict) -> None:
    rhos = {}
    for basis in ("task", "masked", "full", "diagonal"):
        plan = prepared_plan(_recipe(micro, basis=basis), micro["paths"], micro["cache"])
        states = {k: cached_state(micro["cache"], p) for k, p in micro["paths"].items()}
        merge_in_memory(plan, states)
        rhos[basis] = micro["cache"]["qp_report"].overall()
    assert rhos["full"] >= max(rhos.values()) - 1e-9
    assert 0 <= rhos["masked"] <= 1 and 0 <= rhos["task"] <= 1


def test_qp_needs_calibration_and_valid_options(micro: dict) -> None:
    recipe = Recipe("qp", tuple(ModelEntry(n) for n in micro["names"]), base_model="base")
    with pytest.raises(ConfigError, match="calibration"):
        prepared_plan(recipe, micro["paths"], micro["cache"])
    with pytest.raises(ConfigError, match="basis"):
        validate_recipe(Recipe("qp", (ModelEntry("add"),), base_model="base", options={"basis": "nope"}))


def test_engines_match_in_memory_reference(micro: dict, tmp_path) -> None:
    """merge_to_disk and the resident merger run the prepare hook and give the reference merge."""
    from evomerge.merge.engines.disk import merge_to_disk
    from evomerge.merge.engines.resident import ResidentMerger

    z = micro["zoo"]
    recipe = Recipe.from_dict({
        "method": "qp", "base_model": str(z / "base"), "models": [str(z / n) for n in micro["names"]],
        "options": {"basis": "task", "sequential": True, "calibration": str(z / "fitness.yaml")}, "seed": 1})
    provider = MethodDataProvider(None, z / "base")
    merge_to_disk(recipe, tmp_path / "out", progress=False, calibration=provider.for_recipe(recipe).calibration)
    got = model_state(load_causal_lm(tmp_path / "out"))
    cache: dict = {}
    paths = {str(z / k): str(z / k) for k in ["base", *micro["names"]]}
    plan = prepared_plan(recipe, paths, cache)
    states = {k: cached_state(cache, p) for k, p in paths.items()}
    ref = merge_in_memory(plan, states)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    rm = ResidentMerger(str(z / "base"), {str(z / n): str(z / n) for n in micro["names"]}, base_key=str(z / "base"))
    model = rm.new_model()
    rm.calibration = provider.for_recipe(recipe).calibration
    rm.apply(recipe, into=model)
    for k, v in model_state(model).items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)
