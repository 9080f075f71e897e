"""Per-item results in the archive: round trip for built-in and lm-eval tasks (the aggregate is the weighted
mean of the items), archives written before per-item results still open, report, show status and resume, and a
resume whose task files changed is refused naming the task."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.spaces import micro_space

from evomerge.errors import ConfigError
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.spec import FitnessSpec
from evomerge.models.hf import load_causal_lm
from evomerge.report.html import write_report
from evomerge.report.load import load_run
from evomerge.search.archive import Archive
from evomerge.search.dispatch import task_scores
from evomerge.search.driver import resume_run, start_run
from evomerge.search.items import ITEMS_META
from evomerge.search.space import space_from_dict
from evomerge.search.status import status_json, status_text

FIXTURES = Path(__file__).parent / "fixtures" / "pre_items"


def test_item_results_round_trip_for_builtin_and_lm_eval_tasks(micro_zoo: Path, tmp_path: Path) -> None:
    spec = FitnessSpec.from_dict({"batch_size": 16, "max_gen_toks": 10, "limit": 12, "tasks": [
        {"name": "add", "metric": "token_acc", "weight": 3.0,
         "jsonl": {"search": str(micro_zoo / "data/add/search.jsonl"), "test": str(micro_zoo / "data/add/test.jsonl")}},
        {"name": "enc", "metric": "exact_match",
         "lm_eval_yaml": {"search": str(micro_zoo / "tasks/evozoo_enc_search.yaml"),
                          "test": str(micro_zoo / "tasks/evozoo_enc_test.yaml")}}]})
    ev = Evaluator(spec, micro_zoo / "base", splits=("search", "test"))
    model = load_causal_lm(micro_zoo / "enc")
    res, test = ev.score(model, "search"), ev.score(model, "test")
    assert res.ok and test.ok, (res.error, test.error)
    part = ev.score(model, "search", items={"add": [1, 4, 7], "enc": [0, 5]})
    with Archive.create(tmp_path / "archive.sqlite") as a:
        for cid, r in ((1, res), (2, part)):
            a.add_candidate(id=cid, recipe_hash=f"h{cid}", recipe={}, parents=[], generation=0, method="linear",
                            genome=None, ok=True, scores=task_scores(r), aggregate=r.aggregate, split="search",
                            settings={}, merge_seconds=0.0, eval_seconds=0.0, worker=None, error=None, session=1,
                            items=r.items, partial=cid == 2)
        a.add_rescore(candidate_id=1, split="test", ok=True, scores=task_scores(test), aggregate=test.aggregate,
                      settings={}, merge_seconds=0.0, eval_seconds=0.0, worker=None, error=None, items=test.items)
    with Archive.open(tmp_path / "archive.sqlite", readonly=True) as a:
        got, got_test, got_part = a.items(1), a.items(1, "test"), a.items(2)
        rec = a.get(1)
        counts = a.item_counts()
        best = [r.id for r in a.best(5)]
    assert got == res.items and got_test == test.items and got_part == part.items  # every array, exactly
    assert got["add"].weights.min() >= 1 and (got["enc"].weights == 1).all()  # tokens per row / 1 per document
    assert got["add"].total == 12 and got["enc"].total == 12 and got["add"].complete and got["enc"].complete
    # each task value is the weighted mean of its items, and the aggregate the task-weighted mean of those
    for task, value in rec.scores.items():
        assert got[task].value() == pytest.approx(value["value"], rel=1e-6, abs=1e-7)
    assert rec.aggregate == pytest.approx((3 * got["add"].value() + got["enc"].value()) / 4, rel=1e-6, abs=1e-7)
    assert part.task_values()["add"] == pytest.approx(got_part["add"].value(), rel=1e-6)
    assert got_part["add"].index.tolist() == [1, 4, 7] and got_part["enc"].index.tolist() == [0, 5]
    assert counts == {"evaluated": 24 + 5, "candidates": 2, "full": 48}
    assert best == [1]  # the partial row is never a best


def test_an_archive_written_before_per_item_results_opens_reports_and_resumes(micro_zoo: Path, tmp_path: Path) -> None:
    for name in ("plain", "population"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
        with Archive.open(tmp_path / name / "archive.sqlite", readonly=True) as a:
            assert not a.has_items and not a.has_partial and a.items(1) == {} and a.best(1)
            assert a.item_counts() == {"evaluated": 0, "candidates": 0, "full": 0}
        status = status_json(tmp_path / name)
        assert status["evaluations"] > 0 and status["items_evaluated"] is None and status["items_full"] is None
        assert status["best"]["test"] is not None and status["partial"] == 0
        assert "items evaluated" not in status_text(tmp_path / name) and "leaderboard" in status_text(tmp_path / name)
        files = write_report(load_run(tmp_path / name), tmp_path / f"report-{name}")
        assert "items" in files.skipped and "fitness" in files.images
    # the CLI answers --json without torch on the old archive too
    out = subprocess.run([sys.executable, "-m", "evomerge", "status", str(tmp_path / "plain"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["evaluations"] == 4

    # resume with a larger budget: the archive gains the items table, new rows carry per-item results
    with Archive.open(tmp_path / "plain" / "archive.sqlite", readonly=True) as a:
        before = [(r.id, r.recipe_hash, r.aggregate) for r in a.results()]
    result = resume_run(tmp_path / "plain", budget=7, progress=False, log=lambda m: None)
    assert result.summary is not None and result.summary.evaluations == 7
    with Archive.open(tmp_path / "plain" / "archive.sqlite", readonly=True) as a:
        rows = a.results()
        assert [(r.id, r.recipe_hash, r.aggregate) for r in rows[:4]] == before  # untouched
        assert a.has_items and a.has_partial and all(a.items(r.id) == {} for r in rows[:4])
        assert all(set(a.items(r.id)) == {"add", "rev", "sort", "enc"} for r in rows[4:])
        assert set(a.get_meta(ITEMS_META)) == {"search", "test"}
    status = status_json(tmp_path / "plain")
    assert status["items"]["search"]["evaluations"] == 3 and status["items_evaluated"] > 0


def test_resume_refuses_task_files_changed_since_the_run_started(micro_zoo: Path, tmp_path: Path) -> None:
    data = micro_space(optimizer={"name": "CMA", "budget": 2}, test_top=0, executor={"threads_per_worker": 1})
    rows = (micro_zoo / "data/rev/search.jsonl").read_text().splitlines()
    edited = tmp_path / "rev.jsonl"
    edited.write_text("\n".join(rows) + "\n")
    data["fitness"]["tasks"][1]["jsonl"] = {"search": str(edited), "test": "zoo:micro/data/rev/test.jsonl"}
    start_run(space_from_dict(data), tmp_path / "r", progress=False, log=lambda m: None)
    with Archive.open(tmp_path / "r" / "archive.sqlite", readonly=True) as a:
        meta = a.get_meta(ITEMS_META)
    assert meta["search"]["rev"]["total"] == 24 and meta["search"]["rev"]["scorable"] == 24
    row = json.loads(rows[3])
    rows[3] = json.dumps({**row, "answer": row["answer"][::-1] + "x"})
    edited.write_text("\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match=r"task rev \(search split\): its items changed \(24 items, hash "
                                          + meta["search"]["rev"]["content"]):
        resume_run(tmp_path / "r", budget=3, progress=False, log=lambda m: None)
    with Archive.open(tmp_path / "r" / "archive.sqlite", readonly=True) as a:
        assert a.count() == 2  # nothing was evaluated


def test_report_items_view_lists_items_solved_by_nobody_or_one_model(tmp_path: Path) -> None:
    from evomerge.report.data import ItemsView, RunData

    view = ItemsView(["#7", "add", "rev"], {
        "t": np.array([[1.0, 0.0, 0.5, 1.0, np.nan], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]]),
        "ll": np.array([[-1.0, -2.0], [-3.0, -0.5], [-2.0, -2.0]])})
    assert view.solvable_tasks() == ["t"]
    assert view.solved_by_none() == {"t": [2]}  # item 4 is unknown for #7: not counted
    assert view.solved_by_one() == {"t": [(1, "rev"), (3, "#7")]}
    files = write_report(RunData("x", items=view), tmp_path)
    assert "items" in files.images and files.images["items"].stat().st_size > 3000
    page = files.html.read_text()
    assert "solved by none of these models" in page and "rev (1): 1" in page and "#7 (1): 3" in page
