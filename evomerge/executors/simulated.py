"""A simulated worker: no model, configurable latency and failures, a smooth fake score.

It lets the scheduler benchmark (and tests) drive the real search loop, executor and archive at scale without
the cost of merging and evaluating: latency, failures and crashes are drawn per job from a seeded generator
(by candidate id and attempt, so runs are reproducible), and the score is a deterministic smooth function of
the recipe's numeric parameters so an optimizer has something to climb.

Settings come from ``WorkerSpec.extra`` (all optional): ``latency_mean`` (seconds, default 2.0),
``latency_cv`` (coefficient of variation of the lognormal latency, default 0.3; 0 = fixed), ``failure_rate``
(failed evaluations recorded with ``penalty``, default 0.0), ``crash_rate`` (the worker process exits hard,
as on an out-of-memory kill, default 0.0), ``penalty`` (default -1e6), ``seed`` (default 0).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping
from typing import Any

from evomerge.executors.base import EvalJob, EvalOutcome
from evomerge.executors.worker import WorkerSpec, _rss_bytes
from evomerge.fitness.result import EvalResult, TaskScore
from evomerge.killpoints import kill_point
from evomerge.merge.recipe import Recipe


def recipe_numbers(recipe: Recipe) -> list[float]:
    """Every numeric parameter of a recipe in a fixed order (per-model first, then global)."""
    out: list[float] = []

    def add(params: Mapping[str, Any]) -> None:
        for key in sorted(params):
            for entry in params[key].entries:
                out.extend(float(v) for v in entry.values)

    for model in recipe.models:
        add(model.parameters)
    add(recipe.parameters)
    return out


def fake_score(recipe: Recipe, seed: int = 0) -> float:
    """A smooth, bounded score in (0, 1] peaking at a seeded target point: 1 / (1 + mean squared distance)."""
    xs = recipe_numbers(recipe)
    if not xs:
        return 0.5
    golden = (math.sqrt(5) - 1) / 2
    targets = [0.25 + 0.5 * ((i + 1 + seed) * golden % 1.0) for i in range(len(xs))]
    msd = sum((x - t) ** 2 for x, t in zip(xs, targets, strict=True)) / len(xs)
    return 1.0 / (1.0 + 4.0 * msd)


class SimulatedWorker:
    """The :class:`~evomerge.executors.base.Worker` protocol without a model (see module docstring)."""

    def __init__(self, spec: WorkerSpec, name: str = "sim") -> None:
        extra = dict(spec.extra)
        self.name = name
        self.latency_mean = float(extra.get("latency_mean", 2.0))
        self.latency_cv = float(extra.get("latency_cv", 0.3))
        self.failure_rate = float(extra.get("failure_rate", 0.0))
        self.crash_rate = float(extra.get("crash_rate", 0.0))
        self.penalty = float(extra.get("penalty", -1e6))
        self.seed = int(extra.get("seed", 0))
        self.evaluations = 0

    def _rng(self, job: EvalJob, what: str) -> random.Random:
        return random.Random(f"{self.seed}:{job.candidate_id}:{job.attempt}:{what}")

    def latency(self, job: EvalJob) -> float:
        """Lognormal latency with the configured mean and coefficient of variation (seeded per job)."""
        rng = self._rng(job, "latency")
        if self.latency_cv <= 0:
            return self.latency_mean
        sigma2 = math.log(1.0 + self.latency_cv**2)
        return rng.lognormvariate(math.log(self.latency_mean) - sigma2 / 2, math.sqrt(sigma2))

    def evaluate(self, job: EvalJob) -> EvalOutcome:
        """Sleep for the job's latency, then crash, fail or return the fake score, as drawn for this job."""
        rng = self._rng(job, "outcome")
        crash, fail = rng.random(), rng.random()
        seconds = self.latency(job)
        kill_point("evaluate")
        time.sleep(seconds)
        self.evaluations += 1
        if crash < self.crash_rate:
            os._exit(137)  # as the out-of-memory killer would: no cleanup, no reply
        if fail < self.failure_rate:
            res = EvalResult.failure("simulated failure", self.penalty, job.split, seconds)
        else:
            value = fake_score(job.recipe, self.seed)
            res = EvalResult(aggregate=value, tasks=(TaskScore("simulated", "score", value),), split=job.split,
                             seconds=seconds)
        return EvalOutcome(job=job, result=res, worker=self.name, eval_seconds=seconds)

    def memory_bytes(self) -> dict[str, int]:
        return {"rss": _rss_bytes()}


def simulated_worker(spec: WorkerSpec, name: str) -> SimulatedWorker:
    """Worker factory for executors (a top-level function, so it pickles by reference into Ray actors)."""
    return SimulatedWorker(spec, name)
