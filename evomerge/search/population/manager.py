"""The population manager: Algorithm 1 over generations, every decision an event, resumable mid-generation.

How a pair is merged, scored and stored is a :class:`PopulationBackend`: the run directory's
(:class:`~evomerge.search.population.session.RunPopulation`) in production, a fake in tests. The decisions
themselves are :mod:`evomerge.search.population.rules`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from evomerge.errors import ConfigError
from evomerge.kinship import is_distance
from evomerge.search.events import MERGE_EVENTS, EventKind, merge_parents
from evomerge.search.population.behaviour import (
    Behaviour,
    attraction,
    attraction_to_set,
    behaviour_distance,
    niche_fitness,
)
from evomerge.search.population.members import JOINT_KEY, Member, pair_key, rank, top_k
from evomerge.search.population.rules import (
    SCREEN_EVALUATIONS,
    PairPlan,
    PopulationConfig,
    escape_plans,
    initial_pairs,
    is_screened,
    leader_refine,
    plan_generation,
    revival_choices,
    saturated,
    screen_kept,
    screen_pairs,
    screened_plans,
)

# ------------------------------------------------------------------------------------------------ backend


@dataclass
class PairResult:
    """What one pair's search produced: the child to add to the population (None: budget ran out first)."""

    child: Member | None
    evaluations: int


class PopulationBackend(Protocol):
    """How the manager merges, scores, stores and remembers; the search core's archive/loop in production."""

    def originals(self) -> list[Member]:
        """The starting models, scored (scoring them counts toward the budget if not already in the archive)."""
        ...

    def kinship(self, a: str, b: str) -> float:
        """Kinship of two members in ``metric`` (cached; exact from recipe algebra when possible)."""
        ...

    def run_pair(self, plan: PairPlan, generation: int, budget: int) -> PairResult:
        """Search the merge of one pair (``budget`` evaluations at most; 0 = fixed recipe) and record it."""
        ...

    def evaluations(self) -> int:
        """Evaluations recorded so far (all of the run, including resumed ones)."""
        ...

    def events(self) -> list[dict[str, Any]]:
        """Every population event recorded so far, in order (for resume)."""
        ...

    def record_event(self, kind: EventKind, payload: Mapping[str, Any]) -> None: ...

    # optional: ``behaviour(keys) -> Behaviour | None``, the members' per-item scores (None: not recorded).
    # A backend without it breeds by kinship and the plain aggregate alone.
    # optional: ``run_joint(parents, budget) -> PairResult``, the joint merge of the starting models (generation
    # 0, member ``JOINT_KEY``; ``budget`` as in run_pair). A backend without it has no joint member.


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class GenerationRecord:
    generation: int
    plans: list[PairPlan]
    top: list[str]
    best: str
    best_score: float


@dataclass
class PopulationOutcome:
    """The end of a population run."""

    best: Member
    top: list[Member]
    generations: int
    stop_reason: str
    evaluations: int
    members: list[Member] = field(default_factory=list)
    history: list[GenerationRecord] = field(default_factory=list)


class PopulationManager:
    """Drives Algorithm 1 over a backend; every decision is an event, so a run resumes mid-generation.

    Events: ``population_start``, ``generation_plan`` {generation, plans, reasons}, ``pair_done``
    {generation, a, b, child, score}, ``generation_end`` {generation, top, best, best_score, improved},
    ``revival`` {generation, revived, reason}, ``pairs_screened`` {generation, plans, screened} (a
    generation's screen), ``stop`` {reason}. On resume the events are replayed: done
    pairs are not rerun, the pending ones of the current generation run next (the backend resumes a pair's
    own search), and later generations are planned from the same state as an uninterrupted run.
    """

    def __init__(self, backend: PopulationBackend, cfg: PopulationConfig, budget: int,
                 log: Any = None) -> None:
        if budget < 1:
            raise ConfigError(f"population budget: need at least 1 evaluation, got {budget}")
        self.backend = backend
        self.cfg = cfg
        self.budget = budget
        self._log = log if log is not None else (lambda msg: None)
        self.members: dict[str, Member] = {}
        self.merged: set[tuple[str, str]] = set()
        self.revived: set[str] = set()
        self.revivals = 0
        self.escapes = 0
        self.skipped = 0
        self.extended: set[tuple[str, str]] = set()  # screened pairs searched on (population.screen)
        self._children: dict[tuple[int, tuple[str, str]], Member] = {}  # (generation, pair) -> child
        self.history: list[GenerationRecord] = []

    # ----------------------------------------------------------------------------------- helpers
    def _kin(self, a: str, b: str) -> float:
        return self.backend.kinship(a, b)

    def _behaviour(self) -> Behaviour | None:
        """The ok members' per-item scores (None: the backend records none, or fewer than two members)."""
        fn = getattr(self.backend, "behaviour", None)
        keys = [m.key for m in rank(list(self.members.values())) if m.ok]
        if fn is None or len(keys) < 2:
            return None
        b = fn(keys)
        return b if isinstance(b, Behaviour) else None

    def _top(self) -> list[Member]:
        """The top-k the manager breeds from: by niche fitness over the population (``niche_alpha`` > 0 and
        per-item results recorded), else by the plain aggregate."""
        members = list(self.members.values())
        if self.cfg.niche_alpha > 0:
            b = self._behaviour()
            if b is not None:
                fit = dict(zip(b.keys, niche_fitness(b, self.cfg.niche_alpha)))
                ranked = rank([m for m in members if m.ok and m.key in fit])
                order = {m.key: i for i, m in enumerate(ranked)}  # ties: the plain ranking
                return sorted(ranked, key=lambda m: (-fit[m.key], order[m.key]))[: self.cfg.k]
        return top_k(members, self.cfg.k)

    def _best(self) -> Member | None:
        """The best member by the plain aggregate (what improvement, the leaderboard and export mean)."""
        best = top_k(list(self.members.values()), 1)
        return best[0] if best else None

    def _attract_alpha(self) -> float:
        return self.cfg.niche_alpha if self.cfg.niche_alpha > 0 else 1.0

    def _attraction_to(self, key: str) -> dict[str, float] | None:
        if not self.cfg.uses_attraction:
            return None
        b = self._behaviour()
        if b is None or key not in b.keys:
            return None
        return attraction(b, key, self._attract_alpha())

    def _attraction_to_top(self, top: Sequence[Member]) -> dict[str, float] | None:
        if not self.cfg.uses_attraction:
            return None
        b = self._behaviour()
        keys = [m.key for m in top]
        if b is None or not keys or any(k not in b.keys for k in keys):
            return None
        return attraction_to_set(b, keys, self._attract_alpha())

    def _plan(self, top: Sequence[Member], revived: Sequence[Member] = ()) -> list[PairPlan]:
        attract = self._attraction_to(top[0].key) if top else None
        return plan_generation(top, list(self.members.values()), self.merged, self._kin, self.cfg, revived,
                               attract)

    def _event(self, kind: EventKind, **payload: Any) -> None:
        self.backend.record_event(kind, payload)

    def _budget_left(self) -> int:
        return self.budget - self.backend.evaluations()

    # ----------------------------------------------------------------------------------- run
    def run(self) -> PopulationOutcome:
        """Run (or resume) until a stop rule fires."""
        for m in self.backend.originals():
            self.members[m.key] = m
        starting = list(self.cfg.seed_models) if self.cfg.seed_models else [
            m.key for m in self.members.values() if m.is_original]
        missing = [s for s in starting if s not in self.members]
        if missing:
            raise ConfigError(f"population.seed_models: {missing} are not models of the search space "
                              f"(known: {sorted(self.members)})")
        if len(starting) < 2:
            raise ConfigError(f"population: need at least two starting models, got {starting}")

        events = self.backend.events()
        start = next((e.get("payload", e) for e in events if e["kind"] == EventKind.POPULATION_START), None)
        if start is None:
            joint = self.cfg.joint and len(starting) >= 3 and hasattr(self.backend, "run_joint")
            if joint and JOINT_KEY in self.members:
                raise ConfigError(f"population.joint: a model is named {JOINT_KEY!r}, the key of the joint merge of "
                                  "the starting models; rename it or set population.joint: false")
            self._event(EventKind.POPULATION_START, starting=starting, k=self.cfg.k, metric=self.cfg.metric,
                        budget=self.budget, explore=self.cfg.explore, pair_budget=self.cfg.pair_budget,
                        niche_alpha=self.cfg.niche_alpha, partner=self.cfg.partner,
                        identical_tol=self.cfg.identical_tol, max_escapes=self.cfg.max_escapes, joint=joint,
                        joint_budget=self.cfg.joint_budget, pair_rows=self.cfg.pair_rows,
                        refine_leader=self.cfg.refine_leader, leader_first=self.cfg.leader_first,
                        screen=self.cfg.screen)
        else:  # as the run started (a run recorded before the joint merge existed has none)
            joint = bool(start.get("joint", False))
            self.cfg = self.cfg.as_started(start)
        failed = [s for s in starting if not self.members[s].ok]
        if failed:  # a failed original is no parent: it would only make failed children
            if not any(e["kind"] == EventKind.EXCLUDED and e.get("payload", e).get("generation") == 0
                       for e in events):
                self._exclude(0, failed, "the original failed its evaluation")
            starting = [s for s in starting if s not in failed]
        st = self._replay(events)
        if len(starting) < 2 and st.generation == 0:
            return self._finish(0, f"fewer than two starting models scored (failed: {', '.join(failed)}); "
                                   "nothing to merge")
        if st.stopped is not None and not (st.stopped.startswith("budget") and self._budget_left() > 0):
            return self._outcome(st.generation, st.stopped)
        if st.stopped is not None:  # a budget stop, and the budget was raised on resume: go on
            self._log(f"budget raised to {self.budget}: continuing after '{st.stopped}'")
            st.stopped = None
        if st.generation == 0:
            if joint and len(starting) >= 3 and not st.joint:
                stop = self._run_joint(starting)
                if stop is not None:
                    return self._finish(0, stop)
            if joint and self.members.get(JOINT_KEY) is not None and self.members[JOINT_KEY].ok:
                starting = [*starting, JOINT_KEY]
            st.generation = 1
            st.pending, screened = screen_pairs(initial_pairs(starting), self.cfg)
            st.screen = screened > 0
            self._event(EventKind.GENERATION_PLAN, generation=1, plans=[p.to_dict() for p in st.pending],
                        reason=f"generation 1: every pair of the {len(starting)} starting models"
                               + (f" (with {JOINT_KEY}, the joint merge of the others)"
                                  if JOINT_KEY in starting else "") + self._screen_text(screened),
                        **({"screen": True} if st.screen else {}))
        elif st.ended:
            self._log(f"resuming after the end of generation {st.generation}")
        else:
            done = sum(p.key in self.merged for p in st.pending)
            self._log(f"resuming generation {st.generation}: {done}/{len(st.pending)} pairs done")
        while True:
            if not st.ended:
                stop = self._run_pending(st.generation, st.pending)
                if stop is None and st.screen:
                    stop = self._run_screened(st)
                if stop is not None:
                    return self._finish(st.generation, stop)
                self._end_generation(st)
            top = self._top()
            reason = self._stop_reason(st.generation, top, st.tops.get(st.generation - 1))
            revived: list[Member] = []
            revival: dict[str, Any] | None = None
            escape: list[PairPlan] = []
            plans: list[PairPlan]
            plateau = reason is not None and reason.startswith(("saturated", "converged"))
            lead = leader_refine(self._best(), st.generation, self.merged, self.cfg, plateau=plateau)
            lead_why = "the last generation made none better"
            if lead is not None and plateau and self.cfg.leader_first:
                # the best's own merge before any escape move: escapes wait until it is refined
                self._log(f"{reason}; refining the best, {lead.a}, before escaping")
                lead_why = f"{reason}, so before any escape move"
                reason, plans = None, [lead]
            else:
                if plateau:
                    escape = self._escape(top)
                    if escape:
                        self._log(f"escape {self.escapes + 1}: {reason}; {self._escape_text(escape)}")
                        reason = None
                if not escape and self._want_revival(st.stall, reason):
                    revived, revival = self._revive(st.generation, top, st.stall, reason)
                    if revived:
                        reason = None
                plans = list(escape)
                if reason is None and not escape:
                    plans = self._plan(top, revived)
                    if not plans:
                        reason = "exhausted: every pair among the top-k and every exploration partner was merged"
                        escape = self._escape(top)
                        if escape:
                            self._log(f"escape {self.escapes + 1}: {reason}; {self._escape_text(escape)}")
                            plans, reason = escape, None
                        elif revival is None and self._want_revival(st.stall, reason):
                            revived, revival = self._revive(st.generation, top, st.stall, reason)
                            if revived:
                                plans = self._plan(top, revived)
                                reason = None if plans else reason
                if lead is not None and (reason is None
                                         or reason.startswith(("saturated", "converged", "exhausted"))):
                    if reason is not None:  # breeding has nothing left to try: the best's own search may climb
                        self._log(f"{reason}; refining the best, {lead.a}, instead of stopping")
                        reason, plans = None, []
                    if all(p.key != lead.key for p in plans):
                        plans = [lead, *plans]
            if reason is not None:
                return self._finish(st.generation, reason)
            if revival is not None:
                self._apply_revival(revival, st)
            extra: dict[str, Any] = {}
            if escape:
                self.escapes += 1
                extra["escape"] = self.escapes
            st.generation += 1
            plans, screened = screen_pairs(plans, self.cfg)
            st.screen, st.extend = screened > 0, None
            if st.screen:
                extra["screen"] = True
            st.pending = plans
            st.ended = False
            self._event(EventKind.GENERATION_PLAN, generation=st.generation, plans=[p.to_dict() for p in plans],
                        reason=self._plan_reason(plans, top, lead_why) + self._screen_text(screened),
                        revival=revival, **extra)

    def _run_screened(self, st: _ReplayState) -> str | None:
        """A generation after its screen: the best pairs searched on (decided once, recorded as an event)."""
        if st.extend is None:
            g = st.generation
            screened = [(p, c) for p in st.pending if is_screened(p) and (c := self._child_of(p, g)) is not None]
            st.extend = screened_plans(screened, self.cfg)
            self._event(EventKind.PAIRS_SCREENED, generation=g, plans=[p.to_dict() for p in st.extend],
                        screened=[{"a": p.a, "b": p.b, "child": c.key, "score": c.score} for p, c in screened])
            if st.extend:
                self._log(f"screened {len(screened)} pairs at their starting recipe; searching on "
                          + ", ".join(f"{p.a} x {p.b}" for p in st.extend)
                          + f" ({st.extend[0].budget} evaluations each)")
        return self._run_pending(st.generation, st.extend)

    def _screen_text(self, screened: int) -> str:
        if not screened:
            return ""
        return (f"; its {screened} pairs screened at their starting recipe, the best "
                f"{screen_kept(self.cfg, screened)} then searched on with the evaluations the others leave")

    def _child_of(self, plan: PairPlan, generation: int) -> Member | None:
        """The member a pair plan of ``generation`` made (None: skipped, or not run)."""
        return self._children.get((generation, plan.key))

    def _run_joint(self, starting: Sequence[str]) -> str | None:
        """Generation 0's joint merge of every starting model (a member that starts generation 1 with them)."""
        left = self._budget_left()
        if left <= 0:
            return f"budget: {self.backend.evaluations()} of {self.budget} evaluations used"
        budget = min(self.cfg.joint_budget, left) if self.cfg.joint_budget > 0 else 0
        result = self.backend.run_joint(list(starting), budget)  # type: ignore[attr-defined]
        if result.child is None:
            return f"budget: {self.backend.evaluations()} of {self.budget} evaluations used"
        child = result.child
        self.members[child.key] = child
        self._event(EventKind.JOINT_DONE, generation=0, parents=list(child.parents), child=child.key,
                    score=child.score, candidate_id=child.candidate_id, evaluations=result.evaluations, ok=child.ok)
        self._log(f"joint merge of {', '.join(child.parents)} -> {child.key} {child.score:.4f} "
                  f"({result.evaluations} evaluation(s))")
        if not child.ok:
            self._exclude(0, [child.key], "every evaluation of the joint merge of the starting models failed")
        return None

    def _end_generation(self, st: _ReplayState) -> None:
        top = self._top()
        top_keys = [m.key for m in top]
        best = self._best() or top[0]
        improved = best.score > st.best_score + 1e-12
        st.stall = 0 if improved else st.stall + 1
        st.best_score = max(st.best_score, best.score)
        st.tops[st.generation] = top_keys
        st.ended = True
        self._event(EventKind.GENERATION_END, generation=st.generation, top=top_keys, best=best.key,
                    best_score=best.score, improved=improved, stall=st.stall,
                    evaluations=self.backend.evaluations())
        self.history.append(GenerationRecord(st.generation, list(st.pending), top_keys, best.key, best.score))
        self._log(f"generation {st.generation}: top-{self.cfg.k} {top_keys} best {best.key} {best.score:.4f} "
                  f"({self.backend.evaluations()}/{self.budget} evaluations)")

    def _escape(self, top: Sequence[Member]) -> list[PairPlan]:
        """Escape moves when the top-k saturates (none left; without per-item results, refinement only)."""
        if self.escapes >= self.cfg.max_escapes or self._budget_left() <= 0 or not top:
            return []
        attract = self._attraction_to(top[0].key) if self.cfg.uses_attraction else None
        if attract is None:  # kinship partners: escape by attraction needs the items all the same
            b = self._behaviour()
            attract = None if b is None or top[0].key not in b.keys else attraction(b, top[0].key,
                                                                                   self._attract_alpha())
        return escape_plans(top, list(self.members.values()), self.merged, self.cfg, attract or {})

    @staticmethod
    def _escape_text(plans: Sequence[PairPlan]) -> str:
        return ", ".join(f"refine {p.a} ({p.budget} evaluations)" if p.operator == "refine" else
                         f"{p.reason} {p.a} x {p.b} (attraction {p.attraction:.4f}, {p.budget} evaluations)"
                         for p in plans)

    def _plan_reason(self, plans: Sequence[PairPlan], top: Sequence[Member],
                     lead_why: str = "the last generation made none better") -> str:
        parts = [f"{sum(p.reason == 'top-k' for p in plans)} unmerged top-k pair(s) of {[m.key for m in top]}"]
        for p in plans:
            if p.reason == "exploration" and p.attraction is None:
                word = "largest distance" if is_distance(self.cfg.metric) else "lowest kinship"
                parts.append(f"exploration: best {p.a} with {p.b} ({word} to it, {self.cfg.metric}={p.kinship:.4f})")
            elif p.reason == "exploration":
                kin = "" if p.kinship is None else f", {self.cfg.metric}={p.kinship:.4f}"
                parts.append(f"exploration: best {p.a} with {p.b} (partner by {self.cfg.partner}: attraction "
                             f"{p.attraction:.4f}{kin})")
        n_rev = sum(p.reason == "revival" for p in plans)
        if n_rev:
            parts.append(f"{n_rev} revival pair(s)")
        lead = [p for p in plans if p.reason == "leader"]
        if lead:
            parts.insert(0, f"refine the best, {lead[0].a}: {lead_why} ({lead[0].budget} evaluations)")
        esc = [p for p in plans if p.reason in ("escape", "crossover", "refine")]
        if esc:
            parts.append("escape moves (the top-k saturated): " + self._escape_text(esc))
        return "; ".join(parts)

    def _run_pending(self, generation: int, pending: Sequence[PairPlan]) -> str | None:
        for plan in pending:
            if plan.key in (self.extended if plan.operator == "extend" else self.merged):
                continue
            left = self._budget_left()
            if left <= 0:
                return f"budget: {self.backend.evaluations()} of {self.budget} evaluations used"
            distance = None if plan.operator == "refine" else self._distance(plan.a, plan.b)
            if distance is not None and self.cfg.identical_tol is not None and distance <= self.cfg.identical_tol:
                self.merged.add(plan.key)
                self.skipped += 1
                self._event(EventKind.PAIR_SKIPPED, generation=generation, a=plan.a, b=plan.b, reason=plan.reason,
                            distance=distance, tol=self.cfg.identical_tol)
                self._log(f"  g{generation} skip {plan.a} x {plan.b}: they behave identically on the items "
                          f"(distance {distance:.5f} <= {self.cfg.identical_tol}); the child would equal them")
                continue
            want = plan.budget if plan.budget is not None else self.cfg.pair_budget
            # an extension's budget counts its screen's evaluation, which is spent already
            cap = left + SCREEN_EVALUATIONS if plan.operator == "extend" else left
            budget = min(want, cap) if want > 0 else 0
            result = self.backend.run_pair(plan, generation, budget)
            if result.child is None:
                return f"budget: {self.backend.evaluations()} of {self.budget} evaluations used"
            self.merged.add(plan.key)
            if plan.operator == "extend":
                self.extended.add(plan.key)
            self.members[result.child.key] = result.child
            self._children[(generation, plan.key)] = result.child
            # a refined member's child descends from its parents, not from the plan's a and b (the member itself)
            parents = {"parents": list(result.child.parents)} if plan.operator == "refine" else {}
            self._event(EventKind.PAIR_DONE, generation=generation, a=plan.a, b=plan.b, reason=plan.reason,
                        child=result.child.key, score=result.child.score, candidate_id=result.child.candidate_id,
                        evaluations=result.evaluations, ok=result.child.ok, behaviour_distance=distance,
                        operator=plan.operator, **parents)
            if not result.child.ok:
                self._exclude(generation, [result.child.key], f"every evaluation of the merge of {plan.a} and "
                                                              f"{plan.b} failed")
        return None

    def _distance(self, a: str, b: str) -> float | None:
        """How differently two members score the items (None: no per-item results)."""
        fn = getattr(self.backend, "behaviour", None)
        if fn is None or a not in self.members or b not in self.members:
            return None
        beh = fn([a, b])
        return behaviour_distance(beh, a, b) if isinstance(beh, Behaviour) else None

    def _exclude(self, generation: int, keys: Sequence[str], reason: str) -> None:
        """Say that failed members take no further part in pairing (they are never in the top-k, never an
        exploration partner, never revived)."""
        self._event(EventKind.EXCLUDED, generation=generation, keys=list(keys), reason=reason)
        self._log(f"excluded from pairing: {', '.join(keys)} ({reason})")

    def _stop_reason(self, generation: int, top: Sequence[Member], prev_top: list[str] | None) -> str | None:
        keys = [m.key for m in top]
        sat, value = saturated(top, self._kin, self.cfg)
        if sat:
            word = "below" if is_distance(self.cfg.metric) else "above"
            limit = self.cfg.saturation_distance if is_distance(self.cfg.metric) else self.cfg.saturation
            return f"saturated: mean {self.cfg.metric} kinship among the top-{self.cfg.k} is {value:.4f}, {word} {limit}"
        if prev_top is not None and set(prev_top) == set(keys):
            return f"converged: the top-{self.cfg.k} set {sorted(keys)} did not change"
        if generation >= self.cfg.max_generations:
            return f"max_generations: {generation} generations run"
        if self._budget_left() <= 0:
            return f"budget: {self.backend.evaluations()} of {self.budget} evaluations used"
        return None

    def _want_revival(self, stall: int, reason: str | None) -> bool:
        if self.cfg.max_revivals <= self.revivals or self.cfg.revive_count <= 0 or self._budget_left() <= 0:
            return False
        if reason is not None and reason.startswith(("max_generations", "budget")):
            return False
        return stall >= self.cfg.revive_after or reason is not None

    def _revive(self, generation: int, top: Sequence[Member], stall: int,
                reason: str | None) -> tuple[list[Member], dict[str, Any] | None]:
        choices = revival_choices(list(self.members.values()), top, self._kin, self.cfg, self.revived, self.merged,
                                  self._attraction_to_top(top))
        if not choices:
            return [], None
        parts = [reason] if reason else []
        if stall:
            parts.append(f"best {top[0].score:.4f} has not improved for {stall} generation(s)")
        why = "; ".join(parts)
        revival = {"revival": self.revivals + 1, "generation": generation, "reason": why,
                   "revived": [{"key": m.key, "score": m.score, "priority": p, "score_norm": s,
                                "kinship_to_top": kv} for m, p, s, kv in choices]}
        self._log(f"revival {self.revivals + 1}: {why}; reviving {[c[0].key for c in choices]}")
        return [c[0] for c in choices], revival

    def _apply_revival(self, revival: Mapping[str, Any], st: _ReplayState) -> None:
        self.revivals = int(revival["revival"])
        self.revived.update(str(r["key"]) for r in revival["revived"])
        st.stall = 0

    def _finish(self, generation: int, reason: str) -> PopulationOutcome:
        self._event(EventKind.STOP, generation=generation, reason=reason, evaluations=self.backend.evaluations())
        self._log(f"stop after generation {generation}: {reason}")
        return self._outcome(generation, reason)

    def _outcome(self, generation: int, reason: str) -> PopulationOutcome:
        top = self._top()
        ranked = rank(list(self.members.values()))
        return PopulationOutcome(best=top[0] if top else ranked[0], top=top, generations=generation, stop_reason=reason,
                                 evaluations=self.backend.evaluations(), members=rank(list(self.members.values())),
                                 history=list(self.history))

    # ----------------------------------------------------------------------------------- resume
    def _replay(self, events: Sequence[Mapping[str, Any]]) -> _ReplayState:
        """Rebuild the manager's state from recorded events (children come from ``pair_done``)."""
        st = _ReplayState()
        for e in events:
            kind, p = e["kind"], e.get("payload", e)
            if kind == EventKind.GENERATION_PLAN:
                st.generation = int(p["generation"])
                st.pending = [PairPlan.from_dict(d) for d in p["plans"]]
                st.ended = False
                if p.get("revival"):
                    self._apply_revival(p["revival"], st)
                if p.get("escape"):
                    self.escapes = int(p["escape"])
                st.screen, st.extend = bool(p.get("screen")), None
            elif kind == EventKind.PAIRS_SCREENED:
                st.extend = [PairPlan.from_dict(d) for d in p["plans"]]
            elif kind == EventKind.PAIR_SKIPPED:
                self.merged.add(pair_key(p["a"], p["b"]))
                self.skipped += 1
            elif kind in MERGE_EVENTS:
                parents = merge_parents(p)
                if kind == EventKind.PAIR_DONE:
                    key = pair_key(str(p["a"]), str(p["b"]))
                    self.merged.add(key)
                    if p.get("operator") == "extend":
                        self.extended.add(key)
                else:
                    st.joint = True
                child = Member(str(p["child"]), float(p["score"]), int(p["generation"]), parents,
                               p.get("candidate_id"), bool(p.get("ok", True)))
                self.members[child.key] = child
                if kind == EventKind.PAIR_DONE:
                    self._children[(child.generation, key)] = child
            elif kind == EventKind.GENERATION_END:
                g = int(p["generation"])
                st.tops[g] = list(p["top"])
                st.best_score = max(st.best_score, float(p["best_score"]))
                st.stall = int(p["stall"])
                st.ended = g == st.generation
                self.history.append(GenerationRecord(g, list(st.pending), list(p["top"]), str(p["best"]),
                                                     float(p["best_score"])))
            elif kind == EventKind.STOP:
                st.stopped = str(p["reason"])
        return st


@dataclass
class _ReplayState:
    generation: int = 0
    pending: list[PairPlan] = field(default_factory=list)
    best_score: float = -math.inf
    stall: int = 0
    tops: dict[int, list[str]] = field(default_factory=dict)
    ended: bool = False
    stopped: str | None = None
    joint: bool = False  # the joint merge of the starting models is recorded
    screen: bool = False  # the current generation screens its pairs (population.screen)
    extend: list[PairPlan] | None = None  # the screened pairs searched on (None: not decided yet)
