"""Model-free workers for search tests: scores are functions of the recipe's numbers, so loop, dispatcher and
population tests run hundreds of candidates in a second (the real merge+evaluate path is covered by the
micro-zoo tests)."""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.executors.base import EvalJob, EvalOutcome
from evomerge.fitness.items import ItemList, ItemScores
from evomerge.fitness.racing import plan_race, run_race
from evomerge.fitness.result import EvalResult, TaskScore


def recipe_values(recipe: Any) -> list[float]:
    """Every number of a recipe's per-model parameters, in order."""
    return [float(v) for m in recipe.models for pv in m.parameters.values() for e in pv.entries for v in e.values]


class RecipeScoreWorker:
    """A smooth score of the recipe's numbers (peak at 0.7), failures and lost workers on request."""

    def __init__(self, fail_ids: set[int] = frozenset(), lose_once: set[int] = frozenset()) -> None:
        self.fail_ids = set(fail_ids)
        self.lose_once = set(lose_once)
        self.calls: list[tuple[int, int]] = []

    def evaluate(self, job: Any) -> Any:
        self.calls.append((job.candidate_id, job.attempt))
        if job.candidate_id in self.lose_once and job.attempt == 0:
            return EvalOutcome(job=job, result=EvalResult.failure("worker died", -1.0), worker="w0", lost=True)
        if job.candidate_id in self.fail_ids:
            return EvalOutcome(job=job, result=EvalResult.failure("boom", -1.0), worker="w0")
        values = recipe_values(job.recipe)
        score = 1.0 - sum((v - 0.7) ** 2 for v in values) / max(1, len(values))
        task = TaskScore("fake", "score", score)
        return EvalOutcome(job=job, result=EvalResult(aggregate=score, tasks=(task,)), worker="w0",
                           eval_seconds=0.001)


class ItemScoreWorker(RecipeScoreWorker):
    """Per-item results: item j of task t is solved when ``u(t, j) < p``, where p is the mean of the recipe's
    numbers (clipped to [0, 1]) and u a fixed uniform draw per item; so a higher p solves a superset of a lower
    p's items (paired differences all of one sign). A job with a bar is raced through the real ``plan_race`` /
    ``run_race``, as the merge worker does."""

    TASKS = {"a": 240, "b": 160}

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.u = {t: np.random.default_rng(i).random(n) for i, (t, n) in enumerate(self.TASKS.items())}
        self.scored: list[dict[str, int]] = []  # items scored per call of the score function

    def lists(self) -> dict[str, Any]:
        return {t: ItemList(n, tuple(range(n)), f"content-{t}", True) for t, n in self.TASKS.items()}

    def score(self, p: float, items: Any = None) -> Any:
        tasks, per_item = [], {}
        for t, n in self.TASKS.items():
            idx = list(range(n)) if items is None else sorted(items[t])
            if not idx:
                continue
            solved = [float(self.u[t][j] < p) for j in idx]
            per_item[t] = ItemScores.of(t, idx, solved, [1.0] * len(idx), n, f"content-{t}")
            tasks.append(TaskScore(t, "exact_match", per_item[t].value()))
        self.scored.append({t: len(v.index) for t, v in per_item.items()})
        return EvalResult(aggregate=EvalResult.weighted_aggregate(tuple(tasks)), tasks=tuple(tasks), items=per_item,
                          seconds=0.001)

    def evaluate(self, job: Any) -> Any:
        self.calls.append((job.candidate_id, job.attempt))
        values = recipe_values(job.recipe)
        p = min(1.0, max(0.0, sum(values) / max(1, len(values))))
        if job.race is None:
            res = self.score(p)
        else:
            res = run_race(plan_race(job.race, self.lists()), lambda items: self.score(p, items))
        return EvalOutcome(job=job, result=res, worker="w0", eval_seconds=0.001)


class QueueExecutor:
    """A fake executor with ``capacity`` slots: jobs wait in submission order and each ``poll`` finishes one, the
    one ``pick`` chooses (the oldest unless a subclass says otherwise), as ``finish`` says. Deterministic, so
    tests of the dispatcher and checkpoints can order results as real workers would."""

    def __init__(self, capacity: int = 1) -> None:
        self._capacity = capacity
        self.queue: list[EvalJob] = []
        self.jobs: list[EvalJob] = []  # every job ever submitted

    @property
    def capacity(self) -> int:
        return self._capacity

    def submit(self, job: EvalJob) -> None:
        self.queue.append(job)
        self.jobs.append(job)

    def pending(self) -> int:
        return len(self.queue)

    def pick(self) -> int:
        """Index in ``queue`` of the job the next poll finishes."""
        return 0

    def finish(self, job: EvalJob) -> EvalOutcome:
        raise NotImplementedError

    def poll(self, timeout: float | None = None) -> list[EvalOutcome]:
        if not self.queue:
            return []
        return [self.finish(self.queue.pop(self.pick()))]

    def close(self) -> None:
        self.queue.clear()
