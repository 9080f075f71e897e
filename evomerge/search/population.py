"""Population manager: Top-k greedy merging with model kinship (seed paper (a), Algorithm 1), over generations.

The population is every model made so far: the originals and one child per merged parent pair (the best
candidate of that pair's search). Generation 1 merges every pair of the starting models (or a configured seed
set). Each later generation merges every not-yet-merged pair of the current top-k, plus ONE exploration merge
of the best model with the model of the whole population that has the LOWEST kinship to it (largest distance
for ED). Pairs already merged are never merged again. The run stops when the top-k set no longer changes, when
kinship among the top-k exceeds the saturation threshold (the paper's 0.9), when nothing is left to merge, or
at the evaluation budget.

Revival (an extension, not in the paper): when the best score has not improved for ``revive_after``
generations, or a convergence rule fires, up to ``revive_count`` abandoned members (not in the top-k), chosen
by score and low kinship to the top-k, join the next generation's parents; at most ``max_revivals`` times.
Every decision (plan, exploration choice, stop, revival) is an event with its reason.

This module holds the decisions (pure functions of the population) and the driver :class:`PopulationManager`;
how a pair is merged, scored and stored is a :class:`PopulationBackend` (the search core's archive and loop in
production, a fake in tests).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from evomerge.errors import ConfigError
from evomerge.kinship import METRICS, is_distance

# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PopulationConfig:
    """The ``population:`` section of a search space."""

    k: int = 3
    metric: str = "pcc"
    saturation: float | None = 0.9  # similarity metrics: stop when mean top-k kinship exceeds it
    saturation_distance: float | None = None  # ED: stop when mean top-k distance falls below it
    explore: bool = True  # the kinship exploration merge (False: plain Top-k greedy)
    pair_budget: int = 8  # evaluations per parent pair; 0 = the fixed recipe only (the paper)
    max_generations: int = 20
    seed_models: tuple[str, ...] | None = None  # generation 1 pairs these (default: every original)
    revive_after: int = 1  # generations without improvement of the best before reviving
    revive_count: int = 2
    max_revivals: int = 2  # 0 disables revival
    revive_kinship_weight: float = 1.0
    cache_memory_models: int = 4  # merged parents kept resident per worker
    cache_disk_bytes: int = 2 * 1024**3  # materialized merged parents on disk

    def __post_init__(self) -> None:
        where = "population"
        if self.k < 2:
            raise ConfigError(f"{where}.k: need at least 2, got {self.k}")
        if self.metric not in METRICS:
            raise ConfigError(f"{where}.metric: {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.pair_budget < 0:
            raise ConfigError(f"{where}.pair_budget: must be >= 0, got {self.pair_budget}")
        if self.max_generations < 1:
            raise ConfigError(f"{where}.max_generations: must be >= 1, got {self.max_generations}")
        if self.revive_after < 1 or self.revive_count < 0 or self.max_revivals < 0:
            raise ConfigError(f"{where}: revive_after >= 1, revive_count >= 0 and max_revivals >= 0 "
                              f"(got {self.revive_after}, {self.revive_count}, {self.max_revivals})")
        if self.saturation is not None and not -1.0 <= self.saturation <= 1.0:
            raise ConfigError(f"{where}.saturation: a similarity in [-1, 1] or null, got {self.saturation}")
        if self.seed_models is not None and len(self.seed_models) < 2:
            raise ConfigError(f"{where}.seed_models: need at least two models, got {list(self.seed_models)}")
        if self.cache_memory_models < 0 or self.cache_disk_bytes < 0:
            raise ConfigError(f"{where}: cache budgets must be >= 0")

    @staticmethod
    def from_dict(data: Mapping[str, Any] | None, where: str = "population") -> PopulationConfig:
        """Parse the YAML section (unknown keys are refused, names listed)."""
        if data is None:
            return PopulationConfig()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        known = set(PopulationConfig.__dataclass_fields__)
        aliases = {"cache_memory": "cache_memory_models", "cache_disk": "cache_disk_bytes"}
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = aliases.get(key, key)
            if name not in known:
                raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
            if name == "cache_disk_bytes" and isinstance(value, str):
                from evomerge.models.writer import parse_size

                value = parse_size(value)
            if name == "seed_models" and value is not None:
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{where}.seed_models: expected a list of model names, got {value!r}")
                value = tuple(value)
            out[name] = value
        try:
            return PopulationConfig(**out)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None


# ------------------------------------------------------------------------------------------------ members


@dataclass(frozen=True)
class Member:
    """One model of the population: an original (no parents) or the best child of one parent pair."""

    key: str
    score: float
    generation: int = 0
    parents: tuple[str, ...] = ()
    candidate_id: int | None = None  # the archive row of the child (None for originals)
    ok: bool = True

    @property
    def is_original(self) -> bool:
        return not self.parents


def pair_key(a: str, b: str) -> tuple[str, str]:
    """Unordered pair identity (sorted)."""
    return (a, b) if a <= b else (b, a)


@dataclass(frozen=True)
class PairPlan:
    """One merge to run this generation and why."""

    a: str
    b: str
    reason: str  # "initial" | "top-k" | "exploration" | "revival"
    kinship: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return pair_key(self.a, self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "reason": self.reason, "kinship": self.kinship}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> PairPlan:
        return PairPlan(str(d["a"]), str(d["b"]), str(d["reason"]), d.get("kinship"))


def rank(members: Sequence[Member]) -> list[Member]:
    """Best first; failures last; ties broken by generation (older first) then key, so ranks are stable."""
    return sorted(members, key=lambda m: (not m.ok, -m.score if math.isfinite(m.score) else math.inf,
                                          m.generation, m.key))


def top_k(members: Sequence[Member], k: int) -> list[Member]:
    return [m for m in rank(members) if m.ok][:k]


# ------------------------------------------------------------------------------------------------ decisions


class KinshipFn(Protocol):
    def __call__(self, a: str, b: str) -> float: ...


def initial_pairs(starting: Sequence[str]) -> list[PairPlan]:
    """Generation 1: every pair of the starting models."""
    return [PairPlan(starting[i], starting[j], "initial") for i in range(len(starting))
            for j in range(i + 1, len(starting))]


def exploration_partner(best: str, population: Sequence[Member], kin: KinshipFn, metric: str,
                        exclude: set[tuple[str, str]]) -> tuple[str, float] | None:
    """The member of LOWEST kinship to ``best`` (largest distance for ED) whose pair is not excluded.

    NaN kinships (a zero task vector) are skipped. Ties go to the higher score, then the key.
    """
    best_val: tuple[float, float, str] | None = None
    chosen: tuple[str, float] | None = None
    for m in population:
        if m.key == best or not m.ok or pair_key(best, m.key) in exclude:
            continue
        value = kin(best, m.key)
        if not math.isfinite(value):
            continue
        related = -value if is_distance(metric) else value
        order = (related, -m.score, m.key)
        if best_val is None or order < best_val:
            best_val, chosen = order, (m.key, value)
    return chosen


def plan_generation(top: Sequence[Member], population: Sequence[Member], merged: set[tuple[str, str]],
                    kin: KinshipFn, cfg: PopulationConfig, revived: Sequence[Member] = ()) -> list[PairPlan]:
    """Generation >= 2: all not-yet-merged top-k pairs, revived x top-k pairs, one exploration merge.

    Pairs are never repeated: ``merged`` holds every pair merged so far, and the plan itself is deduplicated.
    """
    plans: list[PairPlan] = []
    seen = set(merged)
    keys = [m.key for m in top]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            pk = pair_key(keys[i], keys[j])
            if pk not in seen:
                seen.add(pk)
                plans.append(PairPlan(keys[i], keys[j], "top-k"))
    for r in revived:
        for k in keys:
            pk = pair_key(r.key, k)
            if r.key != k and pk not in seen:
                seen.add(pk)
                plans.append(PairPlan(k, r.key, "revival", kin(k, r.key)))
    if cfg.explore and top:
        partner = exploration_partner(top[0].key, population, kin, cfg.metric, seen)
        if partner is not None:
            plans.append(PairPlan(top[0].key, partner[0], "exploration", partner[1]))
    return plans


def mean_pairwise(keys: Sequence[str], kin: KinshipFn) -> float:
    vals = [kin(keys[i], keys[j]) for i in range(len(keys)) for j in range(i + 1, len(keys))]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def saturated(top: Sequence[Member], kin: KinshipFn, cfg: PopulationConfig) -> tuple[bool, float]:
    """Whether the top-k are so related that merging them rarely gains (mean pairwise kinship)."""
    if len(top) < 2:
        return False, math.nan
    value = mean_pairwise([m.key for m in top], kin)
    if not math.isfinite(value):
        return False, value
    if is_distance(cfg.metric):
        return (cfg.saturation_distance is not None and value < cfg.saturation_distance), value
    return (cfg.saturation is not None and value > cfg.saturation), value


def revival_choices(population: Sequence[Member], top: Sequence[Member], kin: KinshipFn, cfg: PopulationConfig,
                    already: set[str], merged: set[tuple[str, str]] | None = None
                    ) -> list[tuple[Member, float, float, float]]:
    """Abandoned members ranked by priority = normalized score − weight × normalized kinship to the top-k.

    Scores are normalized over the whole population's range (so near-equal scores stay near-equal);
    similarities map [-1, 1] to [0, 1]; distances (ED) map to 1 − d/d_max over the candidates.

    Returns (member, priority, score_norm, kinship_to_topk) for the best ``revive_count``. Kinship to the
    top-k is the MAX relatedness to any top-k member (a branch is only new if it is far from all of them).
    Originals count (they are branches too); members already revived are not revived again, nor members
    whose pairs with every top-k member were merged already (``merged``): they would bring no new merge.
    """
    top_keys = {m.key for m in top}
    done = merged or set()
    pool = [m for m in population if m.ok and m.key not in top_keys and m.key not in already
            and any(pair_key(m.key, t) not in done for t in top_keys)]
    if not pool or not top:
        return []
    scores = [m.score for m in population if m.ok and math.isfinite(m.score)]
    lo, hi = min(scores), max(scores)
    rows = []
    for m in pool:
        vals = [kin(m.key, t.key) for t in top]
        vals = [v for v in vals if math.isfinite(v)]
        if not vals:
            continue
        if is_distance(cfg.metric):
            closest = min(vals)
            rows.append((m, closest, True))
        else:
            rows.append((m, max(vals), False))
    if not rows:
        return []
    dmax = max((r[1] for r in rows if r[2]), default=0.0)
    out = []
    for m, value, dist in rows:
        s_norm = (m.score - lo) / (hi - lo) if hi > lo else 1.0
        k_norm = (1.0 - value / dmax if dmax > 0 else 0.0) if dist else (value + 1.0) / 2.0
        out.append((m, s_norm - cfg.revive_kinship_weight * k_norm, s_norm, value))
    out.sort(key=lambda r: (-r[1], -r[0].score, r[0].key))
    return out[: cfg.revive_count]


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

    def record_event(self, kind: str, payload: Mapping[str, Any]) -> None: ...


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

    def _event(self, kind: str, **payload: Any) -> None:
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
        if not any(e["kind"] == "population_start" for e in events):
            self._event("population_start", starting=starting, k=self.cfg.k, metric=self.cfg.metric,
                        budget=self.budget, explore=self.cfg.explore, pair_budget=self.cfg.pair_budget)
        st = self._replay(events)
        if st.stopped is not None and not (st.stopped.startswith("budget") and self._budget_left() > 0):
            return self._outcome(st.generation, st.stopped)
        if st.stopped is not None:  # a budget stop, and the budget was raised on resume: go on
            self._log(f"budget raised to {self.budget}: continuing after '{st.stopped}'")
            st.stopped = None
        if st.generation == 0:
            st.generation = 1
            st.pending = initial_pairs(starting)
            self._event("generation_plan", generation=1, plans=[p.to_dict() for p in st.pending],
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
            self._event("generation_plan", generation=st.generation, plans=[p.to_dict() for p in plans],
                        reason=self._plan_reason(plans, top), revival=revival)

    def _end_generation(self, st: _ReplayState) -> None:
        top = self._top()
        top_keys = [m.key for m in top]
        improved = top[0].score > st.best_score + 1e-12
        st.stall = 0 if improved else st.stall + 1
        st.best_score = max(st.best_score, top[0].score)
        st.tops[st.generation] = top_keys
        st.ended = True
        self._event("generation_end", generation=st.generation, top=top_keys, best=top[0].key,
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
            self._event("pair_done", generation=generation, a=plan.a, b=plan.b, reason=plan.reason,
                        child=result.child.key, score=result.child.score, candidate_id=result.child.candidate_id,
                        evaluations=result.evaluations)
        return None

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
        self._event("stop", generation=generation, reason=reason, evaluations=self.backend.evaluations())
        self._log(f"stop after generation {generation}: {reason}")
        return self._outcome(generation, reason)

    def _outcome(self, generation: int, reason: str) -> PopulationOutcome:
        top = self._top()
        return PopulationOutcome(best=top[0], top=top, generations=generation, stop_reason=reason,
                                 evaluations=self.backend.evaluations(), members=rank(list(self.members.values())),
                                 history=list(self.history))

    # ----------------------------------------------------------------------------------- resume
    def _replay(self, events: Sequence[Mapping[str, Any]]) -> _ReplayState:
        """Rebuild the manager's state from recorded events (children come from ``pair_done``)."""
        st = _ReplayState()
        for e in events:
            kind, p = e["kind"], e.get("payload", e)
            if kind == "generation_plan":
                st.generation = int(p["generation"])
                st.pending = [PairPlan.from_dict(d) for d in p["plans"]]
                st.ended = False
                if p.get("revival"):
                    self._apply_revival(p["revival"], st)
            elif kind == "pair_done":
                self.merged.add(pair_key(p["a"], p["b"]))
                child = Member(str(p["child"]), float(p["score"]), int(p["generation"]),
                               (str(p["a"]), str(p["b"])), p.get("candidate_id"))
                self.members[child.key] = child
            elif kind == "generation_end":
                g = int(p["generation"])
                st.tops[g] = list(p["top"])
                st.best_score = max(st.best_score, float(p["best_score"]))
                st.stall = int(p["stall"])
                st.ended = g == st.generation
                self.history.append(GenerationRecord(g, list(st.pending), list(p["top"]), str(p["best"]),
                                                     float(p["best_score"])))
            elif kind == "stop":
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
