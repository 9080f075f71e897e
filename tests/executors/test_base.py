"""The in-process executor: one job at a time, failures become recorded penalties, never exceptions."""

from __future__ import annotations

from evomerge.executors.base import EvalJob, EvalOutcome, Executor, InProcessExecutor
from evomerge.fitness.result import EvalResult, TaskScore
from evomerge.merge.recipe import Recipe


class SquareWorker:
    def __init__(self) -> None:
        self.calls = 0

    def evaluate(self, job: EvalJob) -> EvalOutcome:
        self.calls += 1
        if job.candidate_id == 13:
            raise RuntimeError("unlucky candidate")
        score = TaskScore("square", "value", float(job.candidate_id) ** 2)
        return EvalOutcome(job=job, result=EvalResult(aggregate=score.value, tasks=(score,)))


def _job(i: int) -> EvalJob:
    return EvalJob(candidate_id=i, recipe=Recipe.from_dict({"method": "linear", "models": ["a"]}))


def test_in_process_executor_runs_in_order_and_survives_a_raising_worker() -> None:
    built: list[SquareWorker] = []

    def factory() -> SquareWorker:
        built.append(SquareWorker())
        return built[-1]

    executor = InProcessExecutor(factory, penalty=-5.0)
    assert isinstance(executor, Executor)
    assert executor.poll() == []
    assert built == []  # the worker is built lazily, once
    for i in (3, 13, 4):
        executor.submit(_job(i))
    assert executor.pending() == 3
    outcomes = [o for _ in range(3) for o in executor.poll()]
    assert [o.job.candidate_id for o in outcomes] == [3, 13, 4]
    assert [o.result.aggregate for o in outcomes] == [9.0, -5.0, 16.0]
    assert outcomes[1].result.ok is False and "unlucky candidate" in (outcomes[1].result.error or "")
    assert len(built) == 1 and built[0].calls == 3
    assert executor.pending() == 0


def test_weighted_aggregate_negates_minimized_metrics() -> None:
    tasks = (TaskScore("acc", "acc", 0.8, True, 3.0), TaskScore("ppl", "ppl", 2.0, False, 1.0))
    assert EvalResult.weighted_aggregate(tasks) == (3 * 0.8 - 2.0) / 4
    result = EvalResult(aggregate=0.1, tasks=tasks)
    assert EvalResult.from_dict(result.to_dict()) == result
