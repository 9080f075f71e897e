"""The population manager's production backend: pair searches through an Executor, a SQLite store, kinship.

- :class:`PopulationStore`: one SQLite file (WAL) holding every evaluation, every population event, the members
  and the kinship cache, so a run resumes mid-generation and ``evomerge report`` reads everything from it.
- :class:`PairSearch`: one parent pair's per-layer black-box search (nevergrad, ask/tell through any
  :class:`~evomerge.executors.base.Executor`), warm-started from the best genome of earlier pairs; with budget
  0 it evaluates the fixed recipe only (the paper's setting). Resuming replays the stored evaluations of an
  interrupted pair into a fresh optimizer with the same seed, so the rest of the search is the same.
- :class:`ParentCache`: merged parents materialized on disk on demand (LRU, bounded in bytes); workers load
  them into their resident merger through ``EvalJob.extra_models`` (bounded in count, see
  :class:`PopulationWorker`).
- Kinship of members: exact from the originals' per-tensor Gram matrices when the member's recipe chain is
  linear (task arithmetic), else from materialized weights; cached in the store.

Pair genome: per-layer weights of the two parents (``points`` values each, interpolated across layers as
mergekit gradients), merged by task arithmetic against the common base: θ = θ0 + w_A(l) τ_A + w_B(l) τ_B.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import ConfigError, RunDirError
from evomerge.executors.base import EvalJob, EvalOutcome, Executor
from evomerge.executors.worker import MergeEvalWorker, WorkerSpec
from evomerge.fitness.result import EvalResult
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.search.population import Member, PairPlan, PairResult, PopulationConfig, pair_key

BASE_KEY = "base"
SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY, member TEXT, generation INTEGER, pair TEXT, recipe TEXT NOT NULL, genome TEXT, x0 TEXT,
    score REAL NOT NULL, ok INTEGER NOT NULL, tasks TEXT NOT NULL, error TEXT, split TEXT NOT NULL,
    seconds REAL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, payload TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members (key TEXT PRIMARY KEY, generation INTEGER NOT NULL, parents TEXT NOT NULL,
    candidate_id INTEGER, score REAL NOT NULL, recipe TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS kinship (a TEXT NOT NULL, b TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
    source TEXT NOT NULL, PRIMARY KEY (a, b, metric));
CREATE TABLE IF NOT EXISTS test_scores (candidate_id INTEGER NOT NULL, split TEXT NOT NULL, score REAL NOT NULL,
    tasks TEXT NOT NULL, PRIMARY KEY (candidate_id, split));
"""


# ------------------------------------------------------------------------------------------------- store


class PopulationStore:
    """Append-only SQLite store of a population run (one writer; readers may open it concurrently)."""

    FILE = "population.sqlite"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            version = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if version is None:
                cols = {r[1] for r in self._db.execute("PRAGMA table_info(candidates)")}
                if "x0" not in cols:
                    version = ("0",)  # an early development store
                else:
                    self._db.execute("INSERT INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            if version is not None and version[0] != SCHEMA_VERSION:
                self._db.close()
                raise RunDirError(f"{self.path}: population store of schema {version[0]}, this evomerge reads "
                                  f"schema {SCHEMA_VERSION}; use a new run directory")
        except sqlite3.DatabaseError as exc:
            raise RunDirError(f"{self.path}: not a usable population store ({exc})") from None
        self._lock = threading.Lock()

    @staticmethod
    def open_readonly(path: str | os.PathLike[str]) -> PopulationStore:
        p = Path(path)
        if not p.is_file():
            raise RunDirError(f"{p}: no population store here")
        return PopulationStore(p)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # meta ----------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # candidates ----------------------------------------------------------------------------------------
    def add_candidate(self, recipe: Recipe, result: EvalResult, *, member: str | None = None,
                      generation: int | None = None, pair: tuple[str, str] | None = None,
                      genome: Sequence[float] | None = None, x0: Sequence[float] | None = None) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO candidates(member, generation, pair, recipe, genome, x0, score, ok, tasks, error, split,"
                " seconds, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (member, generation, None if pair is None else f"{pair[0]}|{pair[1]}", json.dumps(recipe.to_dict()),
                 None if genome is None else json.dumps([float(v) for v in genome]),
                 None if x0 is None else json.dumps([float(v) for v in x0]), float(result.aggregate),
                 int(result.ok), json.dumps(result.task_values()), result.error, result.split, result.seconds,
                 time.time()))
            return int(cur.lastrowid or 0)

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0])

    def candidates(self, pair: tuple[str, str] | None = None, generation: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id, member, generation, pair, recipe, genome, score, ok, tasks, error, x0 FROM candidates"
        args: list[Any] = []
        if pair is not None:
            sql += " WHERE pair=? AND generation=?"
            args = [f"{pair[0]}|{pair[1]}", generation]
        sql += " ORDER BY id"
        out = []
        for r in self._db.execute(sql, args):
            out.append({"id": r[0], "member": r[1], "generation": r[2], "pair": r[3], "recipe": json.loads(r[4]),
                        "genome": None if r[5] is None else json.loads(r[5]), "score": r[6], "ok": bool(r[7]),
                        "tasks": json.loads(r[8]), "error": r[9], "x0": None if r[10] is None else json.loads(r[10])})
        return out

    def add_test_score(self, candidate_id: int, result: EvalResult) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO test_scores(candidate_id, split, score, tasks) VALUES (?,?,?,?)",
                       (candidate_id, result.split, float(result.aggregate), json.dumps(result.task_values())))

    def test_scores(self) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for cid, split, score, tasks in self._db.execute("SELECT candidate_id, split, score, tasks FROM test_scores"):
            out.setdefault(int(cid), {})[split] = {"score": score, "tasks": json.loads(tasks)}
        return out

    # events --------------------------------------------------------------------------------------------
    def add_event(self, kind: str, payload: Mapping[str, Any]) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO events(kind, payload, created) VALUES (?,?,?)",
                       (kind, json.dumps(payload, default=_json_default), time.time()))

    def events(self) -> list[dict[str, Any]]:
        return [{"kind": k, "payload": json.loads(p), "created": c}
                for k, p, c in self._db.execute("SELECT kind, payload, created FROM events ORDER BY id")]

    # members -------------------------------------------------------------------------------------------
    def add_member(self, member: Member, recipe: Recipe) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO members(key, generation, parents, candidate_id, score, recipe) "
                       "VALUES (?,?,?,?,?,?)", (member.key, member.generation, json.dumps(list(member.parents)),
                                                member.candidate_id, member.score, json.dumps(recipe.to_dict())))

    def members(self) -> list[tuple[Member, Recipe]]:
        out = []
        for key, gen, parents, cid, score, recipe in self._db.execute(
                "SELECT key, generation, parents, candidate_id, score, recipe FROM members ORDER BY rowid"):
            out.append((Member(key, float(score), int(gen), tuple(json.loads(parents)), cid),
                        Recipe.from_dict(json.loads(recipe))))
        return out

    # kinship -------------------------------------------------------------------------------------------
    def get_kinship(self, a: str, b: str, metric: str) -> float | None:
        a, b = pair_key(a, b)
        row = self._db.execute("SELECT value FROM kinship WHERE a=? AND b=? AND metric=?", (a, b, metric)).fetchone()
        if row is None:
            return None
        return math.nan if row[0] is None else float(row[0])

    def put_kinship(self, a: str, b: str, metric: str, value: float, source: str) -> None:
        a, b = pair_key(a, b)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO kinship(a, b, metric, value, source) VALUES (?,?,?,?,?)",
                       (a, b, metric, value if math.isfinite(value) else None, source))

    def kinship_table(self, metric: str | None = None) -> dict[tuple[str, str, str], float]:
        out = {}
        for a, b, m, v in self._db.execute("SELECT a, b, metric, value FROM kinship"):
            if metric is None or m == metric:
                out[(a, b, m)] = math.nan if v is None else float(v)
        return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)


# ------------------------------------------------------------------------------------------------- worker


def PopulationWorker(base: str | os.PathLike[str], models: Mapping[str, str | os.PathLike[str]], spec: Any,  # noqa: N802
                     device: str = "cpu", max_extra: int = 4,
                     splits: tuple[str, ...] = ("search",)) -> MergeEvalWorker:
    """A :class:`~evomerge.executors.worker.MergeEvalWorker` over base + originals (keyword shortcut)."""
    return MergeEvalWorker(WorkerSpec(base=str(base), models={k: str(v) for k, v in models.items()}, fitness=spec,
                                      device=device, splits=splits, max_extra=max_extra))


def evaluate_jobs(executor: Executor, jobs: Sequence[EvalJob]) -> list[EvalOutcome]:
    """Submit ``jobs`` (at most ``capacity`` in flight) and return their outcomes in job order."""
    out: dict[int, EvalOutcome] = {}
    queue = list(jobs)
    while queue or executor.pending():
        while queue and executor.pending() < max(1, executor.capacity):
            executor.submit(queue.pop(0))
        for o in executor.poll(timeout=1.0):
            out[o.job.candidate_id] = o
    return [out[j.candidate_id] for j in jobs]


# ------------------------------------------------------------------------------------------------- parents


class ParentCache:
    """Merged parents materialized on disk under ``root`` on demand; least recently used evicted beyond
    ``max_bytes`` (never the ones needed now). A recipe is deterministic, so an evicted parent is rebuilt."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._used: OrderedDict[str, int] = OrderedDict()
        for d in sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime):
            if d.is_dir() and (d / "config.json").is_file():
                self._used[d.name] = _dir_bytes(d)
        self.materialized = 0

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str, recipe_of: Callable[[str], Recipe], path_of: Callable[[str], str],
            keep: Sequence[str] = ()) -> Path:
        """The folder of merged model ``key`` (built from ``recipe_of(key)`` whose inputs ``path_of`` resolves)."""
        from evomerge.merge.engine import merge_to_disk

        target = self.path(key)
        if key in self._used and (target / "config.json").is_file():
            self._used.move_to_end(key)
            return target
        recipe = recipe_of(key)
        concrete = dataclasses.replace(
            recipe, base_model=path_of(recipe.base_model) if recipe.base_model else None,
            models=tuple(ModelEntry(path_of(m.model), m.parameters) for m in recipe.models), dtype="float32")
        merge_to_disk(concrete, target, overwrite=True, progress=False)
        self.materialized += 1
        self._used[key] = _dir_bytes(target)
        self._evict(set(keep) | {key})
        return target

    def _evict(self, keep: set[str]) -> None:
        total = sum(self._used.values())
        for key in list(self._used):
            if total <= self.max_bytes:
                break
            if key in keep:
                continue
            total -= self._used.pop(key)
            shutil.rmtree(self.path(key), ignore_errors=True)

    @property
    def bytes(self) -> int:
        return sum(self._used.values())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class PairSpace:
    """The genome of one pair merge: ``points`` per-layer weights per parent in [lower, upper]."""

    points: int = 2
    lower: float = 0.0
    upper: float = 1.5
    # The fixed recipe (budget 0) and the search's starting point: a number (the same weight for both parents) or
    # "kinship": w = 1 / (1 + max(0, cos(τ_A, τ_B))) for both, i.e. the sum of unrelated task vectors
    # (cos 0 -> w = 1) and the mean of identical ones (cos 1 -> w = 0.5), smoothly in between.
    init: float | str = "kinship"
    optimizer: str = "CMA"
    method: str = "task_arithmetic"
    sigma: float = 0.25

    @property
    def dims(self) -> int:
        return 2 * self.points

    def __post_init__(self) -> None:
        if isinstance(self.init, str) and self.init != "kinship":
            raise ConfigError(f"pair init: a weight or 'kinship', got {self.init!r}")
        if self.points < 1 or not self.lower < self.upper:
            raise ConfigError(f"pair space: points >= 1 and lower < upper (got {self.points}, {self.lower}, "
                              f"{self.upper})")

    def x0(self, cos: float | None = None) -> np.ndarray:
        """The starting genome; with ``init: kinship`` it needs the parents' cosine kinship."""
        if self.init == "kinship":
            c = 0.0 if cos is None or not math.isfinite(cos) else max(0.0, min(1.0, cos))
            w = 1.0 / (1.0 + c)
        else:
            w = float(self.init)
        return np.clip(np.full(self.dims, w), self.lower, self.upper)

    def recipe(self, a: str, b: str, x: Sequence[float], seed: int = 0) -> Recipe:
        p = self.points
        wa = ParamValue.per_layer([float(v) for v in x[:p]]) if p > 1 else ParamValue.constant(float(x[0]))
        wb = ParamValue.per_layer([float(v) for v in x[p:]]) if p > 1 else ParamValue.constant(float(x[p]))
        return Recipe(self.method, (ModelEntry(a, {"weight": wa}), ModelEntry(b, {"weight": wb})),
                      base_model=BASE_KEY, seed=seed)


def make_optimizer(name: str, x0: np.ndarray, lower: float, upper: float, sigma: float, budget: int,
                   seed: int) -> Any:
    """A seeded nevergrad optimizer over a bounded array starting at ``x0`` (no global RNG involved)."""
    import warnings

    import nevergrad as ng

    if name not in ng.optimizers.registry:
        raise ConfigError(f"unknown nevergrad optimizer {name!r} (e.g. CMA, NGOpt, DE, TwoPointsDE, OnePlusOne)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "bounds are k sigma away": intended for small per-pair budgets
        param = ng.p.Array(init=np.asarray(x0, float)).set_bounds(lower, upper)
        param.set_mutation(sigma=sigma)
    param.random_state = np.random.RandomState(seed)
    return ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=1)


def _seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")


class LocalBackend:
    """:class:`~evomerge.search.population.PopulationBackend` over an Executor, a store and a parent cache."""

    def __init__(self, store: PopulationStore, executor: Executor, *, base: str, originals: Mapping[str, str],
                 cfg: PopulationConfig, space: PairSpace, cache_dir: str | os.PathLike[str], seed: int = 0,
                 log: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.executor = executor
        self.base = str(base)
        self.original_paths = {k: str(v) for k, v in originals.items()}
        self.cfg = cfg
        self.space = space
        self.seed = seed
        self.cache = ParentCache(cache_dir, cfg.cache_disk_bytes)
        self._log = log or (lambda msg: None)
        self._recipes: dict[str, Recipe] = {}
        self._members: dict[str, Member] = {}
        for m, r in store.members():
            self._recipes[m.key] = r
            self._members[m.key] = m
        self._gram: Any = None
        self._forms: dict[str, Any] = {}
        self._layer_map: Any = None
        self._next_id = store.count() + 1
        self._plans: dict[int, list[PairPlan]] = {}

    # -------------------------------------------------------------------------------------------- members
    def originals(self) -> list[Member]:
        """Score each original once (recorded as a generation-0 candidate and member)."""
        out = []
        todo = [k for k in self.original_paths if k not in self._members]
        jobs = []
        for key in todo:
            recipe = Recipe("linear", (ModelEntry(key),))
            jobs.append(EvalJob(self._claim_id(), recipe))
        for job, outcome in zip(jobs, evaluate_jobs(self.executor, jobs)):
            key = job.recipe.models[0].model
            cid = self.store.add_candidate(job.recipe, outcome.result, member=key, generation=0)
            member = Member(key, float(outcome.result.aggregate), 0, (), cid, outcome.result.ok)
            self.store.add_member(member, job.recipe)
            self._members[key] = member
            self._recipes[key] = job.recipe
            self._log(f"original {key}: {outcome.result.aggregate:.4f}")
        for key in self.original_paths:
            out.append(self._members[key])
        return out

    def _claim_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def evaluations(self) -> int:
        return self.store.count()

    def events(self) -> list[dict[str, Any]]:
        return self.store.events()

    def record_event(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.store.add_event(kind, payload)
        if kind == "generation_plan":
            self._plans[int(payload["generation"])] = [PairPlan.from_dict(d) for d in payload["plans"]]

    # -------------------------------------------------------------------------------------------- kinship
    def _ensure_gram(self) -> None:
        if self._gram is not None:
            return
        from evomerge.kinship import kinship_matrix
        from evomerge.models import LayerMap, ModelFolder

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
                if any(v is None for v in parents.values()):
                    form = None
                else:
                    form = linear_form(recipe, self._gram, parents, BASE_KEY, self._layer_map)
        self._forms[key] = form
        return form

    def kinship(self, a: str, b: str) -> float:
        """Kinship in the configured metric (cached in the store)."""
        return self._kinship(a, b, self.cfg.metric)

    def cosine(self, a: str, b: str) -> float:
        """Signed cosine of the task vectors (the kinship-based starting weights use it)."""
        return self._kinship(a, b, "cos")

    def _kinship(self, a: str, b: str, metric: str) -> float:
        cached = self.store.get_kinship(a, b, metric)
        if cached is not None:
            return cached
        fa, fb = self._form(a), self._form(b)
        if fa is not None and fb is not None:
            value, source = self._gram.value(fa, fb, metric), "recipe algebra"
        else:
            from evomerge.kinship import kinship as direct

            value = direct(self._path(a), self._path(b), self.base, metric)
            source = "materialized"
        self.store.put_kinship(a, b, metric, value, source)
        return value

    def _path(self, key: str, keep: Sequence[str] = ()) -> str:
        if key == BASE_KEY:
            return self.base
        if key in self.original_paths:
            return self.original_paths[key]
        recipe = self._recipes[key]
        if recipe.method == "linear" and len(recipe.models) == 1 and recipe.models[0].model in self.original_paths:
            return self.original_paths[recipe.models[0].model]
        return str(self.cache.get(key, self._recipes.__getitem__, lambda k: self._path(k, keep), keep=keep))

    # -------------------------------------------------------------------------------------------- pairs
    def _child_key(self, plan: PairPlan, generation: int) -> str:
        plans = self._plans.get(generation)
        if plans is None:
            for e in reversed(self.store.events()):
                if e["kind"] == "generation_plan" and int(e["payload"]["generation"]) == generation:
                    plans = [PairPlan.from_dict(d) for d in e["payload"]["plans"]]
                    self._plans[generation] = plans
                    break
        idx = next((i for i, p in enumerate(plans or []) if p.key == plan.key), None)
        if idx is None:
            raise RunDirError(f"pair {plan.key} is not in the recorded plan of generation {generation}")
        return f"g{generation}.{idx + 1}"

    def _warm_genome(self, generation: int, x0: np.ndarray) -> np.ndarray | None:
        """Warm start: the best genome of the pair searches of EARLIER generations, as a per-gene ratio to that
        pair's starting point applied to this pair's ``x0`` (parents deeper in the tree start from other weights).

        Earlier generations only, so the warm start of a pair does not depend on the order pairs of the same
        generation ran in, nor on a resume. Genomes are oriented: better parent first.
        """
        best = None
        for c in self.store.candidates():
            if c["genome"] is None or not c["ok"] or c["generation"] in (None, 0) or c["generation"] >= generation:
                continue
            if best is None or c["score"] > best["score"]:
                best = c
        if best is None or best["x0"] is None or len(best["genome"]) != len(x0):
            return None
        ratio = np.asarray(best["genome"], float) / np.maximum(np.asarray(best["x0"], float), 1e-6)
        return np.clip(x0 * ratio, self.space.lower, self.space.upper)

    def run_pair(self, plan: PairPlan, generation: int, budget: int) -> PairResult:

        ma, mb = self._members[plan.a], self._members[plan.b]
        a, b = (plan.a, plan.b) if (ma.score, plan.b) >= (mb.score, plan.a) else (plan.b, plan.a)
        key = self._child_key(plan, generation)
        pk = (a, b)
        done = self.store.candidates(pair=pk, generation=generation)
        extra = {k: self._path(k, keep=[a, b]) for k in (a, b) if k not in self.original_paths}
        seed = _seed_of(self.seed, generation, a, b)
        n = max(1, budget)
        space = self.space

        def evaluate(x: np.ndarray) -> dict[str, Any]:
            recipe = space.recipe(a, b, x, seed)
            job = EvalJob(self._claim_id(), recipe, extra_models=extra)
            outcome = evaluate_jobs(self.executor, [job])[0]
            cid = self.store.add_candidate(recipe, outcome.result, generation=generation, pair=pk, genome=x, x0=x0)
            return {"id": cid, "score": float(outcome.result.aggregate), "ok": outcome.result.ok,
                    "genome": list(map(float, x)), "recipe": recipe.to_dict()}

        self.kinship(a, b)  # cached for the report's gain-vs-kinship plot
        x0 = space.x0(self.cosine(a, b) if space.init == "kinship" else None)
        warm = self._warm_genome(generation, x0)
        results = list(done)
        if budget <= 0:
            if not results:
                results.append(evaluate(x0))
        else:
            opt = make_optimizer(space.optimizer, x0, space.lower, space.upper, space.sigma, n, seed)
            suggestions = [x0]
            if warm is not None and len(warm) == space.dims and not np.allclose(warm, x0):
                suggestions.append(warm)
            for s in reversed(suggestions):  # LIFO: x0 is asked first
                opt.suggest(s)
            for i in range(n):
                if i < len(done):
                    cand = opt.ask()
                    stored = np.asarray(done[i]["genome"], float)
                    if not np.allclose(cand.value, stored):
                        cand = opt.parametrization.spawn_child(new_value=stored)
                    opt.tell(cand, -float(done[i]["score"]))
                    continue
                cand = opt.ask()
                r = evaluate(np.asarray(cand.value, float))
                results.append(r)
                opt.tell(cand, -r["score"])
        best = max(results, key=lambda r: (r["ok"], r["score"], -r["id"]))
        recipe = Recipe.from_dict(best["recipe"])
        child = Member(key, float(best["score"]), generation, (a, b), int(best["id"]), bool(best["ok"]))
        self._recipes[key] = recipe
        self._members[key] = child
        self.store.add_member(child, recipe)
        self._log(f"  g{generation} {plan.reason:<11} {a} x {b} -> {key} {child.score:.4f} "
                  f"({len(results)} evaluations, best #{child.candidate_id})")
        return PairResult(child, len(results) - len(done))

    def model_path(self, key: str) -> str:
        """A folder holding member ``key`` (an original's own, or its materialized merge)."""
        return self._path(key)

    def recipe_of(self, key: str) -> Recipe:
        return self._recipes[key]

    def flattened_recipe(self, key: str) -> Recipe:
        """The member's recipe with merged parents replaced by their materialized folders (for export)."""
        recipe = self._recipes[key]
        return dataclasses.replace(recipe, models=tuple(
            ModelEntry(self._path(m.model), m.parameters) for m in recipe.models), base_model=self.base
            if recipe.base_model else None)


# ------------------------------------------------------------------------------------------------- entry


def run_population(
    run_dir: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str],
    originals: Mapping[str, str | os.PathLike[str]],
    spec: Any,
    cfg: PopulationConfig,
    budget: int,
    space: PairSpace | None = None,
    seed: int = 0,
    device: str = "cpu",
    executor: Executor | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Any, LocalBackend]:
    """Run (or resume) a population search in ``run_dir``; returns (PopulationOutcome, backend).

    The run's settings are fingerprinted into the store: resuming with different settings is refused.
    """
    from evomerge.executors.base import InProcessExecutor
    from evomerge.search.population import PopulationManager

    space = space or PairSpace()
    run = Path(run_dir)
    store = PopulationStore(run / PopulationStore.FILE)
    settings = {"base": str(base), "originals": {k: str(v) for k, v in originals.items()},
                "population": dataclasses.asdict(cfg), "pair_space": dataclasses.asdict(space), "budget": budget,
                "seed": seed}
    fingerprint = json.dumps(settings, sort_keys=True, default=str)
    old = store.get_meta("settings")
    if old is None:
        store.set_meta("settings", fingerprint)
    elif old != fingerprint:
        was, now = json.loads(old), json.loads(fingerprint)
        diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        store.close()
        raise RunDirError(f"{run}: this run was started with other settings (differs in {diff}); "
                          f"use a new run directory")
    own_executor = executor is None
    if executor is None:
        executor = InProcessExecutor(
            lambda: PopulationWorker(base, originals, spec, device, max_extra=cfg.cache_memory_models),
            penalty=getattr(spec, "effective_penalty", -1e6))
    backend = LocalBackend(store, executor, base=str(base), originals={k: str(v) for k, v in originals.items()},
                           cfg=cfg, space=space, cache_dir=run / "parents", seed=seed, log=log)
    try:
        outcome = PopulationManager(backend, cfg, budget, log=log).run()
    finally:
        if own_executor:
            executor.close()
    return outcome, backend
