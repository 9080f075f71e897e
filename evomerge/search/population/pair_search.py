"""One parent pair's merge search: the pair genome, its seeded optimizer, and the ask/tell loop over the
evaluation dispatcher.

- :class:`PairSpace`: per-layer weights of the two parents (``points`` values each, interpolated across layers
  as mergekit gradients), merged by a method with a base and per-model weights (task arithmetic by default:
  θ = θ0 + w_A(l) τ_A + w_B(l) τ_B);
- :class:`PairSearch`: a pair's search. Its optimizer is seeded from the run seed, generation and parents
  (:func:`seed_of`); on resume a fresh one asks the same genomes in the same order, and every ask whose recipe
  is archived is told the archived score instead of being evaluated, so an interrupted pair replays itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge.methods.registry import get_method, validate_recipe
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.method_data import with_model_rows
from evomerge.search.archive import CandidateRecord
from evomerge.search.dispatch import Dispatcher, Job
from evomerge.search.optimizer import array_parametrization, build_optimizer
from evomerge.search.population.members import parents_key
from evomerge.search.progress import Timings

MAX_DUPLICATES_IN_A_ROW = 50  # a pair's optimizer keeps proposing archived recipes: its search is over


@dataclasses.dataclass(frozen=True)
class PairSpace:
    """The genome of one pair merge: ``points`` per-layer weights per parent in [lower, upper]. The same genome
    over more parents (``n`` of them) is the joint merge of the starting models (``population.joint``)."""

    points: int = 2
    lower: float = 0.0
    upper: float = 1.5
    # The fixed recipe (budget 0) and the search's starting point: a number (the same weight for both parents) or
    # "kinship": w = 1 / (1 + max(0, cos(τ_A, τ_B))) for both, i.e. the sum of unrelated task vectors
    # (cos 0 -> w = 1) and the mean of identical ones (cos 1 -> w = 0.5), smoothly in between; over n parents
    # w = 1 / (1 + (n - 1) c) with c their mean pairwise max(0, cos) (n identical ones: their mean).
    init: float | str = "kinship"
    optimizer: str = "CMA"
    # how the two parents are merged: any registry method with a base and per-model weights (task_arithmetic,
    # ties, dare_ties, qp, ...); ``parameters`` are further constant per-model parameters (e.g. density),
    # ``options`` the method's options (e.g. qp's basis and sequential)
    method: str = "task_arithmetic"
    sigma: float = 0.25
    parameters: Mapping[str, float] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dims(self) -> int:
        return self.size(2)

    def size(self, n: int) -> int:
        """Genes of a merge of ``n`` parents."""
        return n * self.points

    def __post_init__(self) -> None:
        if isinstance(self.init, str) and self.init != "kinship":
            raise ConfigError(f"pair init: a weight or 'kinship', got {self.init!r}")
        if self.points < 1 or not self.lower < self.upper:
            raise ConfigError(f"pair space: points >= 1 and lower < upper (got {self.points}, {self.lower}, "
                              f"{self.upper})")
        if not isinstance(self.parameters, Mapping) or not isinstance(self.options, Mapping):
            raise ConfigError("pair space: parameters and options must be mappings")
        method = get_method(self.method)  # unknown names: a ConfigError listing the methods
        names = {p.name for p in method.params}
        if not method.needs_base or "weight" not in names:
            raise ConfigError(f"pair method {self.method!r}: a pair merge needs a method with a base model and "
                              "per-model weights (task_arithmetic, ties, dare_ties, breadcrumbs, qp, ...)")
        bad = {k: v for k, v in self.parameters.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise ConfigError(f"pair parameters: numbers expected, got {bad}")
        if "weight" in self.parameters:
            raise ConfigError("pair parameters: 'weight' is the pair genome's; set lower/upper/init instead")
        validate_recipe(self.recipe(("a", "b"), self.x0(0.0)), where=f"pair method {self.method}")

    def x0(self, cos: float | None = None, n: int = 2) -> np.ndarray:
        """The starting genome of ``n`` parents; with ``init: kinship`` it needs their (mean pairwise) cosine
        kinship."""
        if self.init == "kinship":
            c = 0.0 if cos is None or not math.isfinite(cos) else max(0.0, min(1.0, cos))
            w = 1.0 / (1.0 + (n - 1) * c)
        else:
            w = float(self.init)
        return np.clip(np.full(self.size(n), w), self.lower, self.upper)

    def recipe(self, parents: Sequence[str], x: Sequence[float], seed: int = 0) -> Recipe:
        """The merge of ``parents`` with genome ``x`` (``points`` weights per parent, in order)."""
        p = self.points
        if len(x) != self.size(len(parents)):
            raise ValueError(f"pair genome: {len(x)} genes for {len(parents)} parents of {p} point(s) each")
        per_model, shared = self.constants()
        models = []
        for i, key in enumerate(parents):
            genes = [float(v) for v in x[i * p:(i + 1) * p]]
            weight = ParamValue.per_layer(genes) if p > 1 else ParamValue.constant(genes[0])
            models.append(ModelEntry(key, {"weight": weight, **per_model}))
        return Recipe(self.method, tuple(models), base_model=BASE_KEY, parameters=shared, seed=seed,
                      options=dict(self.options))

    def constants(self) -> tuple[dict[str, ParamValue], dict[str, ParamValue]]:
        """``parameters`` as recipe values: (per-model ones, e.g. density; global ones, e.g. qp's ridge), as the
        method declares them."""
        per_model = {p.name for p in get_method(self.method).params if p.per_model}
        values = {k: ParamValue.constant(float(v)) for k, v in self.parameters.items()}
        return ({k: v for k, v in values.items() if k in per_model},
                {k: v for k, v in values.items() if k not in per_model})


@dataclasses.dataclass(frozen=True)
class CrossoverSpace:
    """The genome of a split-point crossover pair (an escape move): ``[boundary, w]`` of a positional two-model
    method (``crossover``: w * A + (1 - w) * B up to the boundary depth, (1 - w) * A + w * B after it)."""

    method: str = "crossover"
    optimizer: str = "CMA"
    start: tuple[float, float] = (0.5, 0.8)  # boundary mid-depth, mostly A before it and mostly B after
    sigma: float = 0.25
    lower: float = 0.0
    upper: float = 1.0
    init: str = "fixed"
    dims: int = 2

    def __post_init__(self) -> None:
        method = get_method(self.method)
        names = {p.name for p in method.params}
        if not method.positional or not {"boundary", "w"} <= names or method.max_models != 2:
            raise ConfigError(f"population.crossover_method {self.method!r}: a crossover pair needs a positional "
                              "two-model method with 'boundary' and 'w' parameters (crossover)")
        validate_recipe(self.recipe(("a", "b"), self.x0()), where=f"crossover method {self.method}")

    def size(self, n: int) -> int:
        return self.dims

    def x0(self, cos: float | None = None, n: int = 2) -> np.ndarray:
        return np.clip(np.asarray(self.start, float), self.lower, self.upper)

    def recipe(self, parents: Sequence[str], x: Sequence[float], seed: int = 0) -> Recipe:
        if len(parents) != 2:
            raise ValueError(f"a crossover merges two parents, got {list(parents)}")
        a, b = parents
        return Recipe(self.method, (ModelEntry(a), ModelEntry(b)),
                      parameters={"boundary": ParamValue.constant(float(x[0])), "w": ParamValue.constant(float(x[1]))},
                      seed=seed)


def pair_optimizer(space: PairSpace | CrossoverSpace, x0: np.ndarray, budget: int, seed: int, num_workers: int = 1,
                   where: str = "population.pair.optimizer") -> Any:
    """A pair's optimizer over the bounded pair genome starting at ``x0`` (seeded; no global RNG involved)."""
    return build_optimizer(space.optimizer, array_parametrization(x0, space.lower, space.upper, space.sigma, seed),
                           budget=budget, num_workers=num_workers, where=where)


def seed_of(*parts: object) -> int:
    """A stable 32-bit seed from ``parts`` (the same pair always starts its optimizer the same way)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")


def warm_start(records: Sequence[CandidateRecord], generation: int, x0: np.ndarray,
               space: PairSpace | CrossoverSpace) -> np.ndarray | None:
    """The best pair genome of EARLIER generations, as a per-gene ratio to its own start, applied to ``x0``.

    Earlier generations only, so a pair's start does not depend on the order pairs of its generation ran
    in, nor on a resume. Genomes are oriented: better parent first. Only genomes of the same method count
    (a crossover's genes are not a pair's weights).
    """
    best: CandidateRecord | None = None
    for r in records:
        if r.genome is None or "x" not in r.genome or not r.ok or not 0 < r.generation < generation:
            continue
        if r.method != space.method:
            continue
        if best is None or r.aggregate > best.aggregate:
            best = r
    if best is None or best.genome is None or len(best.genome["x"]) != len(x0):
        return None
    ratio = np.asarray(best.genome["x"], float) / np.maximum(np.asarray(best.genome["x0"], float), 1e-6)
    return np.clip(x0 * ratio, space.lower, space.upper)


class PairSearch:
    """Pair searches of one session, their evaluations through ``dispatch``.

    ``new_id`` hands out candidate ids; ``check_stop`` raises to end the session between batches (Ctrl-C, wall
    time). Asks are evaluated a batch of ``capacity`` at a time, then told, so a pair's optimizer sees the same
    sequence with any executor of that capacity.
    """

    def __init__(self, space: PairSpace, dispatch: Dispatcher, timings: Timings, new_id: Callable[[], int],
                 check_stop: Callable[[], None], where: str = "population.pair.optimizer") -> None:
        self.space, self.dispatch, self.timings = space, dispatch, timings
        self.new_id, self.check_stop, self.where = new_id, check_stop, where
        # the evaluations of the pair being searched, in order (replayed ones included): only its best becomes a
        # member, so racing may hold a candidate to the best of these too
        self.results: list[CandidateRecord] = []

    def run(self, parents: Sequence[str], generation: int, budget: int, *, seed: int, x0: np.ndarray,
            warm: np.ndarray | None = None, extra_models: Mapping[str, str] | None = None,
            model_tasks: Mapping[str, tuple[str, ...]] | None = None,
            space: PairSpace | CrossoverSpace | None = None,
            rows: Mapping[str, tuple[str, ...]] | None = None, start_seed: int | None = None
            ) -> list[CandidateRecord]:
        """The evaluations of the merge of ``parents`` (a pair: the better first; the joint merge: every starting
        model) in ``generation``: ``budget`` of them (0: the fixed recipe at ``x0``), archived ones of this merge
        replayed and counted, others' answers told but not counted. ``space``: the genome (default: the session's
        pair space; a crossover escape its own). ``rows``: the tasks parents are calibrated on, where they are not
        their own (a data-aware method's competence rows). ``start_seed``: the recipe seed at ``x0`` (a refine starts
        at its member's own recipe, which the archive answers for free; other points take ``seed``)."""
        ps, dispatch = space if space is not None else self.space, self.dispatch
        parents = list(parents)
        pk = parents_key(parents)
        results: list[CandidateRecord] = []
        self.results = results
        counted: set[int] = set()

        def job_of(x: np.ndarray, candidate: Any = None) -> Job:
            at_start = start_seed is not None and np.array_equal(x, x0)
            recipe = with_model_rows(ps.recipe(parents, x, start_seed if at_start else seed), rows or {})
            genome = {"x": [float(v) for v in x], "x0": [float(v) for v in x0]}
            return Job(-1, recipe, recipe.content_hash(), genome, candidate=candidate)

        def mine(rec: CandidateRecord) -> bool:
            return rec.generation == generation and parents_key(rec.parents) == pk and rec.id not in counted

        def submit(job: Job) -> None:
            job.candidate_id = self.new_id()
            dispatch.add(job, parents=parents, generation=generation, extra_models=extra_models,
                         model_tasks=model_tasks)

        def finish() -> dict[int, CandidateRecord]:
            return {f.ticket.candidate_id: f.record for f in dispatch.drain()}

        if budget <= 0:
            job = job_of(x0)
            rec = dispatch.archived(job.recipe_hash)
            if rec is None:
                submit(job)
                rec = finish()[job.candidate_id]
            return [rec]
        opt = pair_optimizer(ps, x0, budget, seed, num_workers=dispatch.capacity, where=self.where)
        suggestions = [x0]
        if warm is not None and len(warm) == len(x0) and not np.allclose(warm, x0):
            suggestions.append(warm)
        for s in reversed(suggestions):  # LIFO: x0 is asked first
            opt.suggest(s)
        in_a_row = 0
        while len(counted) < budget and in_a_row < MAX_DUPLICATES_IN_A_ROW:
            self.check_stop()
            batch: list[Job] = []
            while len(counted) + len(batch) < budget and len(batch) < dispatch.capacity \
                    and in_a_row < MAX_DUPLICATES_IN_A_ROW:
                t0 = time.perf_counter()
                cand = opt.ask()
                job = job_of(np.asarray(cand.value, float), cand)
                self.timings.optimizer += time.perf_counter() - t0
                rec = dispatch.archived(job.recipe_hash)
                if rec is not None:  # the archive answers (a replayed evaluation of this pair counts)
                    opt.tell(cand, -rec.aggregate)
                    if mine(rec):
                        counted.add(rec.id)
                        results.append(rec)
                        in_a_row = 0
                    else:
                        in_a_row += 1
                    continue
                if dispatch.follow(job.recipe_hash, cand):  # asked again while in flight: told its result
                    in_a_row += 1
                    continue
                in_a_row = 0
                submit(job)
                batch.append(job)
            if not batch:
                continue
            records = finish()
            t0 = time.perf_counter()
            for job in batch:
                opt.tell(job.candidate, -records[job.candidate_id].aggregate)
            for job in batch:
                for follower in job.followers:
                    opt.tell(follower, -records[job.candidate_id].aggregate)
            self.timings.optimizer += time.perf_counter() - t0
            for job in batch:
                counted.add(job.candidate_id)
                results.append(records[job.candidate_id])
        return results
