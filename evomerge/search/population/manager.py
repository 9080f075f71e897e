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
from evomerge.search.events import EventKind
from evomerge.search.population.members import Member, pair_key, rank, top_k
from evomerge.search.population.rules import (
    PairPlan,
    PopulationConfig,
    initial_pairs,
    plan_generation,
    revival_choices,
    saturated,
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
    ``revival`` {generation, revived, reason}, ``stop`` {reason}. On resume the events are replayed: done
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
        self.history: list[GenerationRecord] = []

    # ----------------------------------------------------------------------------------- helpers
    def _kin(self, a: str, b: str) -> float:
        return self.backend.kinship(a, b)

    def _top(self) -> list[Member]:
        return top_k(list(self.members.values()), self.cfg.k)

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
        if not any(e["kind"] == EventKind.POPULATION_START for e in events):
            self._event(EventKind.POPULATION_START, starting=starting, k=self.cfg.k, metric=self.cfg.metric,
                        budget=self.budget, explore=self.cfg.explore, pair_budget=self.cfg.pair_budget)
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
            st.generation = 1
            st.pending = initial_pairs(starting)
            self._event(EventKind.GENERATION_PLAN, generation=1, plans=[p.to_dict() for p in st.pending],
                        reason=f"generation 1: every pair of the {len(starting)} starting models")
        elif st.ended:
            self._log(f"resuming after the end of generation {st.generation}")
        else:
            done = sum(p.key in self.merged for p in st.pending)
            self._log(f"resuming generation {st.generation}: {done}/{len(st.pending)} pairs done")
        while True:
            if not st.ended:
                stop = self._run_pending(st.generation, st.pending)
                if stop is not None:
                    return self._finish(st.generation, stop)
                self._end_generation(st)
            top = self._top()
            reason = self._stop_reason(st.generation, top, st.tops.get(st.generation - 1))
            revived: list[Member] = []
            revival: dict[str, Any] | None = None
            if self._want_revival(st.stall, reason):
                revived, revival = self._revive(st.generation, top, st.stall, reason)
                if revived:
                    reason = None
            plans: list[PairPlan] = []
            if reason is None:
                plans = plan_generation(top, list(self.members.values()), self.merged, self._kin, self.cfg, revived)
                if not plans:
                    reason = "exhausted: every pair among the top-k and every exploration partner was merged"
                    if revival is None and self._want_revival(st.stall, reason):
                        revived, revival = self._revive(st.generation, top, st.stall, reason)
                        if revived:
                            plans = plan_generation(top, list(self.members.values()), self.merged, self._kin,
                                                    self.cfg, revived)
                            reason = None if plans else reason
            if reason is not None:
                return self._finish(st.generation, reason)
            if revival is not None:
                self._apply_revival(revival, st)
            st.generation += 1
            st.pending = plans
            st.ended = False
            self._event(EventKind.GENERATION_PLAN, generation=st.generation, plans=[p.to_dict() for p in plans],
                        reason=self._plan_reason(plans, top), revival=revival)

    def _end_generation(self, st: _ReplayState) -> None:
        top = self._top()
        top_keys = [m.key for m in top]
        improved = top[0].score > st.best_score + 1e-12
        st.stall = 0 if improved else st.stall + 1
        st.best_score = max(st.best_score, top[0].score)
        st.tops[st.generation] = top_keys
        st.ended = True
        self._event(EventKind.GENERATION_END, generation=st.generation, top=top_keys, best=top[0].key,
                    best_score=top[0].score, improved=improved, stall=st.stall,
                    evaluations=self.backend.evaluations())
        self.history.append(GenerationRecord(st.generation, list(st.pending), top_keys, top[0].key, top[0].score))
        self._log(f"generation {st.generation}: top-{self.cfg.k} {top_keys} best {top[0].score:.4f} "
                  f"({self.backend.evaluations()}/{self.budget} evaluations)")

    def _plan_reason(self, plans: Sequence[PairPlan], top: Sequence[Member]) -> str:
        parts = [f"{sum(p.reason == 'top-k' for p in plans)} unmerged top-k pair(s) of {[m.key for m in top]}"]
        for p in plans:
            if p.reason == "exploration":
                word = "largest distance" if is_distance(self.cfg.metric) else "lowest kinship"
                parts.append(f"exploration: best {p.a} with {p.b} ({word} to it, {self.cfg.metric}={p.kinship:.4f})")
        n_rev = sum(p.reason == "revival" for p in plans)
        if n_rev:
            parts.append(f"{n_rev} revival pair(s)")
        return "; ".join(parts)

    def _run_pending(self, generation: int, pending: Sequence[PairPlan]) -> str | None:
        for plan in pending:
            if plan.key in self.merged:
                continue
            left = self._budget_left()
            if left <= 0:
                return f"budget: {self.backend.evaluations()} of {self.budget} evaluations used"
            budget = min(self.cfg.pair_budget, left) if self.cfg.pair_budget > 0 else 0
            result = self.backend.run_pair(plan, generation, budget)
            if result.child is None:
                return f"budget: {self.backend.evaluations()} of {self.budget} evaluations used"
            self.merged.add(plan.key)
            self.members[result.child.key] = result.child
            self._event(EventKind.PAIR_DONE, generation=generation, a=plan.a, b=plan.b, reason=plan.reason,
                        child=result.child.key, score=result.child.score, candidate_id=result.child.candidate_id,
                        evaluations=result.evaluations, ok=result.child.ok)
            if not result.child.ok:
                self._exclude(generation, [result.child.key], f"every evaluation of the merge of {plan.a} and "
                                                              f"{plan.b} failed")
        return None

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
        choices = revival_choices(list(self.members.values()), top, self._kin, self.cfg, self.revived, self.merged)
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
            elif kind == EventKind.PAIR_DONE:
                self.merged.add(pair_key(p["a"], p["b"]))
                child = Member(str(p["child"]), float(p["score"]), int(p["generation"]),
                               (str(p["a"]), str(p["b"])), p.get("candidate_id"), bool(p.get("ok", True)))
                self.members[child.key] = child
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
