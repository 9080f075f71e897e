"""The evaluation dispatcher on a fake executor: bounded submit/poll, re-queue then success, failure after retries,
de-duplication (archive and in flight), re-scoring the best, archiving rules."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.workers import QueueExecutor

from evomerge.executors.base import EvalJob, EvalOutcome
from evomerge.fitness.result import EvalResult, TaskScore
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.search.archive import Archive
from evomerge.search.dispatch import Dispatcher, Job
from evomerge.search.events import EventKind
from evomerge.search.progress import Timings

PENALTY = -5.0


class FakeExecutor(QueueExecutor):
    """``capacity`` slots; each poll finishes the oldest submitted job. Scores: the recipe's weight (or what
    ``score`` says); ``lost[id]`` losses before a job succeeds (per split), ``nan`` ids score NaN."""

    def __init__(self, capacity: int = 1, lost: dict[int, int] | None = None,
                 score: Callable[[EvalJob], float] | None = None, nan: set[int] = frozenset()) -> None:
        super().__init__(capacity)
        self.lost = dict(lost or {})
        self.score = score or (lambda job: job.recipe.models[0].parameters["weight"].entries[0].values[0])
        self.nan = set(nan)
        self.submitted: list[tuple[int, int, str]] = []
        self.most_outstanding = 0

    def submit(self, job: EvalJob) -> None:
        super().submit(job)
        self.submitted.append((job.candidate_id, job.attempt, job.split))
        self.most_outstanding = max(self.most_outstanding, len(self.queue))

    def finish(self, job: EvalJob) -> EvalOutcome:
        key = job.candidate_id if job.split == "search" else -job.candidate_id
        if self.lost.get(key, 0) > 0:
            self.lost[key] -= 1
            return EvalOutcome(job, EvalResult.failure("worker died", -1.0, job.split), worker="w1", lost=True)
        value = math.nan if job.candidate_id in self.nan else float(self.score(job))
        result = EvalResult(aggregate=value, tasks=(TaskScore("t", "score", value),), split=job.split,
                            settings={"limit": 3})
        return EvalOutcome(job, result, worker="w0", merge_seconds=0.5, eval_seconds=2.0)


def _recipe(w: float) -> Recipe:
    return Recipe("linear", (ModelEntry("a", {"weight": ParamValue.constant(w)}), ModelEntry("b")))


def _job(cid: int, w: float) -> Job:
    r = _recipe(w)
    return Job(cid, r, r.content_hash(), {"x": [w]})


def _dispatcher(archive: Archive, executor: FakeExecutor, **kw: Any) -> Dispatcher:
    said: list[str] = []
    d = Dispatcher(archive, executor, penalty=PENALTY, max_retries=kw.pop("max_retries", 2), session=1,
                   settings={"optimizer": "fake", "attempt": 99}, say=said.append, **kw)
    d.said = said  # type: ignore[attr-defined]
    return d


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    a = Archive.create(tmp_path / "archive.sqlite")
    yield a
    a.close()


def test_a_lost_job_is_requeued_then_archived_once(archive: Archive) -> None:
    ex = FakeExecutor(lost={1: 1})
    d = _dispatcher(archive, ex)
    job = _job(1, 0.25)
    d.add(job, parents=["a", "b"], generation=3)
    polled = d.poll()
    assert polled and not polled.finished and polled.requeued == [job] and job.attempt == 1
    done = d.drain()
    assert ex.submitted == [(1, 0, "search"), (1, 1, "search")]
    assert [f.record.id for f in done] == [1] and done[0].ticket is job and done[0].new_best
    rec = archive.get(1)
    assert rec is not None and rec.ok and rec.aggregate == 0.25 and rec.parents == ["a", "b"]
    assert rec.generation == 3 and rec.genome == {"x": [0.25]} and rec.session == 1 and rec.worker == "w0"
    # the session's settings, then the result's, then the attempt (which always wins)
    assert rec.settings == {"optimizer": "fake", "limit": 3, "attempt": 1}
    assert [e["data"] for e in archive.events(EventKind.REQUEUED)] == [
        {"candidate": 1, "attempt": 1, "worker": "w1", "error": "worker died", "split": "search"}]
    assert d.progress.evaluations == 1 and d.progress.best == 0.25 and not d.busy()
    assert d.timings.evaluation == 2.0 and d.timings.merging == 0.5


def test_a_job_lost_more_than_max_retries_is_archived_failed_with_the_penalty(archive: Archive) -> None:
    ex = FakeExecutor(lost={1: 10})
    d = _dispatcher(archive, ex, max_retries=2)
    d.add(_job(1, 0.5), parents=["a", "b"])
    (done,) = d.drain()
    assert ex.submitted == [(1, 0, "search"), (1, 1, "search"), (1, 2, "search")]
    rec = archive.get(1)
    assert rec is not None and not rec.ok and rec.aggregate == PENALTY
    assert rec.error == "worker lost 3 times; last: worker died" and rec.settings["attempt"] == 2
    assert len(archive.events(EventKind.REQUEUED)) == 2
    assert d.progress.failed == 1 and d.progress.best is None and not done.new_best
    assert any(m.startswith("candidate 1 failed: worker lost 3 times") for m in d.said)  # type: ignore[attr-defined]


def test_capacity_bounds_what_is_in_the_executor(archive: Archive) -> None:
    ex = FakeExecutor(capacity=2)
    d = _dispatcher(archive, ex)
    for i in range(1, 6):
        d.add(_job(i, i / 10), parents=["a"])
    assert len(ex.queue) == 2 and [t.candidate_id for t in d.in_flight()] == [1, 2, 3, 4, 5]
    done = d.drain()
    assert [f.record.id for f in done] == [1, 2, 3, 4, 5] and ex.most_outstanding == 2
    assert [r.id for r in archive.results()] == [1, 2, 3, 4, 5]
    # new bests: every one (scores increase); the progress counts them all
    assert [f.new_best for f in done] == [True] * 5 and d.progress.best_id == 5


def test_tracked_jobs_wait_for_submit_so_the_caller_checkpoints_first(archive: Archive) -> None:
    ex = FakeExecutor()
    d = _dispatcher(archive, ex)
    job = _job(1, 0.5)
    d.add(job, parents=["a"], submit=False)
    assert ex.submitted == [] and d.busy() and not d.poll()
    with pytest.raises(RuntimeError, match="never submitted"):
        d.drain()
    d.submit(job)
    assert ex.submitted == [(1, 0, "search")] and len(d.drain()) == 1


def test_identical_recipes_are_answered_by_the_archive_or_follow_the_one_in_flight(archive: Archive) -> None:
    ex = FakeExecutor(capacity=2)
    d = _dispatcher(archive, ex)
    job = _job(1, 0.3)
    assert d.archived(job.recipe_hash) is None and not d.follow(job.recipe_hash, "asked-again")
    d.add(job, parents=["a"])
    assert d.follow(job.recipe_hash, "asked-again") and d.follow(job.recipe_hash, "and-again")
    assert job.followers == ["asked-again", "and-again"]
    d.drain()
    rec = d.archived(job.recipe_hash)
    assert rec is not None and rec.id == 1 and not d.follow(job.recipe_hash, "late")
    with pytest.raises(ValueError, match="already in flight"):
        d.add(_job(2, 0.4), parents=["a"])
        d.add(_job(2, 0.4), parents=["a"])
    d.drain()
    # a new session reads the archive: the same recipe is answered, nothing is evaluated again
    d2 = _dispatcher(archive, FakeExecutor())
    assert d2.archived(job.recipe_hash) == rec and d2.progress.evaluations == 2 and d2.progress.best == 0.4


def test_a_non_finite_score_is_archived_as_the_penalty_and_timings_are_snapshotted(archive: Archive) -> None:
    ex = FakeExecutor(nan={2})
    d = _dispatcher(archive, ex, timings=Timings(setup=1.0), timing_every=2)
    for i in (1, 2, 3):
        d.add(_job(i, 0.1 * i), parents=["a"])
    d.drain()
    assert archive.get(2).aggregate == PENALTY and archive.get(2).ok  # type: ignore[union-attr]
    timing = archive.events(EventKind.TIMING)
    assert len(timing) == 1 and timing[0]["data"]["evaluations"] == 2 and timing[0]["data"]["session"] == 1
    assert timing[0]["data"]["timings"]["setup"] == 1.0 and timing[0]["data"]["timings"]["evaluation"] == 4.0


def test_rescore_of_the_best_retries_lost_jobs_and_skips_done_ones(archive: Archive) -> None:
    ex = FakeExecutor(capacity=2, lost={-3: 1}, score=lambda job: 10 * job.candidate_id if job.split == "test"
                      else job.recipe.models[0].parameters["weight"].entries[0].values[0])
    d = _dispatcher(archive, ex)
    for i in (1, 2, 3):
        d.add(_job(i, 0.1 * i), parents=["a"])
    d.drain()
    seen: list[dict[int, Recipe]] = []

    def inputs(recipes: dict[int, Recipe]) -> dict[int, tuple[dict[str, str], dict[str, tuple[str, ...]]]]:
        seen.append(recipes)
        return {cid: ({"g1.1": f"/parents/{cid}"}, {"g1.1": ("add",)}) for cid in recipes}

    assert sorted(d.rescore(2, "test", inputs_of=inputs)) == [2, 3]
    assert list(seen[0]) == [3, 2] and seen[0][3].content_hash() == _recipe(0.1 * 3).content_hash()
    tests = [j for j in ex.jobs if j.split == "test"]
    assert [(j.candidate_id, j.attempt) for j in tests] == [(3, 0), (2, 0), (3, 1)]
    assert all(j.extra_models == {"g1.1": f"/parents/{j.candidate_id}"} and j.model_tasks == {"g1.1": ("add",)}
               for j in tests)
    assert {r.candidate_id: r.aggregate for r in archive.rescores()} == {2: 20.0, 3: 30.0}
    assert archive.events(EventKind.REQUEUED)[-1]["data"]["split"] == "test"
    assert archive.count() == 3 and d.progress.evaluations == 3  # re-scores are not search evaluations
    assert d.rescore(2, "test") == []  # already re-scored
    assert d.rescore(3, "test") == [1]


def test_a_rescore_lost_every_time_is_recorded_failed(archive: Archive) -> None:
    ex = FakeExecutor(lost={-1: 10})
    d = _dispatcher(archive, ex, max_retries=1)
    d.add(_job(1, 0.5), parents=["a"])
    d.drain()
    assert d.rescore(1) == [1]
    (res,) = archive.rescores()
    assert res.status == "failed" and res.aggregate == PENALTY and res.error == "worker lost 2 times; last: worker died"
