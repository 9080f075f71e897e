"""The worker that merges and scores candidates, the same in-process and inside a Ray actor.

A :class:`WorkerSpec` holds only paths and settings (small, picklable); :class:`MergeEvalWorker` builds from it
once, on its own device: a resident merger (base + task vectors), one live model that every candidate is merged
into in place, and an evaluator with its tasks prepared. Weights never cross a process boundary.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.executors.base import EvalJob, EvalOutcome
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.racing import NotRaceable, plan_race, run_race
from evomerge.fitness.result import EvalResult
from evomerge.killpoints import kill_point
from evomerge.merge.engines.resident import ResidentMerger
from evomerge.merge.engines.tiers import plan_resident
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.method_data import MethodDataProvider

FULL_RELEASE_EVERY = 25  # candidates between full garbage collections (see MergeEvalWorker._release)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as paths and plain data (it travels to Ray actors)."""

    base: str
    models: Mapping[str, str]
    fitness: Any  # FitnessSpec (a pydantic model: picklable)
    device: str = "cpu"
    dtype: str = "float32"
    splits: tuple[str, ...] = ("search",)
    max_extra: int = 4  # materialized merged parents kept resident (population manager)
    threads: int | None = None  # torch threads in this worker, from its CPU allotment (None: the CPUs it may use)
    vocab_policy: str = "refuse"  # models with larger vocabularies: refuse, or slice_to_base (the search space's)
    extra: Mapping[str, Any] = field(default_factory=dict)
    resident: str = "auto"  # memory tier of the resident store (device | cpu | disk | auto: the plan decides)
    methods: tuple[str, ...] = ()  # methods candidates may use (the memory plan counts their calibration)
    pair_models: int | None = None  # inputs of a population pair merge (the plan's calibration count)
    host_workers: int = 1  # workers sharing this machine's host memory (the plan divides it among them)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the machine's count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class MergeEvalWorker:
    """Resident merger + resident model + evaluator (the :class:`~evomerge.executors.base.Worker` protocol).

    Merged parents named in ``EvalJob.extra_models`` are loaded on demand and kept resident, at most
    ``spec.max_extra`` of them (least recently used evicted first).
    """

    def __init__(self, spec: WorkerSpec, name: str = "local") -> None:
        # the thread count is always set, from the allotment: an inherited one oversubscribes shared cores
        self.threads = int(spec.threads or available_cpus())
        torch.set_num_threads(self.threads)
        self.spec = spec
        self.name = name
        self.plan = plan_resident(spec.base, {k: str(v) for k, v in spec.models.items()}, device=spec.device,
                                  dtype=spec.dtype, resident=spec.resident, workers=spec.host_workers,
                                  methods=spec.methods, pair_models=spec.pair_models,
                                  eval_batch=int(getattr(spec.fitness, "batch_size", 32) or 32))
        self.tier = self.plan.require_fit(f"worker {name}: resident")
        self.merger = ResidentMerger(spec.base, {k: str(v) for k, v in spec.models.items()}, device=spec.device,
                                     dtype=spec.dtype, base_key=BASE_KEY, vocab_policy=spec.vocab_policy,
                                     resident=self.tier)
        if any(c.method == "qp" and c.grams_mode == "layer" for c in self.plan.calibration):
            self.merger.gram_mode = "layer"  # all layers' Grams do not fit next to the store
        self.model = self.merger.new_model()
        self.evaluator = Evaluator(spec.fitness, str(spec.base), spec.device, splits=spec.splits)
        self.method_data = MethodDataProvider(spec.fitness, spec.base, tokenizer=self.evaluator.tokenizer,
                                              device=spec.device, base_scorer=self._score_base)
        self.originals = set(spec.models)
        self._extra: OrderedDict[str, str] = OrderedDict()
        self.evaluations = 0
        # everything built so far (torch, transformers, lm-eval, tasks) lives as long as the worker: move it out
        # of the collector's view, so the periodic full collections only walk what candidates allocate
        gc.collect()
        gc.freeze()

    def _ensure(self, extra: Mapping[str, str], needed: Sequence[str]) -> None:
        wanted = [k for k in needed if k not in self.originals and k != BASE_KEY]
        for key in wanted:
            if key in self._extra:
                self._extra.move_to_end(key)
        for key in wanted:
            if key in self._extra and (key not in extra or self._extra[key] == str(extra[key])):
                continue
            if key in self._extra:  # the same member key in another run's folder (a worker reused across runs)
                self.merger.remove_model(key)
                del self._extra[key]
            if key not in extra:
                raise ConfigError(f"recipe model {key!r} is neither an original model nor a materialized parent")
            for old in [k for k in self._extra if k not in wanted]:
                if len(self._extra) < self.spec.max_extra:
                    break
                self.merger.remove_model(old)
                del self._extra[old]
            self.merger.add_model(key, extra[key])
            self._extra[key] = str(extra[key])

    def evaluate(self, job: EvalJob) -> EvalOutcome:
        """Merge ``job.recipe`` into the resident model and score it; a bad candidate is a recorded failure."""
        t0 = time.perf_counter()
        try:
            self._ensure(job.extra_models, [m.model for m in job.recipe.models])
            self._method_data(job.recipe, job.model_tasks)
            self.merger.apply(job.recipe, into=self.model)
        except Exception as exc:  # noqa: BLE001 - a bad candidate never stops the search
            res = EvalResult.failure(f"{type(exc).__name__}: {exc}", self.evaluator.spec.effective_penalty,
                                     job.split, time.perf_counter() - t0)
            return EvalOutcome(job=job, result=res, worker=self.name, merge_seconds=time.perf_counter() - t0)
        t1 = time.perf_counter()
        kill_point("evaluate")
        res = self._score(job)
        t2 = time.perf_counter()
        diagnostics = self.merger.last_diagnostics(job.recipe)
        if diagnostics:
            res = dataclasses.replace(res, settings={**res.settings, **diagnostics})
        self.evaluations += 1
        self._release(full=not res.ok or self.evaluations % FULL_RELEASE_EVERY == 0)
        return EvalOutcome(job=job, result=res, worker=self.name, merge_seconds=t1 - t0, eval_seconds=t2 - t1)

    def _score(self, job: EvalJob) -> EvalResult:
        """Score the merged model: on every item, or in racing stages when the job carries a bar (all stages
        here, on the model merged once; a job that cannot be raced is scored on every item, with the reason)."""
        if job.race is None:
            return self.evaluator.score(self.model, job.split)
        try:
            plan = plan_race(job.race, self.evaluator.item_lists(job.split))
        except NotRaceable as exc:
            res = self.evaluator.score(self.model, job.split)
            return dataclasses.replace(res, settings={**res.settings, "race": {"skipped": str(exc)}})
        try:
            return run_race(plan, lambda items: self.evaluator.score(self.model, job.split, items=items))
        except Exception as exc:  # noqa: BLE001 - a bad candidate never stops the search
            return EvalResult.failure(f"racing: {type(exc).__name__}: {exc}", self.evaluator.spec.effective_penalty,
                                      job.split)

    def _method_data(self, recipe: Recipe, model_tasks: Mapping[str, Sequence[str]] | None = None) -> None:
        """Give a data-aware method (qp, apl: task rows; mergeability_weighted: base scores) the fitness's data,
        through the one provider every caller uses; rows and scores are keyed by the recipe's model keys."""
        data = self.method_data.for_recipe(recipe, model_tasks)
        if data.calibration is not None:
            self.merger.calibration = data.calibration
        if data.base_scores is not None:
            self.merger.base_scores = {**(self.merger.base_scores or {}), **data.base_scores}

    def _score_base(self) -> dict[str, float]:
        """The base model's score per fitness task, measured in the live model (task arithmetic, zero weights)."""
        as_base = Recipe(method="task_arithmetic", base_model=BASE_KEY,
                         models=tuple(ModelEntry(k, {"weight": ParamValue.constant(0.0)}) for k in sorted(self.originals)))
        self.merger.apply(as_base, into=self.model)
        scores = self.evaluator.score(self.model, "search")
        if not scores.ok:
            raise ConfigError(f"scoring the base model for mergeability_weighted failed: {scores.error}")
        return dict(scores.task_values())

    def _release(self, full: bool) -> None:
        """Drop what evaluations left behind so memory stays flat over a long run.

        Every candidate: the young generation (cheap). Every ``FULL_RELEASE_EVERY`` candidates and after a
        failure (an out-of-memory error leaves large frames behind): a full collection and, on GPU, the cached
        blocks. A full collection costs 0.1-0.3 s with transformers and lm-eval loaded, too much per candidate.
        """
        if not full:
            gc.collect(0)
            return
        gc.collect()
        if torch.cuda.is_available() and str(self.spec.device).startswith("cuda"):
            torch.cuda.empty_cache()

    def memory_bytes(self) -> dict[str, int]:
        """Resident set of this process and, on GPU, allocated device memory (for leak checks)."""
        out = {"rss": _rss_bytes()}
        if torch.cuda.is_available() and str(self.spec.device).startswith("cuda"):
            out["cuda_allocated"] = int(torch.cuda.memory_allocated())
        return out

    def close(self) -> None:
        self.merger.close()
        self.model = None  # type: ignore[assignment]
        self._release(full=True)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
