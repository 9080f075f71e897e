"""Behaviour-aware breeding: niche fitness, attraction, identical pairs, escape moves (hand cases), and the manager
on a fake backend whose members' per-item scores are known, so the complementary partner is known."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.search.events import EventKind
from evomerge.search.population.behaviour import (
    Behaviour,
    attraction,
    attraction_to_set,
    behaviour_distance,
    behaviour_matrix,
    competition_normalized,
    niche_fitness,
)
from evomerge.search.population.manager import PairResult, PopulationManager
from evomerge.search.population.members import Member
from evomerge.search.population.rules import (
    PairPlan,
    PopulationConfig,
    escape_plans,
    partner_choice,
    revival_choices,
)


def _b(rows: Mapping[str, Sequence[float]], weights: Sequence[float] | None = None) -> Behaviour:
    keys = tuple(rows)
    s = np.array([rows[k] for k in keys], float)
    w = np.full(s.shape[1], 1.0 / s.shape[1]) if weights is None else np.asarray(weights, float)
    return Behaviour(keys, s, w)


# ------------------------------------------------------------------------------------------- hand cases


def test_niche_fitness_hand_case() -> None:
    # items: 0 and 1 solved by a and b, item 2 by c alone; weights 1/3 each
    b = _b({"a": [1, 1, 0], "b": [1, 1, 0], "c": [0, 0, 1]})
    # alpha 0: the plain aggregate
    np.testing.assert_allclose(niche_fitness(b, 0.0), [2 / 3, 2 / 3, 1 / 3])
    # alpha 1: a = 1/3 (1/2 + 1/2) = 1/3, c = 1/3 * 1/1 = 1/3
    np.testing.assert_allclose(niche_fitness(b, 1.0), [1 / 3, 1 / 3, 1 / 3])
    # alpha 2: a = 1/3 (1/4 + 1/4) = 1/6, c = 1/3
    np.testing.assert_allclose(niche_fitness(b, 2.0), [1 / 6, 1 / 6, 1 / 3])
    with pytest.raises(ValueError, match="alpha"):
        niche_fitness(b, -1.0)


def test_niche_fitness_fractional_scores_and_unsolved_items() -> None:
    b = _b({"a": [0.5, 0.0], "b": [0.25, 0.0]}, weights=[0.75, 0.25])
    # item 0: sum 0.75 -> a = 0.75 * 0.5 / 0.75 = 0.5, b = 0.75 * 0.25 / 0.75 = 0.25; item 1 nobody: worth 0
    np.testing.assert_allclose(niche_fitness(b, 1.0), [0.5, 0.25])
    np.testing.assert_allclose(niche_fitness(b, 0.0), [0.375, 0.1875])


def test_niche_fitness_counts_gains_over_the_floor() -> None:
    # a graded metric: everyone guesses 0.25 on item 1, only c solves it (1.0); a and b solve item 0
    b = behaviour_matrix(["a", "b", "c"], {"t": (np.array([[1.0, 0.25], [1.0, 0.25], [0.25, 1.0]]),
                                                 np.ones((3, 2)))}, {"t": 1.0})
    assert b is not None
    np.testing.assert_allclose(b.floor, [0.25, 0.25])
    np.testing.assert_allclose(b.gains, [[0.75, 0.0], [0.75, 0.0], [0.0, 0.75]])
    # alpha 0: the plain aggregate, floor included
    np.testing.assert_allclose(niche_fitness(b, 0.0), [0.625, 0.625, 0.625])
    # alpha 1 on gains: a = 1/2 * 0.75 / 1.5 = 0.25, c = 1/2 * 0.75 / 0.75 = 0.5 (raw scores would give
    # a = 1/2 (1/2.25 + 0.25/1.5) = 0.3056, c = 1/2 (0.25/2.25 + 1/1.5) = 0.3889)
    np.testing.assert_allclose(niche_fitness(b, 1.0), [0.25, 0.25, 0.5])
    # attraction of c to a: c's whole share of item 1, nothing from item 0
    assert attraction(b, "a", 1.0)["c"] == pytest.approx(0.5)
    # a subset keeps the population's floor; a member below it gains 0, not a negative amount
    sub = b.subset(["a", "c"])
    np.testing.assert_allclose(sub.floor, [0.25, 0.25])
    low = Behaviour(("x",), np.array([[0.1, 0.5]]), np.array([0.5, 0.5]), np.array([0.25, 0.25]))
    np.testing.assert_allclose(low.gains, [[0.0, 0.25]])


def test_attraction_hand_case() -> None:
    b = _b({"a": [1, 1, 0, 0], "b": [1, 1, 0, 0], "c": [0, 0, 1, 0], "d": [1, 0, 1, 1]})
    # alpha 1: item sums 3, 2, 2, 1; F = w s / z with w = 1/4
    f = competition_normalized(b, 1.0)
    np.testing.assert_allclose(f[3], [1 / 12, 0, 1 / 8, 1 / 4])
    att = attraction(b, "a", 1.0)
    assert att["b"] == 0.0  # b solves nothing a fails
    assert att["c"] == pytest.approx(1 / 8)
    assert att["d"] == pytest.approx(1 / 8 + 1 / 4)  # items 2 and 3; item 0 a already solves
    # the set {a, c}: d's item 3 only, and its share of item 2 equals c's
    assert attraction_to_set(b, ["a", "c"], 1.0) == {"b": 0.0, "d": pytest.approx(1 / 4)}


def test_behaviour_distance_and_identity() -> None:
    b = _b({"a": [1, 0.5, 0], "b": [1, 0.5, 0], "c": [0, 0.5, 1]})
    assert behaviour_distance(b, "a", "b") == 0.0
    assert behaviour_distance(b, "a", "c") == pytest.approx(2 / 3)


def test_behaviour_matrix_weights_missing_items_and_directions() -> None:
    nan = np.nan
    tasks = {
        "t1": (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 3.0], [1.0, 3.0]])),
        # b was raced and saw only item 0: its item 1 is its mean on what it saw (0.5)
        "t2": (np.array([[1.0, 0.0], [0.5, nan]]), np.array([[1.0, 1.0], [1.0, 0.0]])),
    }
    b = behaviour_matrix(["a", "b"], tasks, {"t1": 1.0, "t2": 3.0})
    assert b is not None
    np.testing.assert_allclose(b.weights, [0.25 * 0.25, 0.25 * 0.75, 0.75 * 0.5, 0.75 * 0.5])
    np.testing.assert_allclose(b.scores, [[1, 0, 1, 0], [0, 1, 0.5, 0.5]])
    # the plain aggregate: a = 0.25 * (1/4) + 0.75 * (1/2); alpha 0 gives exactly that
    np.testing.assert_allclose(niche_fitness(b, 0.0)[0], 0.25 * 0.25 + 0.75 * 0.5)
    # lower is better: negated, then shifted so the population minimum is 0
    low = behaviour_matrix(["a", "b"], {"p": (np.array([[2.0], [5.0]]), np.ones((2, 1)))}, {"p": 1.0}, ["p"])
    assert low is not None
    np.testing.assert_allclose(low.scores[:, 0], [3.0, 0.0])
    # a member with no result on a task: no behaviour
    assert behaviour_matrix(["a", "b"], {"t": (np.array([[1.0], [nan]]), np.ones((2, 1)))}, {"t": 1.0}) is None


# ------------------------------------------------------------------------------------------- rules


def _kin_table(values: Mapping[tuple[str, str], float]) -> Any:
    def kin(a: str, b: str) -> float:
        return values.get((a, b), values.get((b, a), 0.0))
    return kin


def test_partner_choice_by_kinship_attraction_and_both() -> None:
    pop = [Member("best", 0.8), Member("twin", 0.79), Member("far", 0.5), Member("comp", 0.6)]
    kin = _kin_table({("best", "twin"): 0.99, ("best", "far"): -0.5, ("best", "comp"): 0.6})
    attract = {"twin": 0.0, "far": 0.01, "comp": 0.3}
    assert partner_choice("best", pop, kin, PopulationConfig(partner="kinship"), set(), attract)[0] == "far"
    assert partner_choice("best", pop, kin, PopulationConfig(partner="attraction"), set(), attract) == \
        ("comp", None, 0.3)
    # both: comp 1 + (1 - 0.8) = 1.2; far 0.01/0.3 + (1 - 0.25) = 0.783; twin 0 + 0.005
    choice = partner_choice("best", pop, kin, PopulationConfig(partner="both"), set(), attract)
    assert choice is not None and choice[0] == "comp" and choice[1] == 0.6
    # no per-item results: kinship, whatever the setting
    assert partner_choice("best", pop, kin, PopulationConfig(partner="attraction"), set(), None)[0] == "far"
    # nobody attracted: attraction falls back to the least related
    zero = dict.fromkeys(attract, 0.0)
    assert partner_choice("best", pop, kin, PopulationConfig(partner="attraction"), set(), zero)[0] == "far"
    # merged pairs are excluded
    assert partner_choice("best", pop, kin, PopulationConfig(partner="attraction"), {("best", "comp")},
                          attract)[0] == "far"


def test_revival_by_attraction_prefers_the_complement() -> None:
    pop = [Member("t1", 0.8), Member("t2", 0.79), Member("x", 0.7), Member("y", 0.6)]
    top = pop[:2]
    kin = _kin_table({("x", "t1"): 0.1, ("x", "t2"): 0.1, ("y", "t1"): 0.5, ("y", "t2"): 0.5})
    # kinship: x (higher score, lower kinship)
    assert [c[0].key for c in revival_choices(pop, top, kin, PopulationConfig(revive_count=1), set())] == ["x"]
    # attraction: priority = score_norm + attraction / max; scores normalized over 0.6..0.8:
    # x = 0.5 + 0 = 0.5, y = 0 + 1 = 1 -> y; kinship is not used (NaN)
    cfg = PopulationConfig(revive_count=1, partner="attraction")
    chosen = revival_choices(pop, top, kin, cfg, set(), attract={"x": 0.0, "y": 0.5})
    assert chosen[0][0].key == "y" and chosen[0][1] == pytest.approx(1.0) and np.isnan(chosen[0][3])
    # both: x = 0.5 - 0.55 + 0 = -0.05; y = 0 - 0.75 + 1 = 0.25 -> y
    got = revival_choices(pop, top, kin, PopulationConfig(revive_count=1, partner="both"), set(),
                          attract={"x": 0.0, "y": 0.5})
    assert got[0][0].key == "y" and got[0][1] == pytest.approx(0.25)


def test_escape_plans() -> None:
    top = [Member("best", 0.8), Member("t2", 0.7)]
    pop = [*top, Member("c1", 0.5), Member("c2", 0.4), Member("none", 0.3)]
    cfg = PopulationConfig(pair_budget=4)
    plans = escape_plans(top, pop, set(), cfg, {"t2": 0.1, "c1": 0.3, "c2": 0.2, "none": 0.0})
    assert plans == [PairPlan("best", "c1", "escape", None, 0.3, budget=8),
                     PairPlan("best", "c2", "crossover", None, 0.2, operator="crossover", budget=8)]
    assert PairPlan.from_dict(plans[1].to_dict()) == plans[1]
    assert escape_plans(top, pop, set(), PopulationConfig(crossover=False, escape_pair_budget=3),
                        {"c1": 0.3})[0].budget == 3
    assert escape_plans(top, pop, set(), cfg, dict.fromkeys(["t2", "c1", "c2", "none"], 0.0)) == []


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="partner"):
        PopulationConfig.from_dict({"partner": "random"})
    with pytest.raises(ConfigError, match="niche_alpha"):
        PopulationConfig.from_dict({"niche_alpha": -0.5})
    with pytest.raises(ConfigError, match="identical_tol"):
        PopulationConfig.from_dict({"identical_tol": 2})
    assert PopulationConfig.from_dict({"pair_budget": 5}).escape_budget == 10


# ------------------------------------------------------------------------------------------- the manager


class ItemsBackend:
    """Members with known per-item scores: a child solves what either parent solves, a little worse
    (``keep``); its aggregate is the mean of its items. Kinship comes from a table (children: their better
    parent's row), so kinship and attraction can point at different partners."""

    def __init__(self, items: Mapping[str, Sequence[float]], kin: Mapping[tuple[str, str], float],
                 keep: float = 0.95) -> None:
        self.items = {k: np.asarray(v, float) for k, v in items.items()}
        self.kin_table = dict(kin)
        self.keep = keep
        self.evals = 0
        self.log: list[dict[str, Any]] = []
        self.pairs: list[PairPlan] = []
        self.origin: dict[str, str] = {k: k for k in items}

    def originals(self) -> list[Member]:
        return [Member(k, float(v.mean()), candidate_id=i) for i, (k, v) in enumerate(self.items.items())]

    def kinship(self, a: str, b: str) -> float:
        if self.origin[a] == self.origin[b]:
            return 1.0
        pair = (self.origin[a], self.origin[b])
        return self.kin_table.get(pair, self.kin_table.get(pair[::-1], 0.0))

    def behaviour(self, keys: list[str]) -> Behaviour:
        s = np.stack([self.items[k] for k in keys])
        return Behaviour(tuple(keys), s, np.full(s.shape[1], 1.0 / s.shape[1]))

    def run_pair(self, plan: PairPlan, generation: int, budget: int) -> PairResult:
        used = max(1, budget)
        self.evals += used
        self.pairs.append(plan)
        key = f"g{generation}:{plan.a}+{plan.b}"
        self.items[key] = self.keep * np.maximum(self.items[plan.a], self.items[plan.b])
        better = plan.a if self.items[plan.a].mean() >= self.items[plan.b].mean() else plan.b
        self.origin[key] = self.origin[better]
        return PairResult(Member(key, float(self.items[key].mean()), generation, (plan.a, plan.b),
                                 candidate_id=100 + self.evals), used)

    def evaluations(self) -> int:
        return self.evals

    def events(self) -> list[dict[str, Any]]:
        return list(self.log)

    def record_event(self, kind: EventKind, payload: Mapping[str, Any]) -> None:
        self.log.append({"kind": kind, "payload": dict(payload)})


# items 0-3: skill P (a and a2 are the same model, b half of it); items 4-5: skill Q, only q solves it;
# far: unrelated weights, solves nothing new
ITEMS = {"a": [1, 1, 1, 1, 0, 0], "a2": [1, 1, 1, 1, 0, 0], "b": [1, 1, 0, 0, 0, 0], "q": [0, 0, 0, 0, 1, 1],
         "far": [0, 0, 1, 0, 0, 0]}
KIN = {("a", "q"): 0.8, ("a", "far"): -0.9, ("a", "b"): 0.3, ("a2", "q"): 0.8, ("a2", "far"): -0.9,
       ("b", "q"): 0.8, ("b", "far"): -0.9, ("q", "far"): -0.9}


def _run(cfg: PopulationConfig, budget: int = 60) -> tuple[ItemsBackend, PopulationManager]:
    backend = ItemsBackend(ITEMS, KIN)
    manager = PopulationManager(backend, cfg, budget)
    manager.run()
    return backend, manager


def test_identical_parents_are_skipped_with_an_event() -> None:
    backend, manager = _run(PopulationConfig(k=2, pair_budget=1, seed_models=("a", "a2", "b")))
    skipped = [e["payload"] for e in backend.log if e["kind"] == EventKind.PAIR_SKIPPED]
    assert [(p["a"], p["b"]) for p in skipped][:1] == [("a", "a2")] and skipped[0]["distance"] == 0.0
    assert all({p.a, p.b} != {"a", "a2"} for p in backend.pairs)
    # without the rule the pair is merged
    backend, _ = _run(PopulationConfig(k=2, pair_budget=1, seed_models=("a", "a2", "b"), identical_tol=None))
    assert any({p.a, p.b} == {"a", "a2"} for p in backend.pairs)


def test_the_manager_picks_the_complementary_partner() -> None:
    # generation 1 merges a, b, far (q is left out of the seed set); the best child solves skill P only.
    # Exploration: kinship picks the least related model, attraction picks `q` (solves what the best fails).
    seeds = ("a", "b", "far")
    kin_backend, _ = _run(PopulationConfig(k=2, pair_budget=1, seed_models=seeds, partner="kinship",
                                           niche_alpha=0.0, max_escapes=0, max_revivals=0))
    explore = [p for p in kin_backend.pairs if p.reason == "exploration"]
    # a x far was merged in generation 1: the least related left is the child of b and far (kinship 0.3), not q
    assert explore and explore[0].b == "g1:b+far"
    att_backend, manager = _run(PopulationConfig(k=2, pair_budget=1, seed_models=seeds, partner="attraction",
                                                 niche_alpha=0.0, max_escapes=0, max_revivals=0))
    explore = [p for p in att_backend.pairs if p.reason == "exploration"]
    assert explore[0].b == "q" and explore[0].attraction > 0
    # the child of that merge solves both skills: the best by the plain aggregate
    best = max(manager.members.values(), key=lambda m: m.score)
    assert "q" in best.parents


def test_niche_fitness_keeps_the_rare_specialist_in_the_top_k() -> None:
    backend = ItemsBackend({"p1": [1, 1, 1, 0], "p2": [1, 1, 1, 0], "p3": [1, 1, 0.9, 0], "r": [0, 0, 0, 1]},
                           {("p1", "r"): 0.1})
    plain = PopulationManager(backend, PopulationConfig(k=2, niche_alpha=0.0), 10)
    niche = PopulationManager(backend, PopulationConfig(k=2, niche_alpha=1.0), 10)
    for m in backend.originals():
        plain.members[m.key] = m
        niche.members[m.key] = m
    assert [m.key for m in plain._top()] == ["p1", "p2"]
    # alpha 1: item sums 3, 3, 2.9, 1; p1 = p2 = 1/4 (1/3 + 1/3 + 1/2.9) = 0.2529, r = 1/4, p3 = 0.2443
    assert [m.key for m in niche._top()] == ["p1", "p2"]
    # alpha 2: p1 = 1/4 (2/9 + 1/8.41) = 0.0853, r = 1/4: the rare specialist leads
    niche2 = PopulationManager(backend, PopulationConfig(k=2, niche_alpha=2.0), 10)
    for m in backend.originals():
        niche2.members[m.key] = m
    assert [m.key for m in niche2._top()] == ["r", "p1"]


def test_escape_moves_after_saturation_and_resume_replays_them() -> None:
    cfg = PopulationConfig(k=2, pair_budget=2, seed_models=("a", "b", "far"), saturation=0.5, explore=False,
                           max_revivals=0, partner="both")
    backend, manager = _run(cfg, budget=40)
    reasons = [p.reason for p in backend.pairs]
    assert "escape" in reasons
    esc = next(p for p in backend.pairs if p.reason == "escape")
    # niche fitness puts the rare specialist q first; its most attracted partner is a (skill P)
    assert esc.budget == 4 and {esc.a, esc.b} == {"q", "a"}
    plans = [e["payload"] for e in backend.log if e["kind"] == EventKind.GENERATION_PLAN and e["payload"].get("escape")]
    assert plans and plans[0]["escape"] == 1
    # a fresh manager over the same events replays the escape count and the merged pairs
    again = PopulationManager(backend, cfg, 40)
    again.run()
    assert again.escapes == manager.escapes


def test_a_saturated_top_k_refines_the_best_before_escaping() -> None:
    def plans(leader_first: bool) -> dict[int, list[tuple[str, str, str]]]:
        cfg = PopulationConfig(k=2, pair_budget=2, seed_models=("a", "b", "far"), saturation=0.5, explore=False,
                               max_revivals=0, partner="both", refine_leader=3, leader_first=leader_first)
        backend, _ = _run(cfg, budget=40)
        return {e["payload"]["generation"]: [(p["a"], p["b"], p["reason"]) for p in e["payload"]["plans"]]
                for e in backend.log if e["kind"] == EventKind.GENERATION_PLAN}

    # generation 3's escape made the best (g3:a+q, items P and Q); the top-k saturates again after it
    first = plans(True)
    assert first[3] == [("a", "q", "escape")]
    # its merge is searched again before any other escape move, although generation 3 made it
    assert first[4] == [("g3:a+q", "g3:a+q", "leader")]
    assert first[5] == [("g3:a+q", "q", "escape"), ("g3:a+q", "a", "crossover")]
    # without leader_first: the escapes first; the refine waits for a generation that made none better
    later = plans(False)
    assert later[4] == first[5] and later[5] == first[4]
    with pytest.raises(ConfigError, match="population.leader_first: true or false"):
        PopulationConfig(leader_first=1)  # type: ignore[arg-type]
