"""A population session over a run directory: the manager's backend on the run's archive, and its entry point.

A search space with a ``population:`` section runs Top-k greedy merging with kinship
(:class:`~evomerge.search.population.manager.PopulationManager`) instead of one black-box search over the whole
genome. Everything goes to the run's :class:`~evomerge.search.archive.Archive`:

- every evaluation is a candidate row: ``parents`` = the two parent member keys (better parent first),
  ``generation``, ``method``, ``genome`` (the pair genome and its starting point), recipe and scores; the
  originals are generation-0 candidates (a ``linear`` recipe of one model). Identical recipes are answered from
  the archive, never evaluated twice;
- the manager's decisions are events (``population_start``, ``member``, ``generation_plan``, ``pair_done``,
  ``generation_end``, ``stop``, each with its reason), kinship values go to the archive's kinship table.

Resume needs no checkpoint: the manager replays its events, and the interrupted pair's search replays itself
(:mod:`~evomerge.search.population.pair_search`). With one evaluator the resumed run's archive equals an
uninterrupted run's.

Pair section of the YAML (``population.pair``, optional): ``points``, ``lower``, ``upper``, ``init`` (a weight
or ``kinship``), ``optimizer`` (default: the space's ``optimizer.name``), ``sigma``, ``method``, ``parameters``,
``options``; see :class:`~evomerge.search.population.pair_search.PairSpace`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from evomerge.errors import ConfigError, RunDirError
from evomerge.executors.base import Executor
from evomerge.fitness.items import ItemScores
from evomerge.fitness.racing import RacingConfig
from evomerge.merge.methods.registry import get_method
from evomerge.merge.recipe import ROWS_OPTION, ModelEntry, Recipe
from evomerge.method_data import MethodDataProvider, recipe_rows
from evomerge.search.archive import Archive, CandidateRecord
from evomerge.search.dispatch import Dispatcher, Job
from evomerge.search.events import MANAGER_EVENTS, EventKind
from evomerge.search.optimizer import optimizer_class
from evomerge.search.population.behaviour import Behaviour, behaviour_matrix
from evomerge.search.population.kinship_cache import KinshipCache
from evomerge.search.population.manager import PairResult, PopulationManager
from evomerge.search.population.members import (
    JOINT_KEY,
    Member,
    MemberStore,
    competence_rows,
    parents_key,
    top_k,
)
from evomerge.search.population.pair_search import CrossoverSpace, PairSearch, PairSpace, seed_of, warm_start
from evomerge.search.population.parent_cache import ParentCache, ParentFolders
from evomerge.search.population.rules import PairPlan, PopulationConfig
from evomerge.search.progress import ProgressLine, SearchSummary, Timings
from evomerge.search.run import RunDir
from evomerge.search.space import Space
from evomerge.search.stopping import StopFlag, resume_failure_streak, stopping_rules

PARENTS_DIR = "parents"


class _Stopped(Exception):
    """The session stops (Ctrl-C/SIGTERM, wall time) without a ``stop`` event: a resume continues the run."""


class _FailedOut(_Stopped):
    """Too many evaluations failed in a row (``stopping.max_consecutive_failures``); a resume may go on."""


def population_config(space: Space) -> tuple[PopulationConfig, PairSpace]:
    """The ``population:`` section parsed: the manager's settings and the pair genome (``pair:`` subsection)."""
    section = dict(space.raw.population or {})
    where = f"{space.where}: population"
    pair = section.pop("pair", None) or {}
    if not isinstance(pair, Mapping):
        raise ConfigError(f"{where}.pair: expected a mapping, got {type(pair).__name__}")
    cfg = PopulationConfig.from_dict(section, where=where)
    known = {f.name for f in dataclasses.fields(PairSpace)}
    unknown = sorted(set(pair) - known)
    if unknown:
        raise ConfigError(f"{where}.pair: unknown key(s) {unknown} (known: {', '.join(sorted(known))})")
    try:
        ps = PairSpace(**{"optimizer": space.optimizer_name, **pair})
    except TypeError as exc:
        raise ConfigError(f"{where}.pair: {exc}") from None
    optimizer_class(ps.optimizer, f"{where}.pair.optimizer")
    return cfg, ps


class RunPopulation:
    """The manager's :class:`~evomerge.search.population.manager.PopulationBackend` over one run directory.

    Made of parts named after their jobs: the member store (members, recipes, child names), the parent folders
    (merged parents on disk), the kinship cache, the pair search, and the evaluation dispatcher that runs,
    retries, de-duplicates and archives every evaluation.
    """

    def __init__(self, run: RunDir, archive: Archive, space: Space, executor: Executor, cfg: PopulationConfig,
                 pair: PairSpace, *, stop: StopFlag, session: int, timings: Timings, t_start: float,
                 bar: ProgressLine, log: Callable[[str], None], deadline: float | None,
                 racing: RacingConfig | None = None) -> None:
        self.run, self.archive, self.space, self.cfg, self.pair = run, archive, space, cfg, pair
        self.stop, self.session, self._log, self.deadline = stop, session, log, deadline
        base = str(space.base_path)
        originals = {k: str(v) for k, v in space.models.items()}
        self.members = MemberStore(originals, [str(t.name) for t in space.fitness.tasks])
        self.folders = ParentFolders(base, originals, self.members, ParentCache(run.path / PARENTS_DIR,
                                                                                cfg.cache_disk_bytes,
                                                                                space.raw.vocab_policy),
                                     MethodDataProvider(space.fitness, base))
        self.kin = KinshipCache(archive, base, originals, self.members, self.folders, space.raw.vocab_policy)
        records = archive.results("search")
        self.dispatch = Dispatcher(archive, executor, penalty=space.penalty,
                                   max_retries=space.raw.executor.max_retries, session=session,
                                   settings={"mode": "population", "seed": space.seed}, records=records,
                                   timings=timings, t_start=t_start, bar=bar, say=self.say, shown=self.evaluations,
                                   racing=racing, race_against=self._race_bar)
        self.rules = stopping_rules(space)
        self.pairs = PairSearch(pair, self.dispatch, timings, self._new_id, self._check_stop,
                                where=f"{space.where}: population.pair.optimizer")
        self.crossover = CrossoverSpace(method=cfg.crossover_method, optimizer=pair.optimizer) if cfg.crossover \
            else None
        self._items: dict[int, dict[str, ItemScores]] = {}  # candidate id -> its per-item results (immutable)
        self._task_weights = {str(t.name): float(t.weight) for t in space.fitness.tasks}
        self._lower = [str(t.name) for t in space.fitness.tasks if t.direction == "minimize"]
        self.next_id = archive.max_id() + 1
        self._pair_rows: str | None = None  # population.pair_rows as the run started (read on the first pair)
        finished = self.members.replay(archive)
        # evaluations of a merge (a pair, the joint merge) that did not finish (an interrupted session): replayed,
        # not counted twice
        self._orphans = {r.id for r in records if len(r.parents) >= 2
                         and (r.generation, parents_key(r.parents)) not in finished}

    def say(self, message: str) -> None:
        self.run.log(message)
        self._log(message)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _race_bar(self) -> int | None:
        """What a candidate races against: the k-th best member (it must beat it to enter the top-k the
        manager merges) or, when higher, the best complete evaluation of its own pair so far (only a pair's best
        becomes a member); None while fewer than k members are scored (every item is evaluated then). With
        niche fitness a member with a lower aggregate may still enter the top-k (it solves rare items), so only
        the pair's own best is the bar."""
        top = top_k(list(self.members.members.values()), self.cfg.k)
        if len(top) < self.cfg.k or top[-1].candidate_id is None:
            return None
        bar = None if self.cfg.niche_alpha > 0 else self.archive.get(top[-1].candidate_id)
        for rec in self.pairs.results:
            if rec.complete and (bar is None or rec.aggregate > bar.aggregate):
                bar = rec
        return None if bar is None else bar.id

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Stopped(self.stop.reason or "stopped")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise _Stopped(f"wall_time of {self.space.raw.stopping.wall_time:.0f}s reached (this session)")
        failed = self.rules.failure_reason(self.dispatch.progress)
        if failed is not None:
            raise _FailedOut(failed)

    # ------------------------------------------------------------------------------------ protocol

    def evaluations(self) -> int:
        """Archived evaluations, less those of an interrupted pair (they count again when it is replayed)."""
        return self.dispatch.progress.evaluations - len(self._orphans)

    def events(self) -> list[dict[str, Any]]:
        return [{"kind": e["kind"], "payload": e["data"]} for e in self.archive.events()
                if e["kind"] in MANAGER_EVENTS]

    def record_event(self, kind: EventKind, payload: Mapping[str, Any]) -> None:
        self.archive.add_event(kind, _jsonable(payload))
        if kind == EventKind.GENERATION_PLAN:
            self.members.note_plan(int(payload["generation"]), payload["plans"])

    def originals(self) -> list[Member]:
        """Score each original once (a generation-0 candidate; an archived score is reused)."""
        recipes = {key: Recipe("linear", (ModelEntry(key),)) for key in self.folders.originals}
        records = {key: self.dispatch.archived(r.content_hash()) for key, r in recipes.items()}
        for key, recipe in recipes.items():
            if records[key] is None:
                self.dispatch.add(Job(self._new_id(), recipe, recipe.content_hash()), parents=[key])
        for done in self.dispatch.drain():
            records[done.record.parents[0]] = done.record
        recorded = {e["data"].get("key") for e in self.archive.events(EventKind.MEMBER)}
        out = []
        for key, recipe in recipes.items():
            rec = records[key]
            assert rec is not None
            member = Member(key, rec.aggregate, 0, (), rec.id, rec.ok)
            self.members.add(member, recipe)
            if key not in recorded:
                self.archive.add_event(EventKind.MEMBER, {"key": key, "generation": 0, "parents": [],
                                                          "candidate_id": rec.id, "score": rec.aggregate,
                                                          "reason": "original model"})
                self.say(f"original {key}: {rec.aggregate:.4f}")
            out.append(member)
        return out

    def behaviour(self, keys: list[str]) -> Behaviour | None:
        """The members' per-item search scores (None: a member has none recorded, e.g. an older archive)."""
        ids: list[int] = []
        for k in keys:
            cid = self.members[k].candidate_id if k in self.members.members else None
            if cid is None:
                return None
            ids.append(int(cid))
        missing = [c for c in ids if c not in self._items]
        if missing:
            found = self.archive.items_of(missing, "search")
            for c in missing:
                self._items[c] = found.get(c, {})
        tasks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for task in self._task_weights:
            rows = [self._items[c].get(task) for c in ids]
            if any(r is None for r in rows):
                return None
            ref = rows[0]
            assert ref is not None
            if any((r.total, r.content) != (ref.total, ref.content) for r in rows if r is not None):
                return None
            dense = [r.dense() for r in rows if r is not None]
            tasks[task] = (np.stack([d[0] for d in dense]), np.stack([d[1] for d in dense]))
        return behaviour_matrix(keys, tasks, self._task_weights, self._lower)

    def kinship(self, a: str, b: str) -> float:
        """Kinship in the configured metric (cached in the archive's kinship table)."""
        return self.kin.value(a, b, self.cfg.metric)

    def run_pair(self, plan: PairPlan, generation: int, budget: int) -> PairResult:
        """One pair's search (``budget`` evaluations; 0 = the fixed starting recipe), replaying archived ones."""
        self._check_stop()
        if plan.operator == "refine":
            return self._refine(plan, generation, budget)
        ma, mb = self.members[plan.a], self.members[plan.b]
        a, b = (plan.a, plan.b) if (ma.score, plan.b) >= (mb.score, plan.a) else (plan.b, plan.a)
        key = self.members.child_key(plan.key, generation)
        extra = self.folders.extra_models([a, b])
        self.kinship(a, b)  # cached for the report's gain-vs-kinship plot
        ps: PairSpace | CrossoverSpace = self.pair
        if plan.operator == "crossover":
            if self.crossover is None:
                raise ConfigError(f"{self.space.where}: population: a crossover pair is planned but crossover is off")
            ps = self.crossover
        x0 = ps.x0(self.kin.value(a, b, "cos") if ps.init == "kinship" else None)
        warm = warm_start(self.archive.results("search"), generation, x0, ps) if budget > 0 else None
        rows = self._competence_rows((a, b)) if ps is self.pair else {}
        results = self.pairs.run((a, b), generation, budget, seed=seed_of(self.space.seed, generation, a, b), x0=x0,
                                 warm=warm, extra_models=extra, model_tasks=self.members.model_tasks(extra),
                                 space=ps, rows=rows)
        return self._child(key, generation, (a, b), results, plan.reason)

    def _refine(self, plan: PairPlan, generation: int, budget: int) -> PairResult:
        """The merge that made member ``plan.a`` searched again (its parents, method, calibration rows), from its
        genome with a fresh optimizer: an escape move that spends the budget where the best member came from."""
        member = self.members[plan.a]
        rec = None if member.candidate_id is None else self.archive.get(int(member.candidate_id))
        if rec is None or not member.parents or not rec.genome or "x" not in rec.genome:
            raise RunDirError(f"refine {plan.a}: it is no merged member with an archived genome")
        recipe = Recipe.from_dict(rec.recipe)
        ps: PairSpace | CrossoverSpace = self.pair
        if self.crossover is not None and recipe.method == self.crossover.method:
            ps = self.crossover
        parents = list(member.parents)
        extra = self.folders.extra_models(parents)
        results = self.pairs.run(parents, generation, budget, seed=seed_of(self.space.seed, generation, "refine",
                                                                           *parents),
                                 x0=np.asarray(rec.genome["x"], float), extra_models=extra,
                                 model_tasks=self.members.model_tasks(extra), space=ps, rows=recipe_rows(recipe),
                                 start_seed=recipe.seed)
        return self._child(self.members.child_key(plan.key, generation), generation, tuple(parents), results,
                           "refine")

    def _competence_rows(self, parents: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """The parents' calibration tasks split by competence (``population.pair_rows``; as the run started: a run
        recorded before the split existed calibrates on the ancestors' tasks), for a method that calibrates."""
        if self._pair_rows is None:
            start = next(iter(self.archive.events(EventKind.POPULATION_START)), None)
            self._pair_rows = self.cfg.as_started(None if start is None else start["data"]).pair_rows
        if self._pair_rows != "competence" or get_method(self.pair.method).option(ROWS_OPTION) is None:
            return {}
        merged_tasks = self.members.model_tasks(parents)
        tasks_of = {k: merged_tasks.get(k, ()) for k in parents}
        scores: dict[str, dict[str, float]] = {}
        for k in parents:
            cid = self.members[k].candidate_id
            rec = None if cid is None else self.archive.get(int(cid))
            if rec is None or not rec.ok:
                return {}
            scores[k] = {t: float(v["value"]) for t, v in rec.scores.items()}
        if any(t not in scores[k] for k, ts in tasks_of.items() for t in ts):
            return {}
        return competence_rows(tasks_of, scores, self._lower)

    def run_joint(self, parents: list[str], budget: int) -> PairResult:
        """The joint merge of the starting models by the pair method (``budget`` evaluations of the same per-layer
        genome over all of them; 0 = its fixed recipe), replaying archived ones like a pair."""
        self._check_stop()
        n = len(parents)
        cos = None
        if self.pair.init == "kinship":
            values = [self.kin.value(parents[i], parents[j], "cos") for i in range(n) for j in range(i + 1, n)]
            finite = [v for v in values if math.isfinite(v)]
            cos = sum(max(0.0, v) for v in finite) / len(finite) if finite else None
        x0 = self.pair.x0(cos, n)
        results = self.pairs.run(parents, 0, budget, seed=seed_of(self.space.seed, 0, *parents), x0=x0)
        return self._child(JOINT_KEY, 0, tuple(parents), results, "joint")

    def _child(self, key: str, generation: int, parents: tuple[str, ...], results: list[CandidateRecord],
               reason: str) -> PairResult:
        """The member a merge's search made: its best evaluation (a failure only when all failed)."""
        best = max(results, key=lambda r: (r.ok, r.aggregate, -r.id))
        child = Member(key, float(best.aggregate), generation, parents, best.id, best.ok)
        self.members.add(child, Recipe.from_dict(best.recipe))
        self._orphans -= {r.id for r in results}
        self.say(f"  g{generation} {reason:<11} {' x '.join(parents)} -> {key} {child.score:.4f} "
                 f"({len(results)} evaluations, best #{best.id})")
        return PairResult(child, len(results))

    # ------------------------------------------------------------------------------------ test split

    def rescore(self, k: int, split: str = "test") -> list[int]:
        """Score the ``k`` best candidates on ``split`` with their merged parents (skipping re-scored ones)."""
        return self.dispatch.rescore(k, split, inputs_of=self._inputs)

    def _inputs(self, recipes: Mapping[int, Recipe]) -> dict[int, tuple[dict[str, str], dict[str, tuple[str, ...]]]]:
        """Each candidate's merged parents (folders, all kept on disk until the last is built) and their tasks."""
        needed: list[str] = []
        for cid, recipe in recipes.items():
            for key in self.folders.merged(recipe):
                if key not in self.members:
                    raise RunDirError(f"candidate {cid} names {key!r}, which is no member of this run")
                if key not in needed:
                    needed.append(key)
        folders = self.folders.extra_models(needed)
        out = {}
        for cid, recipe in recipes.items():
            extra = {k: folders[k] for k in self.folders.merged(recipe)}
            out[cid] = (extra, self.members.model_tasks(extra))
        return out

    @property
    def best(self) -> tuple[float, int] | None:
        p = self.dispatch.progress
        return None if p.best is None or p.best_id is None else (p.best, p.best_id)


def _jsonable(obj: Any) -> Any:
    """Events hold JSON: NaN/inf kinships become None, numpy scalars plain numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _previous_wall(archive: Archive) -> float:
    return sum(float(e["data"].get("timings", {}).get("wall", 0.0)) for e in archive.events(EventKind.SESSION_END))


def run_population_session(run: RunDir, space: Space, executor: Executor, *, stop: StopFlag,
                           log: Callable[[str], None], progress: bool, setup_seconds: float = 0.0,
                           racing: RacingConfig | None = None) -> SearchSummary:
    """Run (or resume) the population manager in ``run`` until a stop rule fires or ``stop`` is set.

    The best ``test_top`` candidates are re-scored on the test split at the end (their recipes name merged
    parents, which the plain re-scoring cannot build), so the caller's ``rescore_best`` finds nothing left.
    ``racing``: how candidates race the k-th best member (default: the space's ``racing`` section).
    """
    cfg, pair = population_config(space)
    timings = Timings(setup=setup_seconds)
    t_start = time.monotonic() - setup_seconds
    with run.archive() as archive:
        session = len(archive.events(EventKind.SESSION_START)) + 1
        wall = space.raw.stopping.wall_time
        deadline = None if wall is None else t_start + max(0.0, wall - _previous_wall(archive))
        bar = ProgressLine(space.budget, space.raw.progress_interval, enabled=progress,
                           done_before=archive.count())
        backend = RunPopulation(run, archive, space, executor, cfg, pair, stop=stop, session=session,
                                timings=timings, t_start=t_start, bar=bar, log=log, deadline=deadline,
                                racing=space.racing if racing is None else racing)
        resume_failure_streak(archive, backend.dispatch.progress, backend.say)
        archive.add_event(EventKind.SESSION_START, {"session": session, "budget": space.budget, "mode": "population",
                                                    "workers": space.raw.workers, "capacity": executor.capacity,
                                                    "test_top": space.raw.test_top,
                                                    "evaluations": backend.evaluations(), "resubmitted": []})
        if session > 1:
            backend.say(f"session {session}: resuming the population run ({backend.evaluations()} evaluations)")
        stopped = failed_out = False
        try:
            outcome = PopulationManager(backend, cfg, space.budget, log=backend.say).run()
            reason = outcome.stop_reason
        except _Stopped as exc:
            reason, stopped, failed_out = str(exc), True, isinstance(exc, _FailedOut)
        final = not stopped and not stop.is_set()
        if final and space.raw.test_top > 0:
            backend.rescore(space.raw.test_top)
        backend.dispatch.timing_event(EventKind.SESSION_END, reason=reason, evaluations=backend.evaluations(),
                                      mode="population", final=final, failures=failed_out)
        backend.say(f"session {session} ended: {reason}")
        best = backend.best
        bar.update(backend.evaluations(), best[0] if best else None, best[1] if best else None, force=True)
        return SearchSummary(backend.evaluations(), backend.dispatch.progress.failed, best[1] if best else None,
                             best[0] if best else None, reason, session, timings, final, failed_out)
