"""The checkpoint is JSON replayed on resume: it never runs code, resumes exactly, and an unusable one is set aside."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from helpers.spaces import micro_space
from helpers.workers import QueueExecutor, RecipeScoreWorker

from evomerge.executors.base import EvalJob, EvalOutcome
from evomerge.search.loop import run_search
from evomerge.search.run import RunDir
from evomerge.search.space import Space, space_from_dict

pytestmark = pytest.mark.usefixtures("micro_zoo")  # the spaces name zoo:micro paths


class SlotExecutor(QueueExecutor):
    """``capacity`` jobs at once, finishing out of order but deterministically (a function of what is queued);
    with ``crash_at``, the driver dies with jobs in flight after that many results."""

    def __init__(self, worker: Any, capacity: int = 3, crash_at: int | None = None) -> None:
        super().__init__(capacity)
        self.worker, self.crash_at, self.done = worker, crash_at, 0

    def pick(self) -> int:
        return sum(j.candidate_id for j in self.queue) % len(self.queue)

    def finish(self, job: EvalJob) -> EvalOutcome:
        self.done += 1
        return self.worker.evaluate(job)

    def poll(self, timeout: float | None = None) -> list[EvalOutcome]:
        if self.queue and self.crash_at is not None and self.done >= self.crash_at:
            raise KeyboardInterrupt
        return super().poll(timeout)


class Planted:
    """A pickle whose loading runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


# linear decodes every weight to one recipe (duplicates and followers), task arithmetic explores
MIXED = {"methods": {"linear": {"weight": [0.5, 0.5000001]}, "task_arithmetic": {"weight": [0.0, 1.0]}},
         "granularity": "per_model"}


def _space(budget: int, **kw: Any) -> Space:
    return space_from_dict(micro_space(**{**MIXED, **kw}, optimizer={"name": "CMA", "budget": budget}))


def _rows(run: RunDir) -> list[tuple[int, str, float, str]]:
    with run.archive(readonly=True) as a:
        return [(r.id, r.recipe_hash, r.aggregate, r.status) for r in a.results()]


def _search(run: RunDir, space: Space, crash_at: int | None = None) -> None:
    run_search(run, space, SlotExecutor(RecipeScoreWorker(), 3, crash_at), progress=False, log=lambda m: None)


def test_a_resume_with_jobs_in_flight_and_followers_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    space = _space(14)
    ref = RunDir.create(tmp_path / "ref", space)
    _search(ref, space)
    run = RunDir.create(tmp_path / "k", space)
    for crash_at in (2, 4, 7):  # three driver deaths, each with jobs in flight
        with pytest.raises(KeyboardInterrupt):
            _search(run, space, crash_at)
        state = json.loads(run.checkpoint_path.read_text())
        assert state["inflight"], "the checkpoint holds the candidates in flight"
    _search(run, space)
    assert _rows(run) == _rows(ref) and len(_rows(ref)) == 14
    with run.archive(readonly=True) as a:
        assert not a.events("checkpoint_ignored")
    log = json.loads(run.checkpoint_path.read_text())["optimizer"]
    assert log["asks"] > 14  # duplicates and followers were asked and told too, and replayed
    assert {op[0] for op in log["ops"]} == {"ask", "tell"}


def test_a_planted_pickle_never_runs_and_the_run_resumes_from_the_archive(tmp_path: Path) -> None:
    """An old run's checkpoint.pkl (here a malicious one) is never unpickled; resume replays the archive."""
    space = _space(8)
    run = RunDir.create(tmp_path / "r", space)
    _search(run, space.with_overrides(budget=4))
    marker = tmp_path / "marker"
    evil = pickle.dumps(Planted(marker))
    for f in run.path.glob("checkpoint.*"):
        f.unlink()
    (run.path / "checkpoint.pkl").write_bytes(evil)  # as an older evomerge would have left it
    said: list[str] = []
    run_search(run, space, SlotExecutor(RecipeScoreWorker()), progress=False, log=said.append)
    assert not marker.exists()
    assert any("checkpoint.pkl is an older evomerge's pickle and is never read" in m
               and "rebuilt by replaying the archive" in m for m in said), said
    rows = _rows(run)
    assert len(rows) == 8 and len({r[1] for r in rows}) == 8  # nothing repeated, nothing lost
    # the same bytes where the JSON checkpoint goes: unreadable, set aside, still never run
    run.checkpoint_path.write_bytes(evil)
    run_search(run, space.with_overrides(budget=10), SlotExecutor(RecipeScoreWorker()), progress=False,
               log=said.append)
    assert not marker.exists() and len(_rows(run)) == 10
    assert list(run.path.glob("checkpoint.json.unusable-*"))
    with run.archive(readonly=True) as a:
        assert len(a.events("checkpoint_ignored")) == 2


def test_a_truncated_or_foreign_checkpoint_is_set_aside_and_the_optimizer_rebuilt(tmp_path: Path) -> None:
    space = _space(9)
    run = RunDir.create(tmp_path / "r", space)
    with pytest.raises(KeyboardInterrupt):
        _search(run, space, crash_at=3)  # killed with jobs in flight: the checkpoint matters
    (ckpt,) = list(run.path.glob("checkpoint.*"))
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a truncated file
    said: list[str] = []
    run_search(run, space.with_overrides(budget=6), SlotExecutor(RecipeScoreWorker()), progress=False,
               log=said.append)
    assert any("unreadable checkpoint" in m and "moved to" in m and "rebuilt by replaying the archive" in m
               for m in said), said
    assert len(_rows(run)) == 6
    # a valid JSON checkpoint that does not fit the run (another seed): the replay check refuses it, set aside
    state = json.loads(run.checkpoint_path.read_text())
    state["optimizer"]["seed"] += 1
    run.checkpoint_path.write_text(json.dumps(state))
    said.clear()
    run_search(run, space, SlotExecutor(RecipeScoreWorker()), progress=False, log=said.append)
    assert any("does not replay" in m for m in said), said
    rows = _rows(run)
    assert len(rows) == 9 and len({r[1] for r in rows}) == 9
    assert len(list(run.path.glob("checkpoint.json.unusable-*"))) == 2
