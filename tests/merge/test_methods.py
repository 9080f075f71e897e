"""Merge kernels: hand-computed cases, identities, reductions, and naive reference implementations."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers.merging import dare_linear_reference
from helpers.tiny_models import seeded_tensors

from evomerge.merge.kernels import sparsify as S
from evomerge.merge.kernels.linear import linear
from evomerge.merge.kernels.model_stock import model_stock
from evomerge.merge.kernels.slerp import slerp
from evomerge.merge.kernels.task_arithmetic import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    elected_sign,
    magnitude_prune,
    task_arithmetic,
    ties,
)
from evomerge.merge.methods.builtin import BY_NAME
from evomerge.merge.methods.registry import REGISTRY

BUILTIN_METHODS = tuple(BY_NAME)  # the plain methods' names

TAU1 = [0.5, -0.1, 0.3, 0.0, -0.8]
TAU2 = [-0.4, 0.25, 0.1, 0.6, -0.2]
TAU3 = [0.1, -0.3, -0.7, 0.2, 0.05]
TIES_HAND = [0.5, -0.3, -0.7, 0.4, -0.8]


def _mp(n: int, **values: float) -> list[dict[str, float]]:
    return [dict(values) for _ in range(n)]


# ------------------------------------------------------------------------ hand-computed cases, one row a case

# (method, per-model weights, per-model density, method parameters, options, expected merge minus the base) on
# the task vectors TAU1, TAU2 over a base of ones (linear: of the two models, so the mean task vector); density 0.4 of 5 entries keeps exactly 2 per task vector.
HAND_CASES = [
    ("linear", [1.0, 1.0], 1.0, {}, {}, [0.05, 0.075, 0.2, 0.3, -0.5]),
    ("task_arithmetic", [1.0, 0.5], 1.0, {"lambda": 2.0}, {}, [0.6, 0.05, 0.7, 0.6, -1.8]),
    ("task_arithmetic", [1.0, 0.5], 1.0, {}, {"normalize": True}, [0.2, 0.0166667, 0.2333333, 0.2, -0.6]),
    ("ties", [1.0, 1.0], 0.4, {}, {}, [0.5, 0.0, 0.0, 0.6, -0.8]),
    ("magnitude_prune", [1.0, 1.0], 0.4, {}, {}, [0.1, 0.0, 0.0, 0.6, -0.8]),
    ("magnitude_prune", [1.0, 0.5], 0.4, {"lambda": 2.0}, {}, [0.6, 0.0, 0.0, 0.6, -1.6]),
]


@pytest.mark.parametrize(("name", "weights", "density", "params", "options", "expected"), HAND_CASES)
def test_hand_computed_case(name: str, weights: list[float], density: float, params: dict[str, float],
                            options: dict[str, object], expected: list[float]) -> None:
    method = REGISTRY.get(name)
    base = torch.ones(5)
    tensors = [base + torch.tensor(t) for t in (TAU1, TAU2)]
    mp = [{"weight": w, "density": density} for w in weights]
    out = method.fn(base if method.needs_base else None, tensors, mp, params, options, None)
    torch.testing.assert_close(out, base + torch.tensor(expected), rtol=0, atol=1e-6)


def test_magnitude_prune_matches_peft() -> None:
    """PEFT's merge utility as the oracle (its density keeps ``int(density * n)`` entries, ties by topk)."""
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    base, tensors = seeded_tensors((37, 19), 3, seed=21)
    weights = [0.7, 1.3, -0.4]
    for density in (0.05, 0.3, 0.9):
        ours = magnitude_prune(base, tensors, [{"weight": w, "density": density} for w in weights],
                               {"lambda": 1.0}, {})
        peft = merge_utils.magnitude_prune([t - base for t in tensors], torch.tensor(weights), density)
        torch.testing.assert_close(ours - base, peft, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- TIES: methods.md hand case


@pytest.mark.parametrize("variant", ["mergekit", "paper"])
@pytest.mark.parametrize("lam", [1.0, 2.0])
def test_ties_hand_case_from_methods_md(variant: str, lam: float) -> None:
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    tensors = [base + torch.tensor(t) for t in (TAU1, TAU2, TAU3)]
    # density 0.6 of 5 entries keeps exactly 3 per task
    out = ties(base, tensors, _mp(3, weight=1.0, density=0.6), {"lambda": lam}, {"variant": variant})
    torch.testing.assert_close(out, base + lam * torch.tensor(TIES_HAND), rtol=0, atol=1e-6)


def test_ties_trim_keeps_exactly_k_and_the_elected_sums_match_methods_md() -> None:
    trimmed = []
    for t in (TAU1, TAU2, TAU3):
        d = torch.tensor(t)
        S.magnitude_(d, 0.6)
        assert int(torch.count_nonzero(d)) == 3
        trimmed.append(d)
    torch.testing.assert_close(sum(trimmed), torch.tensor([0.1, -0.05, -0.4, 0.8, -0.8]), rtol=0, atol=1e-6)
    assert elected_sign(trimmed).tolist() == [1.0, -1.0, -1.0, 1.0, -1.0]


def _naive_ties(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    density: float,
    lam: float,
    variant: str,
    normalize: bool = True,
) -> torch.Tensor:
    """Reference written from the definitions with sorting and explicit masks (slow, obviously right)."""
    taus = []
    for t in tensors:
        d = (t - base).reshape(-1).double()
        k = max(1, int(density * d.numel())) if density < 1 else d.numel()
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[torch.argsort(d.abs(), descending=True, stable=True)[:k]] = True
        taus.append(torch.where(keep, d, torch.zeros_like(d)))
    stack = torch.stack(taus)
    w = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
    if variant == "paper":
        gamma = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(stack) == gamma
        count = agree.sum(0).clamp(min=1)
        merged = (stack * agree * w).sum(0) / count
    else:
        weighted = stack * w
        gamma = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(weighted) == gamma
        merged = (weighted * agree).sum(0)
        if normalize:
            div = (w * agree).sum(0)
            div[div == 0] = 1
            merged = merged / div
    return (base.reshape(-1).double() + lam * merged).reshape(base.shape).float()


@pytest.mark.parametrize("variant", ["mergekit", "paper"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_ties_matches_a_naive_reference(variant: str, normalize: bool, density: float) -> None:
    base, tensors = seeded_tensors((41, 23), 3, seed=7)
    weights = [1.0, 1.0, 1.0] if variant == "paper" else [0.3, 1.2, 0.7]
    mp = [{"weight": w, "density": density} for w in weights]
    out = ties(base, tensors, mp, {"lambda": 1.3}, {"variant": variant, "normalize": normalize})
    ref = _naive_ties(base, tensors, weights, density, 1.3, variant, normalize)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_ties_chunked_path_equals_one_chunk() -> None:
    base, tensors = seeded_tensors((300, 50), 3, seed=3)
    mp = [{"weight": w, "density": 0.2} for w in (0.5, 1.0, 2.0)]
    whole = ties(base, tensors, mp, {"lambda": 1.0}, {})
    chunked = ties(base, tensors, mp, {"lambda": 1.0}, {"piece_elems": 1000})  # 15 pieces, the last one partial
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_ties_sign_rules_and_zero_sign_hand_cases() -> None:
    base = torch.zeros(3)
    # column 0: mass +0.5 -0.2 -0.2 = +0.1 (mass elects +), count 1 vs 2 (count elects -)
    # column 1: +0.3 -0.3 +0 -> sum exactly 0
    t = [torch.tensor([0.5, 0.3, 0.0]), torch.tensor([-0.2, -0.3, 0.1]), torch.tensor([-0.2, 0.0, 0.2])]
    mp = _mp(3, weight=1.0, density=1.0)
    mass = ties(base, t, mp, {}, {"sign_rule": "mass"})
    count = ties(base, t, mp, {}, {"sign_rule": "majority_count"})
    assert mass[0].item() == pytest.approx(0.5)
    assert count[0].item() == pytest.approx(-0.2)
    # zero mass in column 1: mergekit elects + (keeps 0.3); global majority of the other columns is +
    assert mass[1].item() == pytest.approx(0.3)
    glob = ties(base, t, mp, {}, {"zero_sign": "global_majority"})
    assert glob[1].item() == pytest.approx(0.3)
    neg = ties(base, t, mp, {}, {"zero_sign": "global_majority", "majority_sign": -1.0})
    assert neg[1].item() == pytest.approx(-0.3)
    assert neg[2].item() == pytest.approx(0.15)


def test_ties_global_scope_uses_the_given_thresholds() -> None:
    base, tensors = seeded_tensors((20, 10), 2, seed=5)
    deltas = [t - base for t in tensors]
    thr = [float(deltas[0].abs().median()), float(deltas[1].abs().quantile(0.9))]
    out = ties(base, tensors, _mp(2, weight=1.0, density=0.5), {}, {"trim_scope": "global", "global_threshold": thr})
    trimmed = [torch.where(d.abs() >= th, d, torch.zeros_like(d)) for d, th in zip(deltas, thr)]
    ref = ties(base, [base + d for d in trimmed], _mp(2, weight=1.0, density=1.0), {}, {})
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="global_threshold"):
        ties(base, tensors, _mp(2, weight=1.0, density=0.5), {}, {"trim_scope": "global"})


# --------------------------------------------------------------------------------- global trim thresholds


def test_global_trim_thresholds_are_exact_kth_largest_over_the_model() -> None:
    g = torch.Generator().manual_seed(11)
    shapes = [(64, 32), (7,), (128, 16), (3, 3, 3)]
    per_model = [[torch.randn(s, generator=g) * (0.01 * (i + 1)) for s in shapes] for i in range(3)]
    # repeated magnitudes too
    per_model[2][1] = torch.tensor([0.5, -0.5, 0.5, 0.25, -0.25, 0.0, 0.5])
    densities = [0.2, 0.5, 0.01]
    calls = []

    def batches():  # type: ignore[no-untyped-def]
        calls.append(1)
        for j in range(len(shapes)):
            yield [per_model[i][j] for i in range(3)]

    thr = S.global_trim_thresholds(batches, densities)
    assert len(calls) == 2  # two streaming passes
    for i in range(3):
        flat = torch.cat([t.reshape(-1) for t in per_model[i]]).abs()
        k = S.keep_count(densities[i], flat.numel())
        expected = torch.sort(flat, descending=True).values[k - 1].item()
        assert thr[i] == expected
        assert int((flat >= thr[i]).sum()) >= k
        assert int((flat > thr[i]).sum()) < k
    assert S.global_trim_thresholds(batches, [1.0, 0.0, 1.0])[:2] == [0.0, math.inf]


# ---------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("layout", ["random", "sorted", "reversed", "integers"])
def test_select_rank_is_exact_on_large_tensors(layout: str) -> None:
    g = torch.Generator().manual_seed(2)
    n = (1 << 18) + 12345
    if layout == "integers":
        x = torch.randint(0, 50, (n,), generator=g).float()
    else:
        x = torch.rand(n, generator=g)
        if layout == "sorted":
            x = x.sort().values
        elif layout == "reversed":
            x = x.sort(descending=True).values
    ordered = torch.sort(x).values  # the reference (kthvalue is quadratic on reversed data)
    for rank in (17, n // 5, n - n // 5, n - 1):
        value, n_ge = S.select_rank(x, rank)
        expected = ordered[rank]
        assert value.item() == expected.item()
        assert n_ge == int((x >= expected).sum())


def test_topk_keeps_exactly_k_even_with_ties() -> None:
    mag = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    mask = S.topk_mask(mag, 3)
    assert mask.tolist() == [True, False, True, True, False, False, False]
    delta = torch.tensor([3.0, -1.0, 2.0, -2.0, 2.0, 0.5, -2.0])
    S.magnitude_(delta, 3 / 7 + 1e-9)
    assert delta.tolist() == [3.0, 0.0, 2.0, -2.0, 0.0, 0.0, 0.0]


def test_rank_window_with_ties_selects_exactly_the_window() -> None:
    mag = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 3.0])
    assert S.rank_window_mask(mag, 1, 4).tolist() == [False, True, True, True, False, False]
    assert S.rank_window_mask(mag, 0, 2).tolist() == [True, True, False, False, False, False]
    assert S.rank_window_mask(mag, 4, 6).tolist() == [False, False, False, False, True, True]
    assert int(S.rank_window_mask(mag, 2, 2).sum()) == 0


# ------------------------------------------------------------------------------------- linear, task arith


def test_linear_weighted_average_and_sum() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    mp = [{"weight": 1.0}, {"weight": 3.0}]
    torch.testing.assert_close(linear(None, [a, b], mp, {}, {}), torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(linear(None, [a, b], mp, {}, {"normalize": False}), torch.tensor([10.0, 20.0]))
    with pytest.raises(ValueError, match="sum to 0"):
        linear(None, [a, b], [{"weight": 1.0}, {"weight": -1.0}], {}, {})


def test_task_arithmetic_hand_case() -> None:
    base = torch.tensor([1.0, 1.0])
    t = [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])]  # taus [1, 0], [0, 2]
    mp = [{"weight": 0.5}, {"weight": 0.25}]
    torch.testing.assert_close(task_arithmetic(base, t, mp, {"lambda": 2.0}, {}), torch.tensor([2.0, 2.0]))
    # normalize divides by 0.75 before lambda
    out = task_arithmetic(base, t, mp, {"lambda": 2.0}, {"normalize": True})
    torch.testing.assert_close(out, torch.tensor([1.0 + 2 * 0.5 / 0.75, 1.0 + 2 * 0.5 / 0.75]))


# ------------------------------------------------------------------------------------------------- DARE


def test_dare_on_a_fixed_generator_matches_the_definition() -> None:
    base, tensors = seeded_tensors((30, 11), 2, seed=9)
    mp = [{"weight": 0.7, "density": 0.3}, {"weight": 1.1, "density": 0.6}]
    out = dare_linear(base, tensors, mp, {"lambda": 1.0}, {}, torch.Generator().manual_seed(42))
    ref = dare_linear_reference(base, tensors, mp, 42)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    again = dare_linear(base, tensors, mp, {"lambda": 1.0}, {}, torch.Generator().manual_seed(42))
    assert torch.equal(out, again)
    other = dare_linear(base, tensors, mp, {"lambda": 1.0}, {}, torch.Generator().manual_seed(43))
    assert not torch.equal(out, other)


def test_dare_hand_case_on_a_fixed_generator() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(4, generator=g)  # the draws the kernel will see
    keep = (u < 0.5).float()
    base = torch.zeros(4)
    tau = torch.tensor([0.1, -0.2, 0.3, -0.4])
    out = dare_linear(base, [tau], [{"weight": 1.0, "density": 0.5}], {}, {}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, tau * keep * 2)


def test_dare_l1_rescale_keeps_the_l1_norm_and_is_unbiased_with_inverse_density() -> None:
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(4000, generator=g) * 0.01
    d = tau.clone()
    S.dare_(d, 0.2, torch.Generator().manual_seed(5), "l1_norm")
    assert d.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)
    total = torch.zeros_like(tau)
    gen = torch.Generator().manual_seed(6)
    for _ in range(100):
        total += S.dare_(tau.clone(), 0.5, gen, "inverse_density")
    # E[tau~] = tau: the mean over draws converges (sd per entry ~ |tau| / sqrt(200))
    assert ((total / 100 - tau).abs() <= 5 * tau.abs() / math.sqrt(100) + 1e-9).float().mean() > 0.999


def test_dare_needs_an_explicit_generator() -> None:
    base, tensors = seeded_tensors((5, 5), 1)
    with pytest.raises(ValueError, match="Generator"):
        dare_ties(base, tensors, [{"weight": 1.0, "density": 0.5}], {}, {}, None)


@pytest.mark.parametrize("normalize", [True, False])
def test_density_one_reduces_dare_and_breadcrumbs_to_their_base_operator(normalize: bool) -> None:
    base, tensors = seeded_tensors((17, 13), 3, seed=4)
    mp = [{"weight": w, "density": 1.0, "gamma": 0.3} for w in (0.4, 1.0, 0.9)]
    opts = {"normalize": normalize}
    ta = task_arithmetic(base, tensors, mp, {"lambda": 1.5}, opts)
    ties1 = ties(base, tensors, mp, {"lambda": 1.5}, opts)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(dare_linear(base, tensors, mp, {"lambda": 1.5}, opts, gen), ta)
    assert torch.equal(dare_ties(base, tensors, mp, {"lambda": 1.5}, opts, gen), ties1)
    assert torch.equal(breadcrumbs(base, tensors, mp, {"lambda": 1.5}, opts), ta)
    assert torch.equal(breadcrumbs_ties(base, tensors, mp, {"lambda": 1.5}, opts), ties1)
    # TIES at density 1 with all-agreeing signs is the plain (disjoint) mean
    agree = [base + (i + 1) * (tensors[0] - base) for i in range(3)]
    mean = ties(base, agree, _mp(3, weight=1.0, density=1.0), {}, {})
    torch.testing.assert_close(mean, base + 2 * (tensors[0] - base), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_hand_case() -> None:
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # n = 10, density 0.5 -> 5 kept, gamma 0.2 -> 2 outliers dropped, 3 smallest dropped: |4|..|8| stay
    out = breadcrumbs(torch.zeros(10), [tau], [{"weight": 1.0, "density": 0.5, "gamma": 0.2}], {}, {})
    assert out.tolist() == [0.0, 0.0, 0.0, -4.0, 5.0, -6.0, 7.0, -8.0, 0.0, 0.0]
    # outlier cut shrinks when density + gamma > 1: keep 9, drop only 1 outlier
    out = breadcrumbs(torch.zeros(10), [tau], [{"weight": 1.0, "density": 0.9, "gamma": 0.5}], {}, {})
    assert out.tolist() == [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, 0.0]


# ------------------------------------------------------------------------------------------------- slerp


def test_slerp_two_element_hand_cases() -> None:
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mp = _mp(2)
    torch.testing.assert_close(slerp(None, [v0, v1], mp, {"t": 0.5}, {}), torch.tensor([0.5**0.5, 0.5**0.5]))
    third = slerp(None, [v0, v1], mp, {"t": 1 / 3}, {})
    torch.testing.assert_close(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    # unnormalized tensors: coefficients from the angle, applied to the raw vectors
    out = slerp(None, [2 * v0, v1], mp, {"t": 0.5}, {})
    torch.testing.assert_close(out, torch.tensor([2 * 0.5**0.5, 0.5**0.5]))
    # nearly parallel: linear interpolation
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.01])
    torch.testing.assert_close(slerp(None, [a, b], mp, {"t": 0.25}, {}), 0.75 * a + 0.25 * b)


def test_slerp_endpoints() -> None:
    _, (a, b) = seeded_tensors((9, 7), 2, scale=1.0)
    torch.testing.assert_close(slerp(None, [a, b], _mp(2), {"t": 0.0}, {}), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(None, [a, b], _mp(2), {"t": 1.0}, {}), b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exactly 2"):
        slerp(None, [a, b, a], _mp(3), {"t": 0.5}, {})


# ------------------------------------------------------------------------------------------- model stock


def test_model_stock_formula_and_identity() -> None:
    base = torch.tensor([0.0, 0.0, 1.0])
    t1, t2 = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])  # orthogonal deltas: cos 0 -> t = 0
    torch.testing.assert_close(model_stock(base, [t1, t2], _mp(2), {}, {}), base)
    t3 = torch.tensor([1.0, 1.0, 1.0])  # cos(t1, t3) = 1/sqrt2
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    ref = t * (t1 + t3) / 2 + (1 - t) * base
    torch.testing.assert_close(model_stock(base, [t1, t3], _mp(2), {}, {}), ref)
    # identical fine-tunes: cos 1, t 1 -> the fine-tune
    b, (x,) = seeded_tensors((6, 4), 1)
    torch.testing.assert_close(model_stock(b, [x, x.clone()], _mp(2), {}, {}), x, rtol=0, atol=1e-6)
    fw = model_stock(b, [x, x.clone()], _mp(2), {}, {"filter_wise": True})
    torch.testing.assert_close(fw, x, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------- table over all methods


def _depth(method: Any) -> dict[str, float]:
    """The tensor depth a positional method's kernel is given by the merge plan (crossover)."""
    return {"depth": 0.5} if method.positional else {}


@pytest.mark.parametrize("name", BUILTIN_METHODS)
def test_one_model_with_weight_one_is_that_model(name: str) -> None:
    method = REGISTRY.get(name)
    base, tensors = seeded_tensors((23, 11), 1, seed=13)
    x = tensors[0]
    mp = [{"weight": 1.0, "density": 1.0, "gamma": 0.01}]
    if method.max_models == 2:  # slerp: t = 1 is the second model; crossover: weight 0 of the first everywhere
        out = method.fn(None, [base, x], _mp(2), {"t": 1.0, "boundary": 1.0, "w": 0.0}, _depth(method), None)
    elif method.min_models >= 2:  # model_stock: two copies of one model
        out = method.fn(base, [x, x.clone()], mp * 2, {}, {}, None)
    else:
        out = method.fn(base if method.needs_base else None, [x], mp, {"lambda": 1.0}, {}, torch.Generator())
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BUILTIN_METHODS)
def test_task_vectors_as_inputs_give_the_same_merge(name: str) -> None:
    method = REGISTRY.get(name)
    base, tensors = seeded_tensors((23, 11), 3, seed=14)
    n = 2 if method.max_models == 2 else 3
    tensors = tensors[:n]
    mp = [{"weight": w, "density": 0.6, "gamma": 0.05} for w in (0.5, 1.0, 1.5)][:n]
    params = {"lambda": 1.2, "t": 0.3, "boundary": 0.4, "w": 0.3}
    full = method.fn(base, tensors, mp, params, _depth(method), torch.Generator().manual_seed(3))
    deltas = [t - base for t in tensors]
    via = method.fn(base, deltas, mp, params, {"inputs_are_deltas": True, **_depth(method)},
                    torch.Generator().manual_seed(3))
    torch.testing.assert_close(via, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", BUILTIN_METHODS)
def test_kernels_leave_inputs_untouched_and_compute_in_float64_on_request(name: str) -> None:
    method = REGISTRY.get(name)
    base, tensors = seeded_tensors((10, 10), 3, seed=15)
    tensors = tensors[: 2 if method.max_models == 2 else 3]
    copies = [t.clone() for t in tensors]
    base_copy = base.clone()
    mp = [{"weight": 1.0, "density": 0.5, "gamma": 0.1} for _ in tensors]
    out = method.fn(base, tensors, mp, {"t": 0.4}, {"compute_dtype": "float64", **_depth(method)},
                    torch.Generator().manual_seed(1))
    assert out.dtype == torch.float64
    assert out.shape == base.shape
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies)) and torch.equal(base, base_copy)
    bf16 = method.fn(
        base.bfloat16(), [t.bfloat16() for t in tensors], mp, {"t": 0.4}, _depth(method),
        torch.Generator().manual_seed(1)
    )
    assert bf16.dtype == torch.float32


def test_shape_mismatch_is_refused() -> None:
    base, tensors = seeded_tensors((4, 4), 2)
    with pytest.raises(ValueError, match="shape"):
        task_arithmetic(base, [tensors[0], tensors[1][:2]], _mp(2, weight=1.0), {}, {})
    with pytest.raises(ValueError, match="per-model"):
        linear(None, tensors, _mp(1, weight=1.0), {}, {})
