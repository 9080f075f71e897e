"""The population manager as a mode of the search core: same run directory, same archive, same executors.

A search space with a ``population:`` section runs Top-k greedy merging with kinship
(:class:`~evomerge.search.population.PopulationManager`) instead of one black-box search over the whole genome.
Everything goes to the run's :class:`~evomerge.search.archive.Archive`:

- every evaluation is a candidate row: ``parents`` = the two parent member keys (better parent first),
  ``generation``, ``method``, ``genome`` (the pair genome and its starting point), recipe and scores; the
  originals are generation-0 candidates (a ``linear`` recipe of one model). Identical recipes are answered from
  the archive, never evaluated twice;
- the manager's decisions are events (``population_start``, ``member``, ``generation_plan``, ``pair_done``,
  ``generation_end``, ``stop``, each with its reason), kinship values go to the archive's kinship table.

Resume needs no checkpoint: the manager replays its events, and the interrupted pair's search replays itself.
A pair's optimizer is seeded from the run seed, generation and parents; on resume a fresh one asks the same
genomes in the same order, and every ask whose recipe is archived is told the archived score instead of being
evaluated. With one evaluator the resumed run's archive equals an uninterrupted run's.

Pair section of the YAML (``population.pair``, optional): ``points``, ``lower``, ``upper``, ``init`` (a weight
or ``kinship``), ``optimizer`` (default: the space's ``optimizer.name``), ``sigma``; see
:class:`~evomerge.search.population_backend.PairSpace`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from evomerge.errors import ConfigError, RunDirError
from evomerge.executors.base import EvalJob, EvalOutcome, Executor
from evomerge.fitness.result import EvalResult
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.method_data import MethodData, MethodDataProvider
from evomerge.search.archive import Archive, CandidateRecord
from evomerge.search.loop import SearchSummary, StopFlag, Timings, archive_evaluation, task_scores
from evomerge.search.population import (
    Member,
    PairPlan,
    PairResult,
    PopulationConfig,
    PopulationManager,
    pair_key,
    top_k,
)
from evomerge.search.population_backend import (
    PairSpace,
    ParentCache,
    ancestor_tasks,
    make_optimizer,
    seed_of,
)
from evomerge.search.progress import ProgressLine
from evomerge.search.run import RunDir
from evomerge.search.space import Space

MANAGER_EVENTS = ("population_start", "generation_plan", "pair_done", "generation_end", "stop")
MAX_DUPLICATES_IN_A_ROW = 50  # a pair's optimizer keeps proposing archived recipes: its search is over
PARENTS_DIR = "parents"


class _Stopped(Exception):
    """The session stops (Ctrl-C/SIGTERM, wall time) without a ``stop`` event: a resume continues the run."""


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
    return cfg, ps


@dataclasses.dataclass
class _Job:
    """One evaluation to run and archive."""

    recipe: Recipe
    recipe_hash: str
    parents: list[str]
    generation: int
    genome: dict[str, Any] | None
    candidate_id: int = -1
    attempt: int = 0
    record: CandidateRecord | None = None


class ArchiveBackend:
    """:class:`~evomerge.search.population.PopulationBackend` over the run's archive and an Executor."""

    def __init__(self, run: RunDir, archive: Archive, space: Space, executor: Executor, cfg: PopulationConfig,
                 pair: PairSpace, *, stop: StopFlag, session: int, timings: Timings, bar: ProgressLine,
                 log: Callable[[str], None], deadline: float | None) -> None:
        self.run, self.archive, self.space, self.executor = run, archive, space, executor
        self.cfg, self.pair = cfg, pair
        self.stop, self.session, self.timings, self.bar, self._log = stop, session, timings, bar, log
        self.deadline = deadline
        self.base = str(space.base_path)
        self.original_paths = {k: str(v) for k, v in space.models.items()}
        self.cache = ParentCache(run.path / PARENTS_DIR, cfg.cache_disk_bytes)
        self.max_retries = space.raw.executor.max_retries
        self._members: dict[str, Member] = {}
        self._recipes: dict[str, Recipe] = {}
        self._kin_memo: dict[tuple[str, str, str], float] = {}
        self._gram: Any = None
        self.method_data = MethodDataProvider(space.fitness, self.base)
        self._forms: dict[str, Any] = {}
        self._layer_map: Any = None
        self._plans: dict[int, list[PairPlan]] = {}
        self.next_id = archive.max_id() + 1
        self.best: tuple[float, int] | None = None
        self.failed = 0
        for rec in archive.results("search"):
            self._note(rec)
        # children and plans recorded by earlier sessions
        finished: set[tuple[int, tuple[str, str]]] = set()
        for e in self.events():
            p = e["payload"]
            if e["kind"] == "pair_done":
                finished.add((int(p["generation"]), pair_key(p["a"], p["b"])))
                rec = archive.get(int(p["candidate_id"]))
                if rec is None:
                    raise RunDirError(f"{archive.path}: pair_done names candidate {p['candidate_id']}, not archived")
                self._members[str(p["child"])] = Member(str(p["child"]), float(p["score"]), int(p["generation"]),
                                                        (str(p["a"]), str(p["b"])), rec.id, rec.ok)
                self._recipes[str(p["child"])] = Recipe.from_dict(rec.recipe)
            elif e["kind"] == "generation_plan":
                self._plans[int(p["generation"])] = [PairPlan.from_dict(d) for d in p["plans"]]
        # evaluations of a pair that did not finish (an interrupted session): replayed, not counted twice
        self._orphans = {r.id for r in archive.results("search") if r.generation > 0 and len(r.parents) == 2
                         and (r.generation, pair_key(*r.parents)) not in finished}

    def say(self, message: str) -> None:
        self.run.log(message)
        self._log(message)

    def _note(self, rec: CandidateRecord) -> None:
        if not rec.ok:
            self.failed += 1
        elif self.best is None or rec.aggregate > self.best[0]:
            self.best = (rec.aggregate, rec.id)

    # ------------------------------------------------------------------------------------ protocol

    def evaluations(self) -> int:
        """Archived evaluations, less those of an interrupted pair (they count again when it is replayed)."""
        return self.archive.count() - len(self._orphans)

    def events(self) -> list[dict[str, Any]]:
        return [{"kind": e["kind"], "payload": e["data"]} for e in self.archive.events()
                if e["kind"] in MANAGER_EVENTS]

    def record_event(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.archive.add_event(kind, _jsonable(payload))
        if kind == "generation_plan":
            self._plans[int(payload["generation"])] = [PairPlan.from_dict(d) for d in payload["plans"]]

    def originals(self) -> list[Member]:
        """Score each original once (a generation-0 candidate; an archived score is reused)."""
        jobs = []
        for key in self.original_paths:
            recipe = Recipe("linear", (ModelEntry(key),))
            jobs.append(_Job(recipe, recipe.content_hash(), [key], 0, None))
        todo = []
        for job in jobs:
            job.record = self.archive.by_hash(job.recipe_hash)
            if job.record is None:
                todo.append(job)
        self._evaluate(todo)
        recorded = {e["data"].get("key") for e in self.archive.events("member")}
        out = []
        for job in jobs:
            rec = job.record
            assert rec is not None
            key = job.parents[0]
            member = Member(key, rec.aggregate, 0, (), rec.id, rec.ok)
            self._members[key] = member
            self._recipes[key] = job.recipe
            if key not in recorded:
                self.archive.add_event("member", {"key": key, "generation": 0, "parents": [],
                                                  "candidate_id": rec.id, "score": rec.aggregate,
                                                  "reason": "original model"})
                self.say(f"original {key}: {rec.aggregate:.4f}")
            out.append(member)
        return out

    def kinship(self, a: str, b: str) -> float:
        """Kinship in the configured metric (cached in the archive's kinship table)."""
        return self._kinship(a, b, self.cfg.metric)

    def run_pair(self, plan: PairPlan, generation: int, budget: int) -> PairResult:
        """One pair's search (``budget`` evaluations; 0 = the fixed starting recipe), replaying archived ones."""
        self._check_stop()
        ma, mb = self._members[plan.a], self._members[plan.b]
        a, b = (plan.a, plan.b) if (ma.score, plan.b) >= (mb.score, plan.a) else (plan.b, plan.a)
        key = self._child_key(plan, generation)
        pk = pair_key(a, b)
        extra = {k: self._path(k, keep=[a, b]) for k in (a, b) if k not in self.original_paths}
        seed = seed_of(self.space.seed, generation, a, b)
        ps = self.pair
        self.kinship(a, b)  # cached for the report's gain-vs-kinship plot
        x0 = ps.x0(self._kinship(a, b, "cos") if ps.init == "kinship" else None)
        warm = self._warm_genome(generation, x0)
        results: list[CandidateRecord] = []
        counted: set[int] = set()

        def job_of(x: np.ndarray) -> _Job:
            recipe = ps.recipe(a, b, x, seed)
            genome = {"x": [float(v) for v in x], "x0": [float(v) for v in x0]}
            return _Job(recipe, recipe.content_hash(), [a, b], generation, genome)

        def mine(rec: CandidateRecord) -> bool:
            return (rec.generation == generation and len(rec.parents) == 2 and pair_key(*rec.parents) == pk
                    and rec.id not in counted)

        if budget <= 0:
            job = job_of(x0)
            rec = self.archive.by_hash(job.recipe_hash)
            if rec is None:
                self._evaluate([job], extra)
                rec = job.record
            assert rec is not None
            results.append(rec)
        else:
            opt = make_optimizer(ps.optimizer, x0, ps.lower, ps.upper, ps.sigma, budget, seed,
                                 num_workers=self.executor.capacity)
            suggestions = [x0]
            if warm is not None and len(warm) == ps.dims and not np.allclose(warm, x0):
                suggestions.append(warm)
            for s in reversed(suggestions):  # LIFO: x0 is asked first
                opt.suggest(s)
            in_a_row = 0
            while len(counted) < budget and in_a_row < MAX_DUPLICATES_IN_A_ROW:
                self._check_stop()
                batch: list[tuple[Any, _Job]] = []
                followers: list[tuple[Any, _Job]] = []
                while len(counted) + len(batch) < budget and len(batch) < max(1, self.executor.capacity) \
                        and in_a_row < MAX_DUPLICATES_IN_A_ROW:
                    t0 = time.perf_counter()
                    cand = opt.ask()
                    job = job_of(np.asarray(cand.value, float))
                    self.timings.optimizer += time.perf_counter() - t0
                    rec = self.archive.by_hash(job.recipe_hash)
                    if rec is not None:  # the archive answers (a replayed evaluation of this pair counts)
                        opt.tell(cand, -rec.aggregate)
                        if mine(rec):
                            counted.add(rec.id)
                            results.append(rec)
                            in_a_row = 0
                        else:
                            in_a_row += 1
                        continue
                    same = next((j for _, j in batch if j.recipe_hash == job.recipe_hash), None)
                    if same is not None:
                        followers.append((cand, same))
                        in_a_row += 1
                        continue
                    in_a_row = 0
                    batch.append((cand, job))
                if not batch:
                    continue
                self._evaluate([j for _, j in batch], extra)
                for cand, job in batch + followers:
                    assert job.record is not None
                    opt.tell(cand, -job.record.aggregate)
                for _, job in batch:
                    assert job.record is not None
                    counted.add(job.record.id)
                    results.append(job.record)
        best = max(results, key=lambda r: (r.ok, r.aggregate, -r.id))
        child = Member(key, float(best.aggregate), generation, (a, b), best.id, best.ok)
        self._members[key] = child
        self._recipes[key] = Recipe.from_dict(best.recipe)
        self._orphans -= {r.id for r in results}
        self.say(f"  g{generation} {plan.reason:<11} {a} x {b} -> {key} {child.score:.4f} "
                 f"({len(results)} evaluations, best #{best.id})")
        return PairResult(child, len(results))

    # ------------------------------------------------------------------------------------ evaluation

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Stopped(self.stop.reason or "stopped")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise _Stopped(f"wall_time of {self.space.raw.stopping.wall_time:.0f}s reached (this session)")

    def _evaluate(self, jobs: Sequence[_Job], extra: Mapping[str, str] | None = None) -> None:
        """Run ``jobs`` through the executor (``capacity`` in flight), archive each, set ``job.record``."""
        extra = dict(extra or {})
        by_id: dict[int, _Job] = {}
        queue: list[_Job] = []
        for job in jobs:
            job.candidate_id = self.next_id
            self.next_id += 1
            by_id[job.candidate_id] = job
            queue.append(job)
        inflight = 0

        def submit(job: _Job) -> None:
            self.executor.submit(EvalJob(candidate_id=job.candidate_id, recipe=job.recipe, split="search",
                                         attempt=job.attempt, extra_models=extra,
                                         model_tasks=self.model_tasks(extra)))

        while queue or inflight:
            while queue and inflight < max(1, self.executor.capacity):
                submit(queue.pop(0))
                inflight += 1
            t0 = time.perf_counter()
            outcomes = self.executor.poll(timeout=0.5)
            self.timings.waiting += time.perf_counter() - t0
            for outcome in outcomes:
                job = by_id[outcome.job.candidate_id]
                if outcome.lost and job.attempt < self.max_retries:
                    job.attempt += 1
                    self.archive.add_event("requeued", {"candidate": job.candidate_id, "attempt": job.attempt,
                                                        "worker": outcome.worker, "error": outcome.result.error})
                    self.say(f"candidate {job.candidate_id}: worker {outcome.worker} lost; re-queued "
                             f"(attempt {job.attempt + 1})")
                    submit(job)
                    continue
                inflight -= 1
                self._record(job, outcome)

    def _record(self, job: _Job, outcome: EvalOutcome) -> None:
        result = outcome.result
        if outcome.lost:
            result = EvalResult.failure(f"worker lost {job.attempt + 1} times; last: {result.error}",
                                        self.space.penalty, "search", result.seconds, result.settings)
        rec = archive_evaluation(
            self.archive, self.timings, outcome, result, candidate_id=job.candidate_id,
            recipe_hash=job.recipe_hash, recipe=job.recipe, parents=job.parents, generation=job.generation,
            genome=job.genome, settings={"mode": "population", "seed": self.space.seed, "attempt": job.attempt},
            penalty=self.space.penalty, session=self.session)
        job.record = rec
        before = self.best
        self._note(rec)
        if not rec.ok:
            self.say(f"candidate {rec.id} failed: {(rec.error or '').splitlines()[0][:300] if rec.error else ''}")
        n = self.evaluations()
        self.bar.update(n, self.best[0] if self.best else None, self.best[1] if self.best else None, rec.aggregate,
                        force=self.best != before)

    # ------------------------------------------------------------------------------------ members

    def _child_key(self, plan: PairPlan, generation: int) -> str:
        plans = self._plans.get(generation) or []
        idx = next((i for i, p in enumerate(plans) if p.key == plan.key), None)
        if idx is None:
            raise RunDirError(f"pair {plan.key} is not in the recorded plan of generation {generation}")
        return f"g{generation}.{idx + 1}"

    def _warm_genome(self, generation: int, x0: np.ndarray) -> np.ndarray | None:
        """The best pair genome of EARLIER generations, as a per-gene ratio to its own start, applied to ``x0``.

        Earlier generations only, so a pair's start does not depend on the order pairs of its generation ran
        in, nor on a resume. Genomes are oriented: better parent first.
        """
        best: CandidateRecord | None = None
        for r in self.archive.results("search"):
            if r.genome is None or "x" not in r.genome or not r.ok or not 0 < r.generation < generation:
                continue
            if best is None or r.aggregate > best.aggregate:
                best = r
        if best is None or best.genome is None or len(best.genome["x"]) != len(x0):
            return None
        ratio = np.asarray(best.genome["x"], float) / np.maximum(np.asarray(best.genome["x0"], float), 1e-6)
        return np.clip(x0 * ratio, self.pair.lower, self.pair.upper)

    def recipe_of(self, key: str) -> Recipe:
        return self._recipes[key]

    def extra_models(self, recipe: Recipe) -> dict[str, str]:
        """Folders of the merged parents ``recipe`` names (materialized on demand)."""
        names = [m.model for m in recipe.models if m.model not in self.original_paths and m.model != BASE_KEY]
        return {k: self._path(k, keep=names) for k in names}

    def model_tasks(self, keys: Sequence[str] | Mapping[str, str]) -> dict[str, tuple[str, ...]]:
        """The fitness tasks each merged member of ``keys`` stands for (calibration rows of qp/apl pairs)."""
        names = [str(t.name) for t in self.space.fitness.tasks]
        def recipe_of(k: str) -> Recipe | None:
            return None if k in self.original_paths else self._recipes.get(k)

        out = {k: ancestor_tasks(k, recipe_of, names) for k in keys}
        return {k: v for k, v in out.items() if v}

    def _path(self, key: str, keep: Sequence[str] = ()) -> str:
        if key == BASE_KEY:
            return self.base
        if key in self.original_paths:
            return self.original_paths[key]
        recipe = self._recipes[key]
        if recipe.method == "linear" and len(recipe.models) == 1 and recipe.models[0].model in self.original_paths:
            return self.original_paths[recipe.models[0].model]
        return str(self.cache.get(key, self._recipes.__getitem__, lambda k: self._path(k, keep), keep=keep,
                                  data_of=self._data_of))

    def _data_of(self, recipe: Recipe, folders: Mapping[str, str]) -> MethodData:
        """What materializing a data-aware member needs, keyed by the folders its recipe resolves to."""
        return self.method_data.for_recipe(recipe, self.model_tasks(list(folders)), key_of=folders)

    # ------------------------------------------------------------------------------------ kinship

    def _ensure_gram(self) -> None:
        if self._gram is not None:
            return
        from evomerge.kinship import kinship_matrix
        from evomerge.models.folder import ModelFolder
        from evomerge.models.layers import LayerMap

        keys = list(self.original_paths)
        km = kinship_matrix([self.original_paths[k] for k in keys], self.base, names=keys, keep_tensors=True)
        self._gram = km.gram()
        with ModelFolder.open(self.base) as folder:
            self._layer_map = LayerMap.from_config(folder.config)

    def _form(self, key: str) -> Any:
        """The linear form of a member's task vector over the originals, or None when not linear."""
        from evomerge.kinship import linear_form

        if key in self._forms:
            return self._forms[key]
        self._ensure_gram()
        if key in self.original_paths:
            form = self._gram.unit(key)
        else:
            recipe = self._recipes[key]
            if recipe.method == "linear" and len(recipe.models) == 1 and recipe.models[0].model in self.original_paths:
                form = self._gram.unit(recipe.models[0].model)
            else:
                parents = {m.model: self._form(m.model) for m in recipe.models if m.model not in self.original_paths}
                form = None if any(v is None for v in parents.values()) else linear_form(
                    recipe, self._gram, parents, BASE_KEY, self._layer_map)
        self._forms[key] = form
        return form

    def _kinship(self, a: str, b: str, metric: str) -> float:
        memo = (*pair_key(a, b), metric)
        if memo in self._kin_memo:
            return self._kin_memo[memo]
        cached = self.archive.get_kinship(a, b, metric)
        if cached is not None:
            self._kin_memo[memo] = cached
            return cached
        fa, fb = self._form(a), self._form(b)
        if fa is not None and fb is not None:
            value = float(self._gram.value(fa, fb, metric))
        else:
            from evomerge.kinship import kinship as direct

            value = float(direct(self._path(a), self._path(b), self.base, metric))
        self._kin_memo[memo] = value
        if math.isfinite(value):  # NaN (a zero task vector) is not cached: the table holds numbers only
            self.archive.put_kinship(a, b, metric, value)
        return value

    # ------------------------------------------------------------------------------------ test split

    def rescore(self, k: int, split: str = "test") -> list[int]:
        """Score the ``k`` best candidates on ``split`` with their merged parents (skipping re-scored ones)."""
        todo = [r for r in self.archive.best(k) if self.archive.rescore(r.id, split) is None]
        done = []
        for r in todo:
            recipe = Recipe.from_dict(r.recipe)
            for key in (m.model for m in recipe.models):
                if key not in self._recipes and key not in self.original_paths and key != BASE_KEY:
                    raise RunDirError(f"candidate {r.id} names {key!r}, which is no member of this run")
            extra = self.extra_models(recipe)
            outcome: EvalOutcome | None = None
            for attempt in range(self.max_retries + 1):
                self.executor.submit(EvalJob(candidate_id=r.id, recipe=recipe, split=split, attempt=attempt,
                                             extra_models=extra, model_tasks=self.model_tasks(extra)))
                outs: list[EvalOutcome] = []
                while not outs:
                    outs = self.executor.poll(timeout=0.5)
                outcome = outs[0]
                if not outcome.lost:
                    break
            assert outcome is not None
            res = outcome.result
            self.archive.add_rescore(candidate_id=r.id, split=split, ok=res.ok and not outcome.lost,
                                     scores=task_scores(res),
                                     aggregate=res.aggregate if math.isfinite(res.aggregate) else self.space.penalty,
                                     settings=res.settings, merge_seconds=outcome.merge_seconds,
                                     eval_seconds=outcome.eval_seconds, worker=outcome.worker, error=res.error)
            self.say(f"candidate {r.id}: {split} {res.aggregate:.6f}" + ("" if res.ok else f" ({res.error})"))
            done.append(r.id)
        return done


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
    return sum(float(e["data"].get("timings", {}).get("wall", 0.0)) for e in archive.events("session_end"))


def run_population_session(run: RunDir, space: Space, executor: Executor, *, stop: StopFlag,
                           log: Callable[[str], None], progress: bool, setup_seconds: float = 0.0
                           ) -> SearchSummary:
    """Run (or resume) the population manager in ``run`` until a stop rule fires or ``stop`` is set.

    The best ``test_top`` candidates are re-scored on the test split at the end (their recipes name merged
    parents, which the plain re-scoring cannot build), so the caller's ``rescore_best`` finds nothing left.
    """
    cfg, pair = population_config(space)
    timings = Timings(setup=setup_seconds)
    t_start = time.monotonic() - setup_seconds
    with run.archive() as archive:
        session = len(archive.events("session_start")) + 1
        wall = space.raw.stopping.wall_time
        deadline = None if wall is None else t_start + max(0.0, wall - _previous_wall(archive))
        bar = ProgressLine(space.budget, space.raw.progress_interval, enabled=progress,
                           done_before=archive.count())
        backend = ArchiveBackend(run, archive, space, executor, cfg, pair, stop=stop, session=session,
                                 timings=timings, bar=bar, log=log, deadline=deadline)
        archive.add_event("session_start", {"session": session, "budget": space.budget, "mode": "population",
                                            "workers": executor.capacity, "evaluations": backend.evaluations(),
                                            "resubmitted": []})
        if session > 1:
            backend.say(f"session {session}: resuming the population run ({backend.evaluations()} evaluations)")
        stopped = False
        try:
            outcome = PopulationManager(backend, cfg, space.budget, log=backend.say).run()
            reason = outcome.stop_reason
        except _Stopped as exc:
            reason, stopped = str(exc), True
        if not stopped and not stop.is_set() and space.raw.test_top > 0:
            backend.rescore(space.raw.test_top)
        timings.wall = time.monotonic() - t_start
        archive.add_event("session_end", {"session": session, "reason": reason, "timings": timings.to_dict(),
                                          "evaluations": backend.evaluations(), "mode": "population"})
        backend.say(f"session {session} ended: {reason}")
        best = backend.best
        bar.update(backend.evaluations(), best[0] if best else None, best[1] if best else None, force=True)
        return SearchSummary(backend.evaluations(), backend.failed, best[1] if best else None,
                             best[0] if best else None, reason, session, timings)


# ------------------------------------------------------------------------------------------------ status


def population_status_lines(archive: Archive, k: int | None = None) -> list[str]:
    """Current generation, the top-k with scores and the last decision (empty for a plain search)."""
    events = [e for e in archive.events() if e["kind"] in (*MANAGER_EVENTS, "member")]
    start = next((e["data"] for e in events if e["kind"] == "population_start"), None)
    if start is None:
        return []
    k = k or int(start.get("k", 3))
    members: list[Member] = []
    for e in events:
        p = e["data"]
        if e["kind"] == "member":
            members.append(Member(str(p["key"]), float(p["score"]), 0, (), p.get("candidate_id")))
        elif e["kind"] == "pair_done":
            members.append(Member(str(p["child"]), float(p["score"]), int(p["generation"]), (p["a"], p["b"]),
                                  p.get("candidate_id")))
    lines = [f"population: k={start.get('k')}, kinship {start.get('metric')}, pair budget "
             f"{start.get('pair_budget')}, exploration {'on' if start.get('explore') else 'off'}"]
    plans = [e["data"] for e in events if e["kind"] == "generation_plan"]
    if plans:
        cur = plans[-1]
        done = sum(1 for e in events if e["kind"] == "pair_done" and e["data"]["generation"] == cur["generation"])
        lines.append(f"  generation {cur['generation']}: {done}/{len(cur['plans'])} pair merges done")
    top = top_k(members, k)
    if top:
        lines.append(f"  top-{k}: " + ", ".join(f"{m.key} {m.score:.4f}" + (f" (#{m.candidate_id})"
                                                                           if m.candidate_id is not None else "")
                                                for m in top))
    last = next((e for e in reversed(events) if e["kind"] in ("generation_plan", "stop")), None)
    if last is not None:
        what = "stop" if last["kind"] == "stop" else f"plan of generation {last['data'].get('generation')}"
        lines.append(f"  last decision ({what}): {last['data'].get('reason')}")
    return lines
