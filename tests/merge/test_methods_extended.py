"""The methods mergekit 0.1.5 added: hand-computed cases, identities, the seeded random path of DELLA, and a
table of properties every kernel must have (inputs untouched, dtypes, task vectors as inputs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.tiny_models import load_state, seeded_tensors

from evomerge.merge.kernels import pairwise
from evomerge.merge.kernels.della import della, della_linear
from evomerge.merge.kernels.magprune import keep_probabilities, magprune_
from evomerge.merge.kernels.pairwise import arcee_fusion, nearswap, quartiles
from evomerge.merge.kernels.passthrough import passthrough
from evomerge.merge.kernels.ram import ram, ramplus_tl
from evomerge.merge.kernels.sce import sce
from evomerge.merge.kernels.sphere import karcher, multislerp, nuslerp, nuslerp_pair
from evomerge.merge.kernels.task_arithmetic import ties
from evomerge.merge.methods.extended import BY_NAME
from evomerge.merge.methods.registry import REGISTRY

EXTENDED = tuple(BY_NAME)


def _mp(n: int, **values: float) -> list[dict[str, float]]:
    return [dict(values) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ DELLA


def test_magprune_keep_probabilities_hand_case() -> None:
    # ranks by magnitude: 0.1 -> 1, 0.2 -> 2, 0.3 -> 3, 0.4 -> 4; p = 0.3 + 0.4 * (r - 1) / 3
    delta = torch.tensor([0.1, -0.4, 0.2, 0.3])
    p = keep_probabilities(delta, 0.5, 0.2)
    torch.testing.assert_close(p, torch.tensor([0.3, 0.7, 0.3 + 0.4 / 3, 0.3 + 0.8 / 3]))
    # per row of a matrix, and clipped to [0, 1] where density -+ epsilon leave it
    rows = torch.tensor([[0.1, -0.4, 0.2, 0.3], [4.0, 3.0, 2.0, 1.0]])
    p = keep_probabilities(rows, 0.1, 0.2)
    torch.testing.assert_close(p[0], torch.tensor([0.0, 0.3, 0.1 - 0.2 + 0.4 / 3, 0.1 - 0.2 + 0.8 / 3]))
    torch.testing.assert_close(p[1], torch.tensor([0.3, 0.1 - 0.2 + 0.8 / 3, 0.1 - 0.2 + 0.4 / 3, 0.0]))
    assert keep_probabilities(torch.tensor([[5.0], [1.0]]), 0.4, 0.3).reshape(-1).tolist() == pytest.approx([0.4, 0.4])
    # magnitude ties are ranked by index
    assert keep_probabilities(torch.tensor([0.2, -0.2, 0.2]), 0.5, 0.1).tolist() == pytest.approx([0.4, 0.5, 0.6])


def test_magprune_draws_come_from_the_seeded_generator_and_rescale_by_probability() -> None:
    delta = torch.tensor([0.1, -0.4, 0.2, 0.3, -0.05, 0.6])
    probs = keep_probabilities(delta, 0.5, 0.3)
    keep = torch.bernoulli(probs, generator=torch.Generator().manual_seed(3))  # the draws magprune sees
    out = magprune_(delta.clone(), 0.5, 0.3, torch.Generator().manual_seed(3), "inverse_probability")
    torch.testing.assert_close(out, delta * keep / probs)
    l1 = magprune_(delta.clone(), 0.5, 0.3, torch.Generator().manual_seed(3), "l1_norm")
    torch.testing.assert_close(l1, delta * keep * (delta.abs().sum() / (delta * keep).abs().sum()))
    plain = magprune_(delta.clone(), 0.5, 0.3, torch.Generator().manual_seed(3), "none")
    torch.testing.assert_close(plain, delta * keep)
    assert torch.equal(magprune_(delta.clone(), 1.0, 0.3, None), delta)  # density 1: nothing drawn
    with pytest.raises(ValueError, match="Generator"):
        magprune_(delta.clone(), 0.5, 0.3, None)


def test_magprune_is_unbiased_and_keeps_density_on_average() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 200, generator=g) * 0.01
    total = torch.zeros_like(delta)
    kept = 0.0
    draws = 200
    for _ in range(draws):
        d = magprune_(delta.clone(), 0.4, 0.2, g, "inverse_probability")
        total += d
        kept += float((d != 0).float().mean())
    assert kept / draws == pytest.approx(0.4, abs=0.01)
    # E[d] = delta: per entry the mean over draws is within 5 standard errors (p >= 0.2)
    se = delta.abs() * math.sqrt((1 - 0.2) / 0.2) / math.sqrt(draws)
    assert ((total / draws - delta).abs() <= 5 * se + 1e-9).float().mean() > 0.999


def test_della_at_density_one_is_ties_and_della_linear_task_arithmetic() -> None:
    base, tensors = seeded_tensors((17, 13), 3, seed=4)
    mp = [{"weight": w, "density": 1.0, "epsilon": 0.1} for w in (0.4, 1.0, 0.9)]
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(della(base, tensors, mp, {"lambda": 1.5}, {}, gen), ties(base, tensors, mp, {"lambda": 1.5}, {}))
    lin = della_linear(base, tensors, mp, {"lambda": 1.5}, {}, gen)
    ref = base + 1.5 * sum(m["weight"] * (t - base) for m, t in zip(mp, tensors))
    torch.testing.assert_close(lin, ref, rtol=0, atol=1e-6)


def test_della_hand_case_on_a_fixed_generator() -> None:
    base = torch.zeros(4)
    t1, t2 = torch.tensor([0.1, -0.4, 0.2, 0.3]), torch.tensor([-0.2, -0.1, 0.3, 0.5])
    mp = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}, {"weight": 0.5, "density": 0.6, "epsilon": 0.1}]
    g = torch.Generator().manual_seed(11)
    kept = []
    for t, m in zip((t1, t2), mp):
        p = keep_probabilities(t, m["density"], m["epsilon"])
        kept.append(t * torch.bernoulli(p, generator=g) / p)
    # della_linear without normalize: sum_t w_t tau~_t
    out = della_linear(base, [t1, t2], mp, {}, {}, torch.Generator().manual_seed(11))
    torch.testing.assert_close(out, kept[0] + 0.5 * kept[1])
    # della: TIES election over the weighted survivors, normalized by the agreeing weights
    w = torch.stack([kept[0], 0.5 * kept[1]])
    sign = torch.where(w.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(w) == sign
    ref = (w * agree).sum(0) / torch.where((torch.tensor([[1.0], [0.5]]) * agree).sum(0) == 0, 1.0,
                                           (torch.tensor([[1.0], [0.5]]) * agree).sum(0))
    torch.testing.assert_close(della(base, [t1, t2], mp, {}, {}, torch.Generator().manual_seed(11)), ref)


# -------------------------------------------------------------------------------------------------- SCE


TAU_A = [1.0, -2.0, 0.5, 0.0]
TAU_B = [3.0, 1.0, -0.5, 0.0]


def test_sce_hand_case() -> None:
    base = torch.zeros(4)
    a, b = torch.tensor(TAU_A), torch.tensor(TAU_B)
    # weights: mean squares 1.3125 and 2.5625 -> 0.33871, 0.66129; signs elected [+, -, + (sum 0), +]
    wa, wb = 1.3125 / 3.875, 2.5625 / 3.875
    out = sce(base, [a, b], _mp(2), {}, {})
    torch.testing.assert_close(out, torch.tensor([wa * 1 + wb * 3, -2.0, 0.5, 0.0]))
    # select: variances [1, 2.25, 0.25, 0] -> 3 non-zero, keep int(3 * 0.5) = 1 entry (the second)
    out = sce(base, [a, b], _mp(2), {"select_topk": 0.5}, {})
    torch.testing.assert_close(out, torch.tensor([0.0, -2.0, 0.0, 0.0]))
    # tiny task vectors: mergekit's 1e-6 floor makes the weights uniform, uniform_below 0 keeps the paper's
    tiny = sce(base, [a * 1e-4, b * 1e-4], _mp(2), {}, {})
    assert tiny[0].item() == pytest.approx(2e-4, rel=1e-5)
    weighted = sce(base, [a * 1e-4, b * 1e-4], _mp(2), {}, {"uniform_below": 0.0})
    assert weighted[0].item() == pytest.approx((wa + 3 * wb) * 1e-4, rel=1e-5)


# ---------------------------------------------------------------------------------------- sphere methods


def test_nuslerp_hand_cases() -> None:
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = nuslerp(None, [e1, e2], [{"weight": 1.0}, {"weight": 1.0}], {}, {})
    torch.testing.assert_close(half, torch.tensor([0.5**0.5, 0.5**0.5]))
    quarter = nuslerp(None, [e1, 2 * e2], [{"weight": 1.0}, {"weight": 3.0}], {}, {})  # t = 0.75
    torch.testing.assert_close(quarter, torch.tensor([math.sin(math.pi / 8), 2 * math.sin(3 * math.pi / 8)]))
    # with a base: slerp of the task vectors, added to the base
    base = torch.tensor([5.0, -1.0])
    got = nuslerp(base, [base + e1, base + e2], [{"weight": 1.0}, {"weight": 1.0}], {}, {})
    torch.testing.assert_close(got, base + half)
    # weights summing to ~0: t = 0.5
    torch.testing.assert_close(nuslerp(None, [e1, e2], [{"weight": 1.0}, {"weight": -1.0}], {}, {}), half)


def test_nuslerp_rows_columns_and_parallel_inputs() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    rows = nuslerp_pair(0.5, a, b, flatten=False)
    torch.testing.assert_close(rows[0], torch.tensor([0.5**0.5, 0.5**0.5]))
    torch.testing.assert_close(rows[1], torch.tensor([1.5, 0.0]))  # parallel row: linear interpolation
    cols = nuslerp_pair(0.3, a, b, row_wise=True, flatten=False)
    torch.testing.assert_close(cols, nuslerp_pair(0.3, a.T, b.T, flatten=False).T)


def test_multislerp_hand_cases() -> None:
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = multislerp(None, [e1, 3 * e2], [{"weight": 1.0}, {"weight": 1.0}], {}, {})
    # mean direction (1, 1)/sqrt2, tangent parts cancel, norm = mean of the norms = 2
    torch.testing.assert_close(out, torch.tensor([2 * 0.5**0.5, 2 * 0.5**0.5]))
    # unequal weights, by the definition: tangent-space mean at the normalized weighted mean, exp map back
    w = [0.25, 0.75]
    m = np.array([0.25, 0.75]) / math.hypot(0.25, 0.75)
    tangents = [np.array(u) - np.dot(u, m) * m for u in ([1.0, 0.0], [0.0, 1.0])]
    step = w[0] * tangents[0] + w[1] * tangents[1]
    n = np.linalg.norm(step) + 1e-8
    ref = (m * math.cos(n) + step * math.sin(n) / n) * (0.25 * 1 + 0.75 * 3)
    got = multislerp(None, [e1, 3 * e2], [{"weight": 1.0}, {"weight": 3.0}], {}, {})
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32))
    # one model is itself; two opposite directions fall back to linear interpolation; more cannot
    x = torch.tensor([0.3, -0.2])
    assert torch.equal(multislerp(None, [x], [{"weight": 2.0}], {}, {}), x)
    torch.testing.assert_close(multislerp(None, [e1, -e1], _mp(2, weight=1.0), {}, {}), torch.zeros(2))
    with pytest.raises(ValueError, match="cancel"):
        multislerp(None, [e1, -e1, e1 * 0], _mp(3, weight=1.0), {}, {})
    with pytest.raises(ValueError, match="sum to 0"):
        multislerp(None, [e1, e2], [{"weight": 1.0}, {"weight": -1.0}], {}, {})


def test_karcher_hand_cases() -> None:
    e1, e2, e3 = torch.eye(3)
    # two directions: the geodesic midpoint, scaled by the mean norm
    out = karcher(None, [2 * e1, 4 * e2], _mp(2, weight=1.0), {}, {})
    torch.testing.assert_close(out, 3 * torch.tensor([0.5**0.5, 0.5**0.5, 0.0]))
    # weighted: the point at w2 / (w1 + w2) of the geodesic (evomerge's weights; mergekit's are equal)
    out = karcher(None, [e1, e2], [{"weight": 1.0}, {"weight": 3.0}], {}, {"max_iter": 20, "tol": 1e-7})
    torch.testing.assert_close(out, torch.tensor([math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8), 0.0]))
    # symmetric triple: the centroid direction
    out = karcher(None, [e1, e2, e3], _mp(3, weight=1.0), {}, {})
    torch.testing.assert_close(out, torch.full((3,), 3**-0.5))
    # a zero tensor is left out of the direction but counts in the norm
    out = karcher(None, [2 * e1, 0 * e2], _mp(2, weight=1.0), {}, {})
    torch.testing.assert_close(out, e1)
    with pytest.raises(ValueError, match="positive sum"):
        karcher(None, [e1, e2], _mp(2, weight=0.0), {}, {})


# -------------------------------------------------------------------------------- nearswap, arcee fusion


def test_nearswap_hand_case() -> None:
    a = torch.zeros(3)
    b = torch.tensor([0.001, 0.1, -0.5])
    # w = clamp(0.01 / |a - b|) = [1, 0.1, 0.02]
    out = nearswap(a, [b], _mp(1), {"t": 0.01}, {})
    torch.testing.assert_close(out, torch.tensor([0.001, 0.01, -0.01]))
    assert torch.equal(nearswap(a, [b], _mp(1), {"t": 0.0}, {}), a)
    torch.testing.assert_close(nearswap(a, [b], _mp(1), {"t": 1.0}, {}), b)


def _naive_fusion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Arcee Fusion from its definition with numpy (float64) and a full sort."""
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    imp = np.abs(b - a) * np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    s = np.sort(imp.reshape(-1))
    n = s.size
    thr = s[2 * (n - 1) // 4] + 1.5 * (s[3 * (n - 1) // 4] - s[(n - 1) // 4])
    return np.where(imp >= thr, b, a)


def test_arcee_fusion_matches_its_definition() -> None:
    base, (x,) = seeded_tensors((40, 24), 1, seed=21, scale=0.3)
    out = arcee_fusion(base, [x], _mp(1), {}, {})
    ref = _naive_fusion(base.double().numpy(), x.double().numpy())
    changed = out != base
    assert 0 < int(changed.sum()) < out.numel() // 2  # a few entries take the model's value
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=1e-6)
    assert torch.equal(arcee_fusion(base, [base.clone()], _mp(1), {}, {}), base)


def test_quartiles_are_exact_order_statistics_on_large_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1_200_001, generator=g)  # above mergekit's 1M sampling size and the selection's sort size
    s = torch.sort(x).values
    n = x.numel()
    q1, q2, q3 = quartiles(x)
    assert (q1.item(), q2.item(), q3.item()) == (s[(n - 1) // 4].item(), s[(n - 1) // 2].item(),
                                                 s[3 * (n - 1) // 4].item())
    calls: list[int] = []
    real = pairwise.select_rank
    monkeypatch.setattr(pairwise, "select_rank", lambda v, r: calls.append(r) or real(v, r))
    quartiles(x)
    assert calls == [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]  # selection through the public helper


# --------------------------------------------------------------------------------------------------- RAM


def test_ram_and_ramplus_hand_cases() -> None:
    base = torch.zeros(4)
    t1, t2 = torch.tensor([0.5, 0.2, 0.0, 0.3]), torch.tensor([0.1, 0.0, 0.0, 0.5])
    # active (|tau| > 0.15): t1 at 0, 1, 3; t2 at 3 -> 0, 1 unique to t1, 3 shared (mean), t2's 0.1 dropped
    out = ram(base, [t1, t2], _mp(2), {"epsilon": 0.15}, {})
    torch.testing.assert_close(out, torch.tensor([0.5, 0.2, 0.0, 0.4]))
    # RAM+: t1 has 1 shared / 2 unique -> rho 0.5, capped at alpha 0.2 -> unique entries x (1 + 0.5 * 0.2)
    out = ramplus_tl(base, [t1, t2], _mp(2), {"epsilon": 0.15, "r": 0.5, "alpha": 0.2}, {})
    torch.testing.assert_close(out, torch.tensor([0.55, 0.22, 0.0, 0.4]))
    out = ramplus_tl(base, [t1, t2], _mp(2), {"epsilon": 0.15, "r": 0.5, "alpha": 1.0}, {})
    torch.testing.assert_close(out, torch.tensor([0.5 * 1.25, 0.2 * 1.25, 0.0, 0.4]))


def test_passthrough_scales_one_model() -> None:
    x = torch.tensor([1.0, -2.0])
    torch.testing.assert_close(passthrough(None, [x], [{"scale": 0.5}], {}, {}), x * 0.5)
    assert torch.equal(passthrough(None, [x], _mp(1), {}, {}), x)
    with pytest.raises(ValueError, match="exactly 1"):
        passthrough(None, [x, x], _mp(2), {}, {})


# ----------------------------------------------------------------------------------- table over the methods


@dataclass(frozen=True)
class Case:
    """How to call one method in the table: inputs, values, and whether one model is the identity."""

    n_models: int
    with_base: bool
    model_params: dict[str, float] = field(default_factory=dict)
    params: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    identity: bool = True  # one model (or two copies of it) merges into that model


TABLE: dict[str, Case] = {
    "della": Case(3, True, {"weight": 0.7, "density": 0.6, "epsilon": 0.2}, {"lambda": 1.1}),
    "della_linear": Case(3, True, {"weight": 0.7, "density": 0.6, "epsilon": 0.2}, {"lambda": 1.1}),
    "sce": Case(3, True, {}, {"select_topk": 0.5}),
    "nuslerp": Case(2, True, {"weight": 0.4}),
    "multislerp": Case(3, True, {"weight": 0.4}),
    "karcher": Case(3, False, {"weight": 0.5}),
    "nearswap": Case(1, True, {}, {"t": 0.005}, identity=False),
    "arcee_fusion": Case(1, True, identity=False),
    "ram": Case(3, True, {}, {"epsilon": 0.004}),
    "ramplus_tl": Case(3, True, {}, {"epsilon": 0.004, "r": 0.5, "alpha": 0.5}),
    "passthrough": Case(1, False, {"scale": 0.9}, identity=False),
}


def test_the_table_covers_every_added_method() -> None:
    assert set(TABLE) == set(EXTENDED)
    assert set(EXTENDED) <= set(REGISTRY.names())


def _call(name: str, base: torch.Tensor, tensors: list[torch.Tensor], options: dict[str, Any],
          model_params: list[dict[str, float]] | None = None, params: dict[str, float] | None = None) -> torch.Tensor:
    c = TABLE[name]
    method = REGISTRY.get(name)
    mp = model_params if model_params is not None else [dict(c.model_params) for _ in tensors]
    b = base if c.with_base or options.get("inputs_are_deltas") else None
    return method.fn(b, tensors, mp, {**c.params, **(params or {})}, {**c.options, **options},
                     torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", EXTENDED)
def test_task_vectors_as_inputs_give_the_same_merge(name: str) -> None:
    """The resident merger hands kernels task vectors and always a base (``base_given`` says if it is one)."""
    c = TABLE[name]
    base, tensors = seeded_tensors((23, 11), c.n_models, seed=14)
    full = _call(name, base, tensors, {})
    extra = {} if c.with_base else {"base_given": False}
    via = _call(name, base, [t - base for t in tensors], {"inputs_are_deltas": True, **extra})
    torch.testing.assert_close(via, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", EXTENDED)
def test_kernels_leave_inputs_untouched_and_keep_shape_and_dtype(name: str) -> None:
    c = TABLE[name]
    base, tensors = seeded_tensors((10, 10), c.n_models, seed=15)
    copies, base_copy = [t.clone() for t in tensors], base.clone()
    out = _call(name, base, tensors, {"compute_dtype": "float64"})
    assert out.dtype == torch.float64 and out.shape == base.shape
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies)) and torch.equal(base, base_copy)
    assert all(out is not t for t in (base, *tensors))
    bf16 = _call(name, base.bfloat16(), [t.bfloat16() for t in tensors], {})
    assert bf16.dtype == torch.float32 and bf16.shape == base.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in EXTENDED if TABLE[n].identity])
def test_one_model_or_copies_of_it_merge_into_that_model(name: str) -> None:
    c = TABLE[name]
    method = REGISTRY.get(name)
    base, (x,) = seeded_tensors((23, 11), 1, seed=13)
    n = max(1, method.min_models)
    copies = [x.clone() for _ in range(n)]
    mp = [{**c.model_params, "density": 1.0, "weight": 1.0} for _ in copies]
    # neutral values: no scaling (lambda), no selection (select_topk), every change active (RAM's epsilon)
    out = _call(name, base, copies, {}, mp, {"lambda": 1.0, "select_topk": 1.0, "epsilon": 0.0})
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", EXTENDED)
def test_every_added_method_says_whether_it_draws_or_stacks(name: str) -> None:
    """(Docs and bounds of every method: test_registry.py.)"""
    d = REGISTRY.get(name).describe()
    assert d["uses_generator"] == (name in ("della", "della_linear"))
    assert d["stacks_layers"] == (name == "passthrough")


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("quantized", [False, True])
def test_sce_selection_is_torch_variance_selection(n_models: int, quantized: bool) -> None:
    """The fast float64 variance selects exactly what torch.var (mergekit's computation) selects."""
    from evomerge.merge.kernels.sce import variance_mask
    from evomerge.merge.kernels.sparsify import topk_mask

    g = torch.Generator().manual_seed(n_models)
    deltas = torch.randn(n_models, 300, 700, generator=g) * 0.01
    if quantized:  # bf16 deltas: many exactly equal variances (ties broken by index in both)
        deltas = deltas.bfloat16().float()
    for keep in (0.05, 0.3, 0.8):
        var = torch.var(deltas, dim=0, unbiased=False)
        want = topk_mask(var, int(torch.count_nonzero(var) * keep))
        got = variance_mask(deltas, keep)
        assert got is not None and torch.equal(got, want), keep


def test_della_in_the_engine_draws_from_the_per_tensor_generator(tiny_llamas: list[Path], tmp_path: Path) -> None:
    """Each tensor's masks come from ``tensor_generator(seed, name)`` (MergePlan.generator): the same in any
    tensor order or worker count, different for another seed."""
    from evomerge.merge.engines.disk import merge_to_disk
    from evomerge.merge.methods.resolve import tensor_generator
    from evomerge.merge.recipe import Recipe

    root, paths = tmp_path, tiny_llamas[:3]
    recipe = Recipe.from_dict({"method": "della", "base_model": str(paths[0]), "seed": 5,
                               "models": [{"model": str(paths[1]), "parameters": {"density": 0.4, "epsilon": 0.2}},
                                          {"model": str(paths[2]), "parameters": {"density": [0.3, 0.8]}}]})
    merge_to_disk(recipe, root / "one", progress=False, workers=1)
    merge_to_disk(recipe, root / "two", progress=False, workers=2)
    merge_to_disk(recipe, root / "seed6", progress=False, seed=6)
    one, two, other = load_state(root / "one"), load_state(root / "two"), load_state(root / "seed6")
    states = [load_state(p) for p in paths]
    method = REGISTRY.get("della")
    for name, got in one.items():
        assert torch.equal(got, two[name])
        layer = int(name.split(".")[2]) if ".layers." in name else None
        u = 0.0 if layer is None else layer / 2
        mp = [{"weight": 1.0, "density": 0.4, "epsilon": 0.2},
              {"weight": 1.0, "density": 0.3 + 0.5 * u, "epsilon": 0.15}]
        want = method.fn(states[0][name], [states[1][name], states[2][name]], mp, {"lambda": 1.0},
                         {"normalize": True}, tensor_generator(5, name))
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert any(not torch.equal(one[n], other[n]) for n in one)
