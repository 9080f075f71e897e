"""Population manager (Algorithm 1) on a fake backend: pairing rules, stopping rules, revival, resume.

The fake backend gives every model a small "task vector" (numpy); a child's vector is a weighted mix of its
parents', so kinship is a real Pearson correlation, and its score is a deterministic function of the parents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.search.events import EventKind
from evomerge.search.population.manager import PairResult, PopulationManager
from evomerge.search.population.members import JOINT_KEY, Member, pair_key, top_k
from evomerge.search.population.rules import (
    PairPlan,
    PopulationConfig,
    exploration_partner,
    plan_generation,
    revival_choices,
    screened_plans,
    screens,
)

ScoreFn = Callable[[Member, Member, str], float]


def _noise(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF - 0.5


class FakeBackend:
    def __init__(self, vectors: Mapping[str, np.ndarray], scores: Mapping[str, float], score_fn: ScoreFn,
                 metric: str = "pcc", evals_per_pair: int | None = None) -> None:
        self.vectors = {k: np.asarray(v, float) for k, v in vectors.items()}
        self.scores = dict(scores)
        self.score_fn = score_fn
        self.metric = metric
        self.evals = 0
        self.log: list[dict[str, Any]] = []
        self.pairs_run: list[tuple[str, str, int, int]] = []
        self.children: dict[str, Member] = {}
        self.fail_after: int | None = None
        self.evals_per_pair = evals_per_pair
        self.kinship_calls = 0

    def originals(self) -> list[Member]:
        return [Member(k, self.scores[k]) for k in self.scores]

    def kinship(self, a: str, b: str) -> float:
        self.kinship_calls += 1
        x, y = self.vectors[a], self.vectors[b]
        if self.metric == "ed":
            return float(np.linalg.norm(x - y))
        if self.metric == "cos":
            return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
        return float(np.corrcoef(x, y)[0, 1])

    def run_pair(self, plan: PairPlan, generation: int, budget: int) -> PairResult:
        if self.fail_after is not None and len(self.pairs_run) >= self.fail_after:
            raise RuntimeError("simulated crash")
        used = max(1, budget) if self.evals_per_pair is None else min(self.evals_per_pair, max(1, budget))
        self.evals += used
        if plan.operator == "refine":  # the merge that made plan.a, again: a child of its parents
            return self._refine(plan, generation, used)
        a, b = self._member(plan.a), self._member(plan.b)
        key = f"g{generation}:{plan.key[0]}+{plan.key[1]}"
        self.vectors[key] = 0.5 * (self.vectors[plan.a] + self.vectors[plan.b]) + 0.05 * np.array(
            [_noise(f"{key}:{i}") for i in range(len(self.vectors[plan.a]))])
        child = Member(key, self.score_fn(a, b, key), generation, (plan.a, plan.b), candidate_id=self.evals)
        self.children[key] = child
        self.pairs_run.append((plan.a, plan.b, generation, used))
        return PairResult(child, used)

    def _refine(self, plan: PairPlan, generation: int, used: int) -> PairResult:
        pa, pb = self.children[plan.a].parents
        key = f"g{generation}:refine:{plan.a}"
        self.vectors[key] = self.vectors[plan.a] + 0.01 * np.array(
            [_noise(f"{key}:{i}") for i in range(len(self.vectors[plan.a]))])
        child = Member(key, self.score_fn(self._member(pa), self._member(pb), key), generation, (pa, pb),
                       candidate_id=self.evals)
        self.children[key] = child
        self.pairs_run.append((plan.a, plan.b, generation, used))
        return PairResult(child, used)

    def _member(self, key: str) -> Member:
        return self.children[key] if key in self.children else Member(key, self.scores[key])

    def evaluations(self) -> int:
        return self.evals

    def events(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.log]

    def record_event(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.log.append({"kind": kind, "payload": dict(payload)})


def _vectors(n: int, dim: int = 12, seed: int = 0, shared: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim)
    return {f"m{i}": shared * common + rng.normal(size=dim) for i in range(n)}


def _gain_fn(a: Member, b: Member, key: str) -> float:
    """Children beat their parents' mean by a small, deterministic, pair-dependent amount."""
    return 0.5 * (a.score + b.score) + 0.08 + 0.02 * _noise(key)


def _events(backend: FakeBackend, kind: str) -> list[dict[str, Any]]:
    return [e["payload"] for e in backend.log if e["kind"] == kind]


# ------------------------------------------------------------------------------------------------- rules


def test_pairing_rules_over_a_whole_run() -> None:
    scores = {"m0": 0.50, "m1": 0.45, "m2": 0.40, "m3": 0.30, "m4": 0.20}
    backend = FakeBackend(_vectors(5), scores, _gain_fn)
    cfg = PopulationConfig(k=3, pair_budget=2, max_revivals=0, saturation=None, max_generations=6, screen=0)
    out = PopulationManager(backend, cfg, budget=1000).run()

    plans = _events(backend, "generation_plan")
    ends = {e["generation"]: e for e in _events(backend, "generation_end")}
    # generation 1: every pair of the 5 starting models, nothing else
    g1 = {pair_key(p["a"], p["b"]) for p in plans[0]["plans"]}
    assert g1 == {pair_key(f"m{i}", f"m{j}") for i in range(5) for j in range(i + 1, 5)}
    assert {p["reason"] for p in plans[0]["plans"]} == {"initial"}
    assert len(plans) >= 3
    merged_before: set[tuple[str, str]] = set(g1)
    for plan in plans[1:]:
        g = plan["generation"]
        top = ends[g - 1]["top"]
        expected_topk = {pair_key(top[i], top[j]) for i in range(3) for j in range(i + 1, 3)} - merged_before
        got = [p for p in plan["plans"]]
        assert {pair_key(p["a"], p["b"]) for p in got if p["reason"] == "top-k"} == expected_topk
        explore = [p for p in got if p["reason"] == "exploration"]
        assert len(explore) == 1
        ex = explore[0]
        assert ex["a"] == top[0]
        # the partner has the lowest kinship to the best among all members whose pair is still free
        members = [k for k in (*scores, *[c for c in backend.children if backend.children[c].generation < g])]
        free = [m for m in members if m != top[0] and pair_key(top[0], m) not in merged_before | expected_topk]
        kin = {m: backend.kinship(top[0], m) for m in free}
        assert ex["b"] == min(kin, key=kin.get)
        assert ex["kinship"] == pytest.approx(kin[ex["b"]])
        merged_before |= {pair_key(p["a"], p["b"]) for p in got}
    # no pair merged twice, and every pair run was planned
    ran = [pair_key(a, b) for a, b, _, _ in backend.pairs_run]
    assert len(ran) == len(set(ran))
    assert out.evaluations == sum(u for *_, u in backend.pairs_run) == 2 * len(ran)
    assert out.best.key == top_k(list(backend.children.values()) + backend.originals(), 1)[0].key


def test_ed_exploration_takes_the_largest_distance() -> None:
    vec = {"a": np.array([0.0, 0.0]), "b": np.array([1.0, 0.0]), "c": np.array([3.0, 4.0]),
           "d": np.array([0.0, 2.0])}
    backend = FakeBackend(vec, {"a": 0.9, "b": 0.5, "c": 0.1, "d": 0.4}, _gain_fn, metric="ed")
    members = backend.originals()
    cfg = PopulationConfig(k=2, metric="ed")
    assert exploration_partner("a", members, backend.kinship, "ed", set()) == ("c", 5.0)
    assert exploration_partner("a", members, backend.kinship, "ed", {pair_key("a", "c")}) == ("d", 2.0)
    plans = plan_generation(top_k(members, 2), members, set(), backend.kinship, cfg)
    assert [(p.a, p.b, p.reason) for p in plans] == [("a", "b", "top-k"), ("a", "c", "exploration")]
    # without kinship exploration (plain Top-k greedy) only the top-k pair remains
    plain = plan_generation(top_k(members, 2), members, set(), backend.kinship, PopulationConfig(k=2, explore=False))
    assert [(p.a, p.b) for p in plain] == [("a", "b")]


def test_stop_when_topk_does_not_change() -> None:
    """Children worse than every original: the top-k stays the originals, the run stops after generation 2."""
    scores = {"m0": 0.9, "m1": 0.8, "m2": 0.7, "m3": 0.1}
    backend = FakeBackend(_vectors(4), scores, lambda a, b, k: 0.0 + 0.01 * _noise(k))
    out = PopulationManager(backend, PopulationConfig(k=3, max_revivals=0, saturation=None), budget=500).run()
    assert out.stop_reason.startswith("converged")
    assert out.generations == 2
    assert [m.key for m in out.top] == ["m0", "m1", "m2"]
    ends = _events(backend, "generation_end")
    assert ends[0]["top"] == ends[1]["top"] == ["m0", "m1", "m2"]
    # generation 2: top-k pairs all merged in generation 1, so only the exploration merge ran
    g2 = [p for p in _events(backend, "generation_plan")[1]["plans"]]
    assert [p["reason"] for p in g2] == ["exploration"]


def test_stop_on_kinship_saturation() -> None:
    vec = _vectors(4, shared=8.0)  # strongly shared direction: pairwise Pearson > 0.9
    backend = FakeBackend(vec, {"m0": 0.4, "m1": 0.3, "m2": 0.2, "m3": 0.1}, _gain_fn)
    km = [backend.kinship(f"m{i}", f"m{j}") for i in range(4) for j in range(i + 1, 4)]
    assert min(km) > 0.9
    # (the leader refine off: with it, a saturated top-k refines its best first, see test_behaviour)
    out = PopulationManager(backend, PopulationConfig(k=3, max_revivals=0, refine_leader=0), budget=500).run()
    assert out.stop_reason.startswith("saturated")
    assert out.generations == 1
    # without per-item results the one escape left is refinement: the best member's merge searched again, once
    backend = FakeBackend(vec, {"m0": 0.4, "m1": 0.3, "m2": 0.2, "m3": 0.1}, _gain_fn)
    out = PopulationManager(backend, PopulationConfig(k=3, max_revivals=0, refine=True, refine_leader=0),
                            budget=500).run()
    assert out.stop_reason.startswith("saturated") and out.generations == 2
    best = out.history[0].best
    assert [p for p in out.history[1].plans] == [PairPlan(best, best, "refine", operator="refine", budget=16)]
    refined = backend.children[f"g2:refine:{best}"]
    assert refined.parents == backend.children[best].parents  # a child of the best member's parents
    done = [e for e in _events(backend, "pair_done") if e["generation"] == 2]
    assert done[0]["a"] == done[0]["b"] == best and tuple(done[0]["parents"]) == refined.parents
    # the same population with the threshold off keeps going
    backend2 = FakeBackend(vec, {"m0": 0.4, "m1": 0.3, "m2": 0.2, "m3": 0.1}, _gain_fn)
    out2 = PopulationManager(backend2, PopulationConfig(k=3, max_revivals=0, saturation=None), budget=500).run()
    assert out2.generations > 1


def test_stop_at_budget_and_max_generations() -> None:
    scores = {"m0": 0.5, "m1": 0.4, "m2": 0.3, "m3": 0.2}
    backend = FakeBackend(_vectors(4), scores, _gain_fn)
    out = PopulationManager(backend, PopulationConfig(k=3, pair_budget=4, saturation=None, screen=0), budget=10).run()
    assert out.stop_reason.startswith("budget")
    assert out.evaluations == 10  # 4 + 4 + the last pair cut to the 2 evaluations left
    assert [u for *_, u in backend.pairs_run] == [4, 4, 2]
    backend = FakeBackend(_vectors(4), scores, _gain_fn)
    out = PopulationManager(backend, PopulationConfig(k=3, saturation=None, max_generations=2, max_revivals=0, screen=0),
                            budget=1000).run()
    assert out.stop_reason.startswith(("max_generations", "converged"))
    assert out.generations <= 2


def test_revival_picks_high_score_low_kinship_abandoned_members() -> None:
    scores = {"m0": 0.9, "m1": 0.8, "m2": 0.7, "m3": 0.6, "m4": 0.55}
    backend = FakeBackend(_vectors(5, seed=3), scores, lambda a, b, k: 0.0 + 0.01 * _noise(k))
    cfg = PopulationConfig(k=2, saturation=None, revive_after=1, revive_count=1, max_revivals=2, explore=False)
    out = PopulationManager(backend, cfg, budget=1000).run()
    plans = _events(backend, "generation_plan")
    revivals = [p["revival"] for p in plans if p.get("revival")]
    assert revivals, "the best stalled: a revival must be recorded"
    first = revivals[0]
    assert "has not improved" in first["reason"] or first["reason"].startswith(("converged", "exhausted"))
    # the choice equals the documented priority over the abandoned members at that time
    end = next(e for e in _events(backend, "generation_end") if e["generation"] == first["generation"])
    pop = [m for m in backend.originals()] + [c for c in backend.children.values()
                                               if c.generation <= first["generation"]]
    top = [m for m in pop if m.key in end["top"]]
    merged = {pair_key(a, b) for a, b, g, _ in backend.pairs_run if g <= first["generation"]}
    want = revival_choices(pop, sorted(top, key=lambda m: -m.score), backend.kinship, cfg, set(), merged)
    assert [r["key"] for r in first["revived"]] == [w[0].key for w in want]
    assert all(r["key"] not in end["top"] for r in first["revived"])
    # the generation after a revival pairs the revived member with the top-k
    nxt = next(p for p in plans if p["generation"] == first["generation"] + 1)
    assert any(p["reason"] == "revival" and first["revived"][0]["key"] in (p["a"], p["b"]) for p in nxt["plans"])
    assert len(revivals) <= 2 and out.stop_reason


def test_revival_priority_prefers_low_kinship() -> None:
    vec = {"t": np.array([1.0, 0.0, 0.0, 1.0]), "near": np.array([1.0, 0.1, 0.0, 1.0]),
           "far": np.array([-1.0, 0.0, 1.0, 0.0])}
    backend = FakeBackend(vec, {"t": 0.9, "near": 0.5, "far": 0.49}, _gain_fn)
    members = backend.originals()
    top = [members[0]]
    cfg = PopulationConfig(k=2, revive_count=1)
    assert revival_choices(members, top, backend.kinship, cfg, set())[0][0].key == "far"
    score_only = PopulationConfig(k=2, revive_count=1, revive_kinship_weight=0.0)
    assert revival_choices(members, top, backend.kinship, score_only, set())[0][0].key == "near"
    assert revival_choices(members, top, backend.kinship, cfg, {"far"})[0][0].key == "near"


# ------------------------------------------------------------------------------------------------ resume


def _fingerprint(backend: FakeBackend) -> list[tuple[str, Any]]:
    out = []
    for e in backend.log:
        p = {k: v for k, v in e["payload"].items() if k != "reason" or e["kind"] != "stop"}
        out.append((e["kind"], repr(sorted(p.items()))))
    return out


def _crash_and_resume(make: Callable[[], FakeBackend], cfg: PopulationConfig, budget: int, crash_after: int
                      ) -> tuple[FakeBackend, Any, FakeBackend, Any]:
    """An uninterrupted run, and one that crashes after ``crash_after`` pairs and is resumed by a fresh manager on
    the same stored state (events, children, evaluations): (reference, its outcome, resumed, its outcome)."""
    ref = make()
    ref_out = PopulationManager(ref, cfg, budget=budget).run()
    crashing = make()
    crashing.fail_after = crash_after
    with pytest.raises(RuntimeError, match="simulated crash"):
        PopulationManager(crashing, cfg, budget=budget).run()
    assert len(crashing.pairs_run) == crash_after
    crashing.fail_after = None
    return ref, ref_out, crashing, PopulationManager(crashing, cfg, budget=budget).run()


@pytest.mark.parametrize("crash_after", [2, 7, 11])
def test_resume_mid_generation_matches_an_uninterrupted_run(crash_after: int) -> None:
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4, "m3": 0.3, "m4": 0.2}
    cfg = PopulationConfig(k=3, pair_budget=3, saturation=None, max_revivals=1, max_generations=5)
    ref, ref_out, crashing, out = _crash_and_resume(lambda: FakeBackend(_vectors(5), scores, _gain_fn), cfg, 200,
                                                    crash_after)
    assert [(a, b, g) for a, b, g, _ in crashing.pairs_run] == [(a, b, g) for a, b, g, _ in ref.pairs_run]
    assert _fingerprint(crashing) == _fingerprint(ref)
    assert out.best.key == ref_out.best.key and out.stop_reason == ref_out.stop_reason
    # resuming a finished run runs nothing more
    n = len(crashing.pairs_run)
    again = PopulationManager(crashing, cfg, budget=200).run()
    assert len(crashing.pairs_run) == n and again.best.key == ref_out.best.key


def test_resume_between_generation_end_and_next_plan() -> None:
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4, "m3": 0.3}
    cfg = PopulationConfig(k=3, pair_budget=1, saturation=None, max_revivals=0, max_generations=4)
    ref = FakeBackend(_vectors(4), scores, _gain_fn)
    PopulationManager(ref, cfg, budget=100).run()
    cut = next(i for i, e in enumerate(ref.log) if e["kind"] == "generation_end") + 1
    partial = FakeBackend(_vectors(4), scores, _gain_fn)
    # replay the reference's first generation into the store, as if the process died right after its end
    for e in ref.log[:cut]:
        partial.log.append(e)
    for a, b, g, u in ref.pairs_run:
        if g == 1:
            partial.run_pair(PairPlan(a, b, "initial"), 1, u)
    PopulationManager(partial, cfg, budget=100).run()
    assert _fingerprint(partial) == _fingerprint(ref)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="population.k"):
        PopulationConfig(k=1)
    with pytest.raises(ConfigError, match="population.metric"):
        PopulationConfig(metric="l2")
    with pytest.raises(ConfigError, match="population.bogus: unknown key"):
        PopulationConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="population.pair_rows: 'tasks' is not one of ancestors, competence"):
        PopulationConfig(pair_rows="tasks")
    with pytest.raises(ConfigError, match="population.refine: true or false, got 'yes'"):
        PopulationConfig.from_dict({"refine": "yes"})
    cfg = PopulationConfig.from_dict({"k": 4, "cache_disk": "1GB", "seed_models": ["a", "b"], "pair_budget": 0})
    assert cfg.k == 4 and cfg.cache_disk_bytes == 10**9 and cfg.seed_models == ("a", "b") and cfg.pair_budget == 0
    backend = FakeBackend(_vectors(3), {"m0": 0.1, "m1": 0.2, "m2": 0.3}, _gain_fn)
    with pytest.raises(ConfigError, match=r"seed_models: \['zz'\]"):
        PopulationManager(backend, PopulationConfig(seed_models=("m0", "zz")), budget=10).run()


def test_seed_set_restricts_generation_one() -> None:
    backend = FakeBackend(_vectors(4), {"m0": 0.1, "m1": 0.2, "m2": 0.3, "m3": 0.4}, _gain_fn)
    PopulationManager(backend, PopulationConfig(seed_models=("m1", "m3"), max_generations=1), budget=10).run()
    g1 = _events(backend, "generation_plan")[0]["plans"]
    assert [(p["a"], p["b"]) for p in g1] == [("m1", "m3")]
    assert math.isfinite(backend.children["g1:m1+m3"].score)


class FailingBackend(FakeBackend):
    """Some originals fail their evaluation; so does the child of one chosen pair."""

    def __init__(self, *args: Any, failed: set[str], failing_pair: tuple[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failed, self.failing_pair = failed, failing_pair

    def originals(self) -> list[Member]:
        return [Member(k, -1.0 if k in self.failed else self.scores[k], ok=k not in self.failed)
                for k in self.scores]

    def run_pair(self, plan: PairPlan, generation: int, budget: int) -> PairResult:
        out = super().run_pair(plan, generation, budget)
        if out.child is not None and plan.key == self.failing_pair:
            child = Member(out.child.key, -1.0, generation, out.child.parents, out.child.candidate_id, ok=False)
            self.children[child.key] = child
            return PairResult(child, out.evaluations)
        return out


def test_failed_members_are_excluded_from_pairing_and_said_so() -> None:
    """A failed original (a NaN fine-tune) is never paired; a failed child neither; both are events."""
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4, "m3": 0.3, "m4": 0.2}
    cfg = PopulationConfig(k=3, pair_budget=2, saturation=None, max_revivals=2, revive_after=1,
                           max_generations=5)
    backend = FailingBackend(_vectors(5), scores, _gain_fn, failed={"m3"}, failing_pair=("m0", "m1"))
    backend.fail_after = 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        PopulationManager(backend, cfg, budget=500).run()
    backend.fail_after = None
    PopulationManager(backend, cfg, budget=500).run()  # resumed: the exclusion is said once
    planned = [p for e in _events(backend, "generation_plan") for p in e["plans"]]
    assert planned and all("m3" not in (p["a"], p["b"]) for p in planned)
    assert all("m3" not in (a, b) for a, b, _, _ in backend.pairs_run)
    failed_child = backend.children["g1:m0+m1"]
    assert not failed_child.ok
    assert all(failed_child.key not in (p["a"], p["b"]) for p in planned)
    excluded = _events(backend, "excluded")
    assert [(e["generation"], e["keys"]) for e in excluded] == [(0, ["m3"]), (1, ["g1:m0+m1"])]
    assert "failed its evaluation" in excluded[0]["reason"]
    done = {e["child"]: e for e in _events(backend, "pair_done")}
    assert done["g1:m0+m1"]["ok"] is False and done["g1:m0+m2"]["ok"] is True


def test_fewer_than_two_scored_originals_stop_with_the_reason() -> None:
    backend = FailingBackend(_vectors(3), {"m0": 0.5, "m1": 0.4, "m2": 0.3}, _gain_fn, failed={"m1", "m2"})
    out = PopulationManager(backend, PopulationConfig(k=2), budget=50).run()
    assert out.stop_reason.startswith("fewer than two starting models scored (failed: m1, m2)")
    assert not backend.pairs_run and out.best.key == "m0"


# ------------------------------------------------------------------------------------------------- joint merge


class JointBackend(FakeBackend):
    """A fake backend with the joint merge of the starting models (generation 0, member ``joint``)."""

    def __init__(self, *args: Any, joint_score: float = 0.6, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.joint_score = joint_score
        self.joints_run: list[tuple[tuple[str, ...], int]] = []

    def run_joint(self, parents: list[str], budget: int) -> PairResult:
        used = max(1, budget)
        self.evals += used
        self.vectors[JOINT_KEY] = np.mean([self.vectors[p] for p in parents], axis=0)
        child = Member(JOINT_KEY, self.joint_score, 0, tuple(parents), candidate_id=self.evals)
        self.children[JOINT_KEY] = child
        self.joints_run.append((tuple(parents), used))
        return PairResult(child, used)


def test_the_joint_merge_starts_generation_1_beside_the_originals() -> None:
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4, "m3": 0.3}
    cfg = PopulationConfig(k=3, pair_budget=2, saturation=None, max_revivals=0, max_generations=3, joint_budget=5,
                           screen=0)
    backend = JointBackend(_vectors(4), scores, _gain_fn)
    out = PopulationManager(backend, cfg, budget=100).run()
    assert backend.joints_run == [(("m0", "m1", "m2", "m3"), 5)]
    start = _events(backend, "population_start")[0]
    assert start["joint"] is True and start["joint_budget"] == 5
    joint = _events(backend, "joint_done")
    assert joint == [{"generation": 0, "parents": ["m0", "m1", "m2", "m3"], "child": JOINT_KEY, "score": 0.6,
                      "candidate_id": 5, "evaluations": 5, "ok": True}]
    # generation 1: every pair of the originals and the joint member (10 pairs, 2 evaluations each)
    g1 = _events(backend, "generation_plan")[0]
    assert {pair_key(p["a"], p["b"]) for p in g1["plans"]} == {
        pair_key(a, b) for a, b in itertools.combinations([*scores, JOINT_KEY], 2)}
    assert "with joint, the joint merge of the others" in g1["reason"]
    assert sum(u for _, _, g, u in backend.pairs_run if g == 1) == 20
    assert out.evaluations == backend.evals == 5 + sum(u for *_, u in backend.pairs_run)
    assert JOINT_KEY in {m.key for m in out.members}


def test_the_joint_merge_is_off_when_asked_for_two_models_or_a_name_clash() -> None:
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4}
    for cfg, vectors, sc in [(PopulationConfig(k=2, max_generations=1, joint=False), _vectors(3), scores),
                             (PopulationConfig(k=2, max_generations=1), _vectors(2), {"m0": 0.5, "m1": 0.4})]:
        backend = JointBackend(vectors, sc, _gain_fn)
        PopulationManager(backend, cfg, budget=50).run()
        assert not backend.joints_run and not _events(backend, "joint_done")
        assert _events(backend, "population_start")[0]["joint"] is False
    clash = JointBackend({"joint": np.ones(4), "a": np.arange(4.0), "b": -np.arange(4.0)},
                         {"joint": 0.5, "a": 0.4, "b": 0.3}, _gain_fn)
    with pytest.raises(ConfigError, match="a model is named 'joint'"):
        PopulationManager(clash, PopulationConfig(k=2), budget=50).run()


@pytest.mark.parametrize("crash_after", [0, 5])
def test_resume_replays_the_joint_merge_without_running_it_again(crash_after: int) -> None:
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4, "m3": 0.3}
    cfg = PopulationConfig(k=3, pair_budget=2, saturation=None, max_revivals=1, max_generations=4)
    ref, ref_out, crashing, out = _crash_and_resume(lambda: JointBackend(_vectors(4), scores, _gain_fn), cfg, 60,
                                                    crash_after)
    assert len(crashing.joints_run) == 1
    assert _fingerprint(crashing) == _fingerprint(ref) and out.best.key == ref_out.best.key


@pytest.mark.parametrize("crash_after", [3, 6])
def test_resume_replays_a_refine_escape(crash_after: int) -> None:
    # always saturated, no per-item results: after generation 1 (6 pairs) the one escape is refining its best;
    # the best stays the member already refined, so the next saturation stops the run
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4, "m3": 0.3}
    cfg = PopulationConfig(k=3, pair_budget=2, saturation=-1.0, max_revivals=0, refine=True, max_escapes=2,
                           leader_first=False)
    ref, ref_out, crashing, out = _crash_and_resume(lambda: FakeBackend(_vectors(4), scores, _gain_fn), cfg, 60,
                                                    crash_after)
    assert [(a, g, used) for a, b, g, used in ref.pairs_run if a == b] == [("g1:m0+m1", 2, 4)]
    assert crashing.pairs_run == ref.pairs_run and ref_out.stop_reason.startswith("saturated")
    assert _fingerprint(crashing) == _fingerprint(ref) and out.best.key == ref_out.best.key


def test_a_run_recorded_before_the_joint_merge_resumes_without_one() -> None:
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4, "m3": 0.3}
    old = PopulationConfig(k=3, pair_budget=1, saturation=None, max_revivals=0, max_generations=3, joint=False)
    backend = JointBackend(_vectors(4), scores, _gain_fn)
    backend.fail_after = 2
    with pytest.raises(RuntimeError):
        PopulationManager(backend, old, budget=40).run()
    start = next(e["payload"] for e in backend.log if e["kind"] == EventKind.POPULATION_START)
    assert start["pair_rows"] == "competence" and old.as_started(start).pair_rows == "competence"
    assert start["refine_leader"] == old.refine_leader > 0 and start["screen"] == old.screen > 0
    for e in backend.log:  # as an older version wrote it
        for key in ("joint", "joint_budget", "pair_rows", "refine_leader", "leader_first", "screen"):
            e["payload"].pop(key, None)
    backend.fail_after = None
    new = PopulationConfig(k=3, pair_budget=1, saturation=None, max_revivals=0, max_generations=3)
    PopulationManager(backend, new, budget=40).run()
    assert not backend.joints_run and JOINT_KEY not in backend.children
    # its merged parents keep the calibration rows they had: their ancestors' tasks
    assert new.as_started(start).pair_rows == "ancestors" and new.as_started(None).pair_rows == "competence"
    # and it never refines the best on a stall, which it did not do either
    assert new.as_started(start).refine_leader == 0 < new.refine_leader
    assert new.as_started(start).screen == 0 < new.screen and new.as_started(start).leader_first is False
    assert not any(p["reason"] == "leader" for e in backend.log if e["kind"] == EventKind.GENERATION_PLAN
                   for p in e["payload"]["plans"])


def _stalling_fn(a: Member, b: Member, key: str) -> float:
    """Generation 1's children gain 0.2 on their better parent, later children lose 0.01 on it (breeding from
    the best stops helping), and a refined merge gains 0.3 on its better parent."""
    gain = 0.3 if key.split(":")[1] == "refine" else 0.2 if key.startswith("g1:") else -0.01
    return max(a.score, b.score) + gain


@pytest.mark.parametrize("crash_after", [6, 10, 11])
def test_the_best_is_refined_after_a_generation_that_made_none_better(crash_after: int) -> None:
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4, "m3": 0.3}
    cfg = PopulationConfig(k=3, pair_budget=2, saturation=None, max_revivals=0, max_generations=4, refine_leader=5)
    ref, ref_out, crashing, out = _crash_and_resume(lambda: FakeBackend(_vectors(4), scores, _stalling_fn), cfg,
                                                    200, crash_after)
    plans = {p["generation"]: p["plans"] for p in _events(ref, "generation_plan")}
    # generation 1 made the best (g1:m0+m1, 0.7) and generation 2 none better: generation 3 refines it first
    assert all(p["reason"] != "leader" for g in (1, 2) for p in plans[g])
    assert plans[3][0] == {"a": "g1:m0+m1", "b": "g1:m0+m1", "reason": "leader", "kinship": None,
                           "operator": "refine", "budget": 5}
    done = next(p for p in _events(ref, "pair_done") if p["reason"] == "leader")
    assert done["generation"] == 3 and done["parents"] == ["m0", "m1"] and done["evaluations"] == 5
    assert done["score"] == pytest.approx(0.8)  # the refined merge of m0 and m1: 0.5 + 0.3
    # generation 3 made a better member (the refined one): generation 4 has no leader refine; none is repeated
    assert [p for p in plans.get(4, []) if p["reason"] == "leader"] == []
    assert sum(p["reason"] == "leader" for ps in plans.values() for p in ps) == 1
    assert ref_out.best.key == done["child"]
    # a crash before, inside or after the refine resumes to the same decisions
    assert crashing.pairs_run == ref.pairs_run and _fingerprint(crashing) == _fingerprint(ref)
    assert out.best.key == ref_out.best.key
    # off: the same run never refines
    plain = FakeBackend(_vectors(4), scores, _stalling_fn)
    PopulationManager(plain, PopulationConfig(k=3, pair_budget=2, saturation=None, max_revivals=0,
                                              max_generations=4, refine_leader=0), budget=200).run()
    assert all(p["reason"] != "leader" for e in _events(plain, "generation_plan") for p in e["plans"])
    with pytest.raises(ConfigError, match="population.refine_leader: an integer >= 0"):
        PopulationConfig(refine_leader=-3)


@pytest.mark.parametrize("crash_after", [5, 6, 7])
def test_a_saturated_top_k_refines_its_best_while_the_refine_gains(crash_after: int) -> None:
    # always saturated, no per-item results (so no escape pairs): a refined merge of m0 and m1 scores 0.8
    # (_stalling_fn: its better parent + 0.3), above generation 1's best (0.7), and refining it again gives 0.8,
    # no better: the best stays the first refined member, refined once, and the saturated run stops
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4, "m3": 0.3}
    cfg = PopulationConfig(k=3, pair_budget=2, saturation=-1.0, max_revivals=0, refine_leader=5, joint=False,
                           screen=0, leader_first=True)
    ref, ref_out, crashing, out = _crash_and_resume(lambda: FakeBackend(_vectors(4), scores, _stalling_fn), cfg,
                                                    200, crash_after)
    plans = {p["generation"]: p for p in _events(ref, "generation_plan")}
    assert sorted(plans) == [1, 2, 3]
    assert [(p["a"], p["b"], p["reason"], p["budget"]) for g in (2, 3) for p in plans[g]["plans"]] == [
        ("g1:m0+m1", "g1:m0+m1", "leader", 5), ("g2:refine:g1:m0+m1", "g2:refine:g1:m0+m1", "leader", 5)]
    assert "saturated" in plans[2]["reason"] and "before any escape move" in plans[2]["reason"]
    assert ref_out.best.key == "g2:refine:g1:m0+m1" and ref_out.best.score == pytest.approx(0.8)
    assert ref_out.stop_reason.startswith("saturated") and ref.evaluations() == 6 * 2 + 2 * 5
    assert crashing.pairs_run == ref.pairs_run and _fingerprint(crashing) == _fingerprint(ref)
    assert out.best.key == ref_out.best.key
    # without leader_first a generation that made the best (generation 1) escapes or stops first: here it stops
    plain = FakeBackend(_vectors(4), scores, _stalling_fn)
    stopped = PopulationManager(plain, dataclasses.replace(cfg, leader_first=False), budget=200).run()
    assert stopped.generations == 1 and stopped.stop_reason.startswith("saturated")


def test_screened_plans_keep_the_best_share_with_the_evaluations_the_others_left() -> None:
    cfg = PopulationConfig(pair_budget=6, screen=0.5)
    plans = [PairPlan(f"m{i}", f"n{i}", "initial", budget=1) for i in range(5)]
    children = [Member(f"c{i}", s, 1, (f"m{i}", f"n{i}"), ok=i != 4)
                for i, s in enumerate([0.4, 0.7, 0.1, 0.7, 0.9])]
    out = screened_plans(list(zip(plans, children)), cfg)
    # ceil(0.5 * 5) = 3 kept: the two 0.7s in plan order, then 0.4 (the failed 0.9 never); 5 x (6 - 1) = 25
    # evaluations saved, 8 more each on top of the screen's one
    assert [(p.a, p.b, p.reason, p.operator, p.budget) for p in out] == [
        ("m1", "n1", "initial", "extend", 9), ("m3", "n3", "initial", "extend", 9), ("m0", "n0", "initial", "extend", 9)]
    assert screens(cfg, 5) and screens(cfg, 2)  # 2 pairs: 1 kept with 11 evaluations
    assert not screens(cfg, 1)  # one pair: nothing to leave out
    assert not screens(PopulationConfig(pair_budget=1), 10)  # nothing saved to give
    assert not screens(PopulationConfig(screen=0), 10) and not screens(PopulationConfig(screen=1.0), 10)
    for bad in (1.5, -0.1, True):
        with pytest.raises(ConfigError, match="population.screen: a share in"):
            PopulationConfig(screen=bad)  # type: ignore[arg-type]


class BudgetBackend(FakeBackend):
    """A pair's child gains 0.001 per evaluation its search used (so a searched-on pair's child is better); a
    searched-on pair's first evaluation is its screen's, which the archive replays (not a new evaluation)."""

    def run_pair(self, plan: PairPlan, generation: int, budget: int) -> PairResult:
        result = super().run_pair(plan, generation, budget)
        if plan.operator == "extend":
            self.evals -= 1
        assert result.child is not None
        child = dataclasses.replace(result.child, score=result.child.score + 0.001 * result.evaluations)
        self.children[child.key] = child
        return PairResult(child, result.evaluations)


@pytest.mark.parametrize("crash_after", [3, 6, 8, 11])
def test_each_generation_screens_its_pairs_then_searches_the_best_half_on(crash_after: int) -> None:
    scores = {"m0": 0.5, "m1": 0.45, "m2": 0.4, "m3": 0.3}
    cfg = PopulationConfig(k=3, pair_budget=3, saturation=None, max_revivals=0, max_generations=2, joint=False)
    ref, ref_out, crashing, out = _crash_and_resume(lambda: BudgetBackend(_vectors(4), scores, _gain_fn), cfg, 200,
                                                    crash_after)
    plans = _events(ref, "generation_plan")
    assert [p.get("budget") for p in plans[0]["plans"]] == [1] * 6 and plans[0]["screen"] is True
    assert "screened at their starting recipe" in plans[0]["reason"]
    screened = _events(ref, "pairs_screened")
    assert [s["generation"] for s in screened] == [1, 2] and len(screened[0]["screened"]) == 6
    at_screen = {(d["a"], d["b"]): d["score"] for d in screened[0]["screened"]}
    best3 = sorted(at_screen, key=lambda k: -at_screen[k])[:3]
    # 6 pairs x (3 - 1) = 12 evaluations saved: the best 3 get 4 more each, 5 in all with the screen's
    assert [(p["a"], p["b"], p["operator"], p["budget"]) for p in screened[0]["plans"]] == [
        (a, b, "extend", 5) for a, b in best3]
    gen1 = [(a, b, used) for a, b, g, used in ref.pairs_run if g == 1]
    assert gen1[:6] == [(a, b, 1) for a, b in at_screen] and gen1[6:] == [(a, b, 5) for a, b in best3]
    # the searched-on child replaces the screened one (same key), and generation 2 breeds from it
    done = {(d["a"], d["b"], d.get("operator")): d for d in _events(ref, "pair_done") if d["generation"] == 1}
    for a, b in best3:
        assert done[(a, b, "extend")]["child"] == done[(a, b, "pair")]["child"]
        assert done[(a, b, "extend")]["score"] == pytest.approx(at_screen[(a, b)] + 0.004)
    # generation 2: 3 top-k pairs and the exploration pair, screened too; the best 2 get 1 + 4 x 2 / 2
    assert plans[1]["screen"] is True and [p.get("budget") for p in plans[1]["plans"]] == [1] * 4
    assert "its 4 pairs screened at their starting recipe, the best 2 then searched on" in plans[1]["reason"]
    assert [p["budget"] for p in screened[1]["plans"]] == [5, 5] and len(screened[1]["screened"]) == 4
    assert ref.evaluations() == 6 + 3 * 4 + 4 + 2 * 4
    # a crash in a screen, at a decision or in a searched-on pair resumes to the same decisions
    assert crashing.pairs_run == ref.pairs_run and _fingerprint(crashing) == _fingerprint(ref)
    assert out.best.key == ref_out.best.key
