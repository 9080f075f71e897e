"""The ask/tell loop: determinism, dedup, failures, lost workers, optimizers, stopping rules, run directories."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from helpers.spaces import micro_space, write_space
from helpers.workers import RecipeScoreWorker

from evomerge.errors import ConfigError, RunDirError
from evomerge.executors.base import InProcessExecutor
from evomerge.search.archive import Archive
from evomerge.search.driver import resume_run, run_session, start_run
from evomerge.search.loop import MAX_DUPLICATES_IN_A_ROW, run_search
from evomerge.search.run import RunDir
from evomerge.search.run_space import check_resumable
from evomerge.search.space import Space, load_space, space_from_dict

pytestmark = pytest.mark.usefixtures("micro_zoo")  # the spaces name zoo:micro paths


def _fake_run(tmp_path: Path, data: dict[str, Any], worker: RecipeScoreWorker | None = None,
              name: str = "r") -> tuple[RunDir, Space, RecipeScoreWorker, Any]:
    space = space_from_dict(data)
    run = RunDir.create(tmp_path / name, space)
    w = worker or RecipeScoreWorker()
    summary = run_search(run, space, InProcessExecutor(lambda: w, penalty=space.penalty), progress=False)
    return run, space, w, summary


def _rows(run: RunDir) -> list[tuple[int, str, float, str]]:
    with run.archive(readonly=True) as a:
        return [(r.id, r.recipe_hash, r.aggregate, r.status) for r in a.results()]


@pytest.mark.slow
def test_real_search_same_seed_same_archive(tmp_path: Path) -> None:
    """Merging and scoring for real on the micro zoo: two runs with one seed give identical archives."""
    data = micro_space(optimizer={"name": "CMA", "budget": 6}, test_top=0)
    rows = []
    for name in ("a", "b"):
        result = start_run(space_from_dict(data), tmp_path / name, progress=False, log=lambda m: None)
        assert result.summary is not None and result.summary.evaluations == 6
        rows.append(_rows(RunDir.open(tmp_path / name)))
    assert rows[0] == rows[1]
    assert len({h for _, h, _, _ in rows[0]}) == 6
    assert all(status == "ok" and 0.0 <= agg <= 1.0 for _, _, agg, status in rows[0])
    # a different seed explores differently
    other = start_run(space_from_dict({**data, "seed": 1}), tmp_path / "c", progress=False, log=lambda m: None)
    assert other.summary is not None
    assert [h for _, h, _, _ in _rows(RunDir.open(tmp_path / "c"))] != [h for _, h, _, _ in rows[0]]


@pytest.mark.parametrize("optimizer", ["CMA", "TwoPointsDE", "PSO", "OnePlusOne"])
def test_optimizers_by_name_improve_on_a_smooth_score(tmp_path: Path, optimizer: str) -> None:
    data = micro_space(methods={"linear": {"weight": [0.0, 1.0]}}, granularity="per_model",
                       optimizer={"name": optimizer, "budget": 60})
    run, _, worker, summary = _fake_run(tmp_path, data)
    rows = _rows(run)
    assert summary.evaluations == len(rows) == 60
    assert len({h for _, h, _, _ in rows}) == 60  # never the same recipe twice
    first, best = rows[0][2], max(r[2] for r in rows)
    assert best > first  # the optimizer climbs
    assert best > 0.97  # 4 weights near 0.7 (score 1 - mean squared distance)


def test_identical_recipes_are_answered_by_the_archive(tmp_path: Path) -> None:
    """A range narrower than the recipe's rounding decodes every candidate to one recipe: evaluated once."""
    data = micro_space(methods={"linear": {"weight": [0.5, 0.5000001]}}, granularity="per_model",
                       optimizer={"name": "OnePlusOne", "budget": 50})
    run, _, worker, summary = _fake_run(tmp_path, data)
    assert len(worker.calls) == 1 and summary.evaluations == 1
    assert "converged" in summary.stop_reason
    with run.archive(readonly=True) as a:
        end = a.events("session_end")[-1]["data"]
    assert end["duplicates"] == MAX_DUPLICATES_IN_A_ROW


def test_failed_candidates_get_the_finite_penalty_and_the_search_goes_on(tmp_path: Path) -> None:
    data = micro_space(optimizer={"name": "CMA", "budget": 10})
    run, space, worker, summary = _fake_run(tmp_path, data, RecipeScoreWorker(fail_ids={2, 5}))
    with run.archive(readonly=True) as a:
        failed = [r for r in a.results() if not r.ok]
        assert [r.id for r in failed] == [2, 5]
        assert all(r.aggregate == space.penalty and r.error == "boom" for r in failed)
        assert a.count() == 10
    assert summary.failed == 2 and summary.evaluations == 10


def test_a_lost_worker_requeues_its_candidate_once(tmp_path: Path) -> None:
    data = micro_space(optimizer={"name": "CMA", "budget": 5})
    run, _, worker, _ = _fake_run(tmp_path, data, RecipeScoreWorker(lose_once={3}))
    assert worker.calls.count((3, 0)) == 1 and worker.calls.count((3, 1)) == 1
    with run.archive(readonly=True) as a:
        assert a.count() == 5 and a.get(3).ok and a.get(3).settings["attempt"] == 1
        assert [e["data"]["candidate"] for e in a.events("requeued")] == [3]


def test_a_worker_lost_more_than_max_retries_is_recorded_failed(tmp_path: Path) -> None:
    class AlwaysLost(RecipeScoreWorker):
        def evaluate(self, job: Any) -> Any:
            out = super().evaluate(job)
            if job.candidate_id == 2:
                from dataclasses import replace
                return replace(out, lost=True)
            return out

    data = micro_space(optimizer={"name": "CMA", "budget": 4}, executor={"max_retries": 1})
    run, _, worker, _ = _fake_run(tmp_path, data, AlwaysLost())
    assert [c for c in worker.calls if c[0] == 2] == [(2, 0), (2, 1)]
    with run.archive(readonly=True) as a:
        assert not a.get(2).ok and "worker lost 2 times" in a.get(2).error
        assert a.count() == 4


def test_stopping_rules(tmp_path: Path) -> None:
    base = {"methods": {"linear": {"weight": [0.0, 1.0]}}, "granularity": "per_model"}
    _, _, _, s = _fake_run(tmp_path, micro_space(**base, optimizer={"name": "CMA", "budget": 200},
                                                 stopping={"target": 0.9}), name="target")
    assert s.stop_reason.startswith("target 0.9 reached") and s.best >= 0.9 and s.evaluations < 200
    _, _, _, s = _fake_run(tmp_path, micro_space(**base, optimizer={"name": "CMA", "budget": 200},
                                                 stopping={"no_improvement": 5}), name="flat")
    assert s.stop_reason == "no improvement for 5 evaluations"


def test_existing_run_dir_is_refused_and_resume_is_the_way(tmp_path: Path) -> None:
    space = space_from_dict(micro_space())
    RunDir.create(tmp_path / "r", space)
    with pytest.raises(RunDirError, match="already exists; continue it with `evomerge resume"):
        RunDir.create(tmp_path / "r", space)


def test_resume_refuses_a_changed_space_but_accepts_budget_and_workers(tmp_path: Path) -> None:
    path = write_space(tmp_path / "s.yaml", micro_space(optimizer={"name": "CMA", "budget": 3}))
    space = load_space(path)
    run = RunDir.create(tmp_path / "r", space)
    changed = write_space(tmp_path / "s2.yaml", micro_space(optimizer={"name": "CMA", "budget": 3}, seed=5))
    with pytest.raises(ConfigError, match=r"seed: 0 -> 5.*start a new run"):
        resume_run(run.path, space_path=changed)
    fine = write_space(tmp_path / "s3.yaml", micro_space(optimizer={"name": "CMA", "budget": 9},
                                                         stopping={"no_improvement": 50}))
    assert check_resumable(run, load_space(fine), space) == ["optimizer.budget", "stopping.no_improvement"]


def test_resume_continues_the_budget_without_repeating(tmp_path: Path) -> None:
    data = micro_space(optimizer={"name": "CMA", "budget": 12})
    space = space_from_dict(data)
    run = RunDir.create(tmp_path / "r", space)
    w = RecipeScoreWorker()
    run_search(run, space.with_overrides(budget=5), InProcessExecutor(lambda: w), progress=False)
    assert len(w.calls) == 5
    run_search(run, space, InProcessExecutor(lambda: w), progress=False)
    rows = _rows(run)
    assert [r[0] for r in rows] == list(range(1, 13)) and len(w.calls) == 12
    # same archive as one uninterrupted session
    ref, *_ = _fake_run(tmp_path, data, name="ref")
    assert _rows(ref) == rows


def test_corrupt_archive_is_a_clear_error_and_nothing_is_overwritten(tmp_path: Path) -> None:
    space = space_from_dict(micro_space())
    run = RunDir.create(tmp_path / "r", space)
    junk = b"this is not a database" * 100
    run.archive_path.write_bytes(junk)
    with pytest.raises(RunDirError, match="corrupt or not an evomerge archive.*nothing was changed"):
        resume_run(run.path)
    assert run.archive_path.read_bytes() == junk


def test_the_archive_is_append_only_and_readable_while_written(tmp_path: Path) -> None:
    run, *_ = _fake_run(tmp_path, micro_space(optimizer={"name": "CMA", "budget": 3}))
    with Archive.open(run.archive_path) as a:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            a._db.execute("UPDATE candidates SET aggregate = 1.0")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            a._db.execute("DELETE FROM events")
        with Archive.open(run.archive_path, readonly=True) as reader:  # a status while the search writes
            a.add_event("probe", {"x": 1})
            assert reader.events("probe")[0]["data"] == {"x": 1}


def test_a_second_process_on_the_same_run_is_refused(tmp_path: Path) -> None:
    space = space_from_dict(micro_space())
    run = RunDir.create(tmp_path / "r", space)
    with run.locked(), pytest.raises(RunDirError, match="being run by another evomerge process"):
        run_session(RunDir.open(run.path), space, progress=False, log=lambda m: None)
