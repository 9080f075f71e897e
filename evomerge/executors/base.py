"""The executor protocol: the search submits jobs and collects outcomes as they finish, nothing more.

The search loop keeps ``capacity`` jobs in flight and never waits for a whole batch, so an executor
that runs on one process, several GPUs or a Ray cluster plugs in without touching the search.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from evomerge.fitness.racing import RaceBar
from evomerge.fitness.result import EvalResult
from evomerge.merge.recipe import Recipe


@dataclass(frozen=True)
class EvalJob:
    """One candidate to merge and score. ``extra_models`` maps keys of materialized merged parents
    (population manager) to their folders, beyond the models the worker was built with; ``model_tasks`` names
    the fitness tasks each of them stands for (for calibration rows); ``race``: evaluate in racing stages
    against this bar, stopping early when the candidate cannot beat it (see :mod:`evomerge.fitness.racing`)."""

    candidate_id: int
    recipe: Recipe
    split: str = "search"
    attempt: int = 0
    extra_models: Mapping[str, str] = field(default_factory=dict)
    # fitness tasks whose rows stand for a merged model in data-aware merges (qp, apl): its originals' tasks
    model_tasks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    race: RaceBar | None = None


@dataclass(frozen=True)
class EvalOutcome:
    job: EvalJob
    result: EvalResult
    worker: str = "local"
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    lost: bool = False  # the worker died or timed out: the job may be re-queued by the caller


@runtime_checkable
class Worker(Protocol):
    """Owns a resident model: merges a job's recipe into it in place, scores it, never raises."""

    def evaluate(self, job: EvalJob) -> EvalOutcome: ...


@runtime_checkable
class Executor(Protocol):
    @property
    def capacity(self) -> int:
        """How many jobs can run at once; the search keeps this many in flight."""
        ...

    def submit(self, job: EvalJob) -> None: ...

    def poll(self, timeout: float | None = None) -> list[EvalOutcome]:
        """Outcomes finished since the last call; blocks up to ``timeout`` for at least one if any is pending."""
        ...

    def pending(self) -> int: ...

    def close(self) -> None: ...


class InProcessExecutor:
    """Runs jobs one by one in this process (the default for ``workers: 1``)."""

    def __init__(self, worker_factory: Callable[[], Worker], penalty: float = -1e6) -> None:
        self._factory = worker_factory
        self._worker: Worker | None = None
        self._queue: deque[EvalJob] = deque()
        self._penalty = penalty

    @property
    def capacity(self) -> int:
        return 1

    def submit(self, job: EvalJob) -> None:
        self._queue.append(job)

    def pending(self) -> int:
        return len(self._queue)

    def poll(self, timeout: float | None = None) -> list[EvalOutcome]:
        if not self._queue:
            return []
        job = self._queue.popleft()
        if self._worker is None:
            self._worker = self._factory()
        start = time.perf_counter()
        try:
            return [self._worker.evaluate(job)]
        except Exception as exc:  # a worker must not raise, but one bad candidate never stops a search
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
            result = EvalResult.failure(error, self._penalty, job.split, time.perf_counter() - start)
            return [EvalOutcome(job=job, result=result, worker="local")]

    def close(self) -> None:
        self._worker = None
        self._queue.clear()
