"""Durable intent and fail-fast setup (issue 17): what `run` was asked survives a crash, a changed model or a
hand-edited space.yaml is refused on resume, status tells the last session's state, every setup problem fails
before a run directory exists, failures in a row stop the search, a full disk is named, and small CLI faults."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.spaces import micro_space, write_space
from helpers.tiny_models import copy_model, local_models, micro_copies
from helpers.workers import RecipeScoreWorker

from evomerge.cli import main
from evomerge.commands.run import _finish
from evomerge.errors import ConfigError, DiskFullError, ModelError, RunDirError
from evomerge.executors.base import InProcessExecutor
from evomerge.models.compat import check_compatible
from evomerge.models.folder import ModelFolder
from evomerge.search import archive as archive_module
from evomerge.search.driver import default_run_path, resume_run, start_run
from evomerge.search.export import export_candidate
from evomerge.search.loop import run_search
from evomerge.search.population.session import run_population_session
from evomerge.search.run import RunDir
from evomerge.search.run_state import DEFAULT_TEST_TOP
from evomerge.search.space import SpaceModel, load_space, space_from_dict
from evomerge.search.status import status_text
from evomerge.search.stopping import StopFlag
from evomerge.search.workers import worker_spec

pytestmark = pytest.mark.usefixtures("micro_zoo")  # the spaces name zoo:micro paths


class Crash(BaseException):
    """The driver process dies (not an error evomerge handles)."""


class FakeExecutor(InProcessExecutor):
    """In-process, fake scores; ``crash_after`` evaluations then the driver dies; ``capacity`` reported."""

    def __init__(self, worker: RecipeScoreWorker | None = None, crash_after: int | None = None,
                 capacity: int = 1) -> None:
        self.worker = worker or RecipeScoreWorker()
        super().__init__(lambda: self.worker)
        self.crash_after, self._capacity, self.done = crash_after, capacity, 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def poll(self, timeout: float | None = None) -> list[Any]:
        if self.crash_after is not None and self.done >= self.crash_after and self.pending():
            raise Crash
        out = super().poll(timeout)
        self.done += len(out)
        return out


def _factory(seen: list[Any], **kw: Any) -> Any:
    def make(space: Any, spec: Any, address: str | None = None) -> FakeExecutor:
        seen.append(space)
        return FakeExecutor(**kw)
    return make


def _quiet(message: str) -> None:
    pass


def _count(run: Path) -> int:
    with RunDir.open(run).archive(readonly=True) as a:
        return a.count()


# ------------------------------------------------------------------------------------ 3. durable intent


def test_budget_and_workers_given_to_run_survive_a_crash(tmp_path: Path) -> None:
    path = write_space(tmp_path / "s.yaml", micro_space(optimizer={"name": "CMA", "budget": 12}, test_top=0))
    seen: list[Any] = []
    space = load_space(path).with_overrides(budget=5, workers=2)
    with pytest.raises(Crash):
        start_run(space, tmp_path / "runs" / "r", log=_quiet, progress=False, executor_factory=_factory(seen, crash_after=2))
    assert _count(tmp_path / "runs" / "r") == 2
    result = resume_run(tmp_path / "runs" / "r", log=_quiet, progress=False, executor_factory=_factory(seen))
    assert (seen[-1].budget, seen[-1].raw.workers) == (5, 2)  # what run was asked, not the YAML's 12 and 1
    assert result.summary is not None and _count(tmp_path / "runs" / "r") == 5
    # a resume's own change is kept for the next resume too
    with pytest.raises(Crash):
        resume_run(tmp_path / "runs" / "r", budget=7, log=_quiet, progress=False, executor_factory=_factory(seen, crash_after=1))
    resume_run(tmp_path / "runs" / "r", log=_quiet, progress=False, executor_factory=_factory(seen))
    assert seen[-1].budget == 7 and _count(tmp_path / "runs" / "r") == 7


# ------------------------------------------------------------------------------------ 4. fingerprints


def test_resume_refuses_a_model_changed_since_the_run_was_created(tmp_path: Path) -> None:
    paths = micro_copies(tmp_path / "models")
    space = space_from_dict(micro_space(models=local_models(paths), optimizer={"name": "CMA", "budget": 4},
                                        test_top=0))
    run = RunDir.create(tmp_path / "run", space)
    with run.archive(readonly=True) as a:
        prints = a.get_meta("fingerprints")
    assert set(prints) == {"base", "add", "rev"} and "model.safetensors" in prints["add"]["files"]
    run_search(run, space.with_overrides(budget=2), FakeExecutor(), progress=False)
    # the fine-tune is overwritten with other weights of the same shapes (same size, same header)
    st = (paths["add"] / "model.safetensors").stat()
    (paths["add"]).rename(tmp_path / "old-add")
    copy_model("zoo:micro/add", paths["add"], change=lambda n, t: t * 1.01)
    os.utime(paths["add"] / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with pytest.raises(RunDirError, match=r"(?s)input models changed.*model 'add' \(.*\): model\.safetensors was "
                                          r"rewritten .*same size and header"):
        resume_run(run.path, log=_quiet, progress=False, executor_factory=_factory([]))
    assert _count(run.path) == 2
    # weights of other shapes: other content
    cfg = paths["rev"] / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 2e-05'))
    with pytest.raises(RunDirError, match=r"model 'rev' \(.*\): config\.json has other content"):
        resume_run(run.path, log=_quiet, progress=False, executor_factory=_factory([]))


# ------------------------------------------------------------------------------------ 5. space.yaml edited


def test_a_hand_edited_space_yaml_is_refused_like_resume_space(tmp_path: Path) -> None:
    path = write_space(tmp_path / "s.yaml", micro_space(optimizer={"name": "CMA", "budget": 4}, test_top=0))
    result = start_run(load_space(path).with_overrides(budget=2), tmp_path / "r", log=_quiet, progress=False,
                       executor_factory=_factory([]), checks=False)
    snapshot = result.run_dir / "space.yaml"
    original = snapshot.read_text()
    assert "\nseed: 0\n" in original
    snapshot.write_text(original.replace("\nseed: 0\n", "\nseed: 5\n"))
    with pytest.raises(ConfigError, match=r"space\.yaml was edited after the run was created \(seed: 0 -> 5\).*"
                                          r"--space FILE"):
        resume_run(result.run_dir, log=_quiet, progress=False, executor_factory=_factory([]))
    # a safe field edited by hand is fine (here the budget; the run's --budget override still wins)
    snapshot.write_text(original.replace("budget: 4", "budget: 3"))
    seen: list[Any] = []
    resume_run(result.run_dir, log=_quiet, progress=False, executor_factory=_factory(seen))
    assert not seen  # budget 2 (the override) is used up and nothing is owed: nothing to do


# ------------------------------------------------------------------------------------ 6. status


def test_status_reports_the_last_session_and_finished_only_when_all_is_done(tmp_path: Path) -> None:
    path = write_space(tmp_path / "s.yaml", micro_space(optimizer={"name": "CMA", "budget": 6}, test_top=1))
    runs = tmp_path / "runs"
    with pytest.raises(Crash):
        start_run(load_space(path), runs / "r", log=_quiet, progress=False, executor_factory=_factory([], crash_after=2),
                  checks=False)
    assert "run r: interrupted (continue with `evomerge resume" in status_text(runs / "r")
    # the search part ends, the test re-score does not happen (its session is stopped right before)
    run = RunDir.open(runs / "r")
    run_search(run, load_space(path), FakeExecutor(), progress=False)
    text = status_text(runs / "r")
    assert "search done (budget of 6 evaluations used); test re-scores of [" in text and "finished" not in text
    resume_run(runs / "r", log=_quiet, progress=False, executor_factory=_factory([]))  # re-scores the best
    text = status_text(runs / "r")
    assert text.startswith("run r: finished: budget of 6 evaluations used") and "interrupted" not in text
    assert "evaluations 6/6" in text
    assert SpaceModel.model_fields["test_top"].default == DEFAULT_TEST_TOP


# ------------------------------------------------------------------------------------ 7. fail fast


def _spec_files(tmp_path: Path, test_rows: str) -> dict[str, Any]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "search.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (data / "test.jsonl").write_text(test_rows)
    return {"tasks": [{"name": "t", "metric": "token_acc",
                       "jsonl": {"search": str(data / "search.jsonl"), "test": str(data / "test.jsonl")}}]}


def test_a_broken_test_split_fails_before_the_run_exists(tmp_path: Path) -> None:
    space = write_space(tmp_path / "s.yaml", micro_space(fitness=_spec_files(tmp_path, "\n"),
                                                         optimizer={"name": "CMA", "budget": 2}))
    done = subprocess.run([sys.executable, "-m", "evomerge", "run", str(space), "--runs-dir", str(tmp_path / "runs"),
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "fitness task 't' (test split): fitness data file" in done.stderr and "has no rows" in done.stderr
    assert not (tmp_path / "runs" / "micro").exists()


def test_lm_eval_sources_are_checked_for_both_splits(tmp_path: Path) -> None:
    from evomerge.fitness.evaluator import check_sources
    from evomerge.fitness.spec import FitnessSpec

    yaml_task = {"name": "add", "lm_eval_yaml": {"search": "zoo:micro/tasks/evozoo_add_search.yaml",
                                                  "test": str(tmp_path / "missing.yaml")}}
    with pytest.raises(ConfigError, match=r"fitness task 'add' \(test split\): lm-eval task YAML .*missing\.yaml "
                                          r"does not exist"):
        check_sources(FitnessSpec.from_dict({"tasks": [yaml_task]}))
    check_sources(FitnessSpec.from_dict({"tasks": [{**yaml_task, "lm_eval_yaml": "zoo:micro/tasks/"
                                                                                 "evozoo_add_search.yaml"}]}))


@pytest.mark.slow
def test_an_unknown_lm_eval_task_name_is_refused_by_name() -> None:
    from evomerge.fitness.evaluator import check_sources
    from evomerge.fitness.spec import FitnessSpec

    spec = FitnessSpec.from_dict({"tasks": [{"name": "h", "lm_eval": {"search": "hellaswag", "test": "hellaswg_x"}}]})
    with pytest.raises(ConfigError, match=r"fitness task 'h' \(test split\): lm-eval knows no task 'hellaswg_x'"):
        check_sources(spec)


def test_custom_code_and_nan_weights_fail_before_the_run_exists(tmp_path: Path) -> None:
    paths = micro_copies(tmp_path / "models")
    copy_model("zoo:micro/base", tmp_path / "custom", config={"auto_map": {"AutoModelForCausalLM": "evil.Evil"}})
    data = micro_space(models={**local_models(paths), "base": str(tmp_path / "custom")}, test_top=0)
    seen: list[Any] = []
    with pytest.raises(ModelError, match=r"models\.base: model .*custom: its config\.json names custom code"):
        start_run(space_from_dict(data), tmp_path / "runs" / "a", log=_quiet, progress=False, executor_factory=_factory(seen))

    def poison(name: str, t: torch.Tensor) -> torch.Tensor:
        if name == "model.layers.1.mlp.up_proj.weight":
            t = t.clone()
            t[3, 5] = float("nan")
        return t

    copy_model("zoo:micro/rev", tmp_path / "nan", change=poison)
    data = micro_space(models={**local_models(paths), "fine_tunes": {"add": str(paths["add"]),
                                                                     "rev": str(tmp_path / "nan")}}, test_top=0)
    with pytest.raises(ModelError, match=r"models\.fine_tunes\.rev: model .*nan has NaN or infinite weights in "
                                         r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
        start_run(space_from_dict(data), tmp_path / "runs" / "b", log=_quiet, progress=False, executor_factory=_factory(seen))
    assert not seen and not (tmp_path / "runs").exists()


def test_an_unreachable_ray_address_fails_at_once_and_leaves_nothing(tmp_path: Path) -> None:
    space = write_space(tmp_path / "s.yaml", micro_space(optimizer={"name": "CMA", "budget": 2}))
    t0 = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "evomerge", "run", str(space), "--runs-dir",
                               str(tmp_path / "runs"), "--ray-address", "127.0.0.1:9", "--quiet"],
                              capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("`evomerge run --ray-address` to a closed port hangs")
    assert done.returncode == 2 and time.monotonic() - t0 < 60, done.stderr[-2000:]
    assert "cannot reach the Ray cluster at '127.0.0.1:9': nothing answers at 127.0.0.1:9" in done.stderr
    assert "ray start --head" in done.stderr
    assert not (tmp_path / "runs" / "micro").exists()


def test_a_setup_failure_or_a_signal_during_setup_leaves_no_run_directory(tmp_path: Path) -> None:
    space = space_from_dict(micro_space(test_top=0))

    def broken(space: Any, spec: Any, address: str | None = None) -> Any:
        raise ConfigError("the workers could not start")

    with pytest.raises(ConfigError, match="could not start"):
        start_run(space, tmp_path / "a", log=_quiet, progress=False, executor_factory=broken, checks=False)
    assert not (tmp_path / "a").exists()

    def slow(space: Any, spec: Any, address: str | None = None) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)  # the user gives up while workers start (Ray can take minutes)
        time.sleep(20)  # the hang being interrupted: the handler's KeyboardInterrupt ends it at once
        raise AssertionError("the first SIGTERM did not abort the setup")

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        start_run(space, tmp_path / "b", log=_quiet, progress=False, executor_factory=slow, checks=False)
    assert time.monotonic() - t0 < 10 and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------ 8. failures in a row


def test_a_search_where_everything_fails_stops_early_and_exits_non_zero(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = micro_space(optimizer={"name": "CMA", "budget": 20}, stopping={"max_consecutive_failures": 3},
                       test_top=1)
    worker = RecipeScoreWorker(fail_ids=set(range(1, 100)))
    seen: list[Any] = []
    result = start_run(space_from_dict(data), tmp_path / "r", log=_quiet, progress=False, checks=False,
                       executor_factory=_factory(seen, worker=worker))
    assert result.failed_out and _count(tmp_path / "r") == 3
    assert result.summary is not None and result.summary.stop_reason == \
        "too many failures in a row: the last 3 evaluations failed"
    assert _finish(result) == 1
    err = capsys.readouterr().err
    assert "the search stopped: too many failures in a row" in err and "last error: boom" in err
    assert "export the best" not in capsys.readouterr().out
    assert "stopped: too many failures in a row" in status_text(tmp_path / "r")
    # a resume counts afresh: three more tries, then the same stop
    again = resume_run(tmp_path / "r", log=_quiet, progress=False, executor_factory=_factory(seen, worker=worker))
    assert again.failed_out and _count(tmp_path / "r") == 6
    assert space_from_dict(micro_space()).raw.stopping.max_consecutive_failures == 10  # the default


def test_a_population_whose_merges_all_fail_stops_early(tmp_path: Path) -> None:
    data = micro_space(optimizer={"name": "CMA", "budget": 40}, stopping={"max_consecutive_failures": 4},
                       test_top=0, population={"k": 3, "pair_budget": 3, "saturation": None})
    space = space_from_dict(data)
    run = RunDir.create(tmp_path / "pop", space)
    worker = RecipeScoreWorker(fail_ids=set(range(5, 100)))  # the 4 originals score, every merge fails
    summary = run_population_session(run, space, InProcessExecutor(lambda: worker, penalty=space.penalty),
                                     stop=StopFlag(), log=_quiet, progress=False)
    assert summary.failed_out and not summary.final and summary.evaluations == 8
    with run.archive(readonly=True) as a:
        end = a.events("session_end")[-1]["data"]
        assert end["failures"] and not a.events("stop")  # not final: a resume may go on


# ------------------------------------------------------------------------------------ 11. vocab_policy


def test_a_larger_vocabulary_is_a_space_field_and_the_hint_names_it(tmp_path: Path) -> None:
    paths = micro_copies(tmp_path / "models")

    def grow(name: str, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t[:4] * 0.5]) if name in ("lm_head.weight", "model.embed_tokens.weight") else t

    copy_model("zoo:micro/rev", tmp_path / "big", change=grow, config={"vocab_size": 50})
    models = {**local_models(paths), "fine_tunes": {"add": str(paths["add"]), "rev": str(tmp_path / "big")}}
    with pytest.raises(ModelError) as refused:
        space_from_dict(micro_space(models=models))
    assert "`vocab_policy: slice_to_base` in the search space" in str(refused.value)
    assert "--vocab-policy" not in str(refused.value)
    with ModelFolder.open(paths["base"]) as b, ModelFolder.open(tmp_path / "big") as m, \
            pytest.raises(ModelError, match=r"--vocab-policy slice_to_base \(evomerge merge, evomerge kinship\)"):
        check_compatible(b, [m])
    space = space_from_dict(micro_space(models=models, vocab_policy="slice_to_base",
                                        optimizer={"name": "CMA", "budget": 2}, test_top=0))
    assert worker_spec(space).vocab_policy == "slice_to_base"
    result = start_run(space, tmp_path / "runs" / "v", log=_quiet, progress=False)  # real workers: merge with sliced rows
    with RunDir.open(result.run_dir).archive(readonly=True) as a:
        assert a.count() == 2 and all(r.ok for r in a.results())
    out = export_candidate(result.run_dir, tmp_path / "export", progress=False)
    with ModelFolder.open(out.out_dir) as f:
        assert tuple(f.shape("lm_head.weight")) == (46, 64)


# ------------------------------------------------------------------------------------ 13. a full disk


def test_a_full_disk_at_the_checkpoint_is_named_and_nothing_is_lost(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    space = space_from_dict(micro_space(optimizer={"name": "CMA", "budget": 8}, test_top=0))
    ref = RunDir.create(tmp_path / "ref", space)
    run_search(ref, space, FakeExecutor(), progress=False)
    run = RunDir.create(tmp_path / "r", space)
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError) as full:
        run_search(run, space, FakeExecutor(), progress=False)
    text = str(full.value)
    assert text.startswith(f"no space left on the disk holding {run.path} (file system mounted at ")
    assert "free of" in text and "writing the optimizer checkpoint needs about" in text
    assert f"Nothing is lost (every archived evaluation is kept): free some space, then continue with " \
           f"`evomerge resume {run.path}`" in text
    assert not list(run.path.glob(".checkpoint.*.tmp"))
    monkeypatch.setattr(os, "fsync", real)
    run_search(run, space, FakeExecutor(), progress=False)
    with ref.archive(readonly=True) as a, run.archive(readonly=True) as b:
        assert [(r.id, r.recipe_hash, r.aggregate) for r in a.results()] == \
            [(r.id, r.recipe_hash, r.aggregate) for r in b.results()]


def _tiny_sqlite(monkeypatch: pytest.MonkeyPatch, pages: int | None) -> None:
    """SQLite connections that cannot grow past ``pages`` pages (None: past their size now): a real
    "database or disk is full"."""
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = real(*args, **kwargs)
        limit = pages if pages is not None else db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count={max(1, limit)}")
        return db

    monkeypatch.setattr(archive_module.sqlite3, "connect", connect)


def test_a_full_disk_at_the_archive_and_at_run_creation_is_not_called_corruption(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    space = space_from_dict(micro_space(optimizer={"name": "CMA", "budget": 400},
                                        methods={"linear": {"weight": [0.0, 1.0]}}, test_top=0))
    with monkeypatch.context() as m:
        _tiny_sqlite(m, 1)
        with pytest.raises(DiskFullError, match=r"no space left on the disk holding .*writing the new run "
                                                r"directory .*Nothing was created"):
            RunDir.create(tmp_path / "new", space)
    assert not list(tmp_path.iterdir())  # no run directory, no .partial left
    run = RunDir.create(tmp_path / "r", space)
    with monkeypatch.context() as m:
        _tiny_sqlite(m, None)  # the archive file cannot grow any more
        with pytest.raises(DiskFullError, match=r"writing the archive archive\.sqlite needs about 1\.0 MB more\. "
                                                r"Nothing is lost"):
            run_search(run, space, FakeExecutor(), progress=False)
    done = _count(run.path)
    run_search(run, space.with_overrides(budget=done + 3), FakeExecutor(), progress=False)
    assert _count(run.path) == done + 3


def test_a_full_disk_during_export_names_the_disk_and_leaves_nothing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    space = space_from_dict(micro_space(optimizer={"name": "CMA", "budget": 2}, test_top=0))
    run = RunDir.create(tmp_path / "r", space)
    run_search(run, space, FakeExecutor(), progress=False)

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("evomerge.search.export.merge_to_disk", full)
    with pytest.raises(DiskFullError, match=r"no space left on the disk holding .*writing the export .*out needs "
                                            r"about .* more\. Nothing was written"):
        export_candidate(run.path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


# ------------------------------------------------------------------------------------ 14. small faults


def test_status_piped_into_head_prints_no_traceback(tmp_path: Path) -> None:
    space = space_from_dict(micro_space(optimizer={"name": "CMA", "budget": 3}, test_top=0))
    run = RunDir.create(tmp_path / "r", space)
    run_search(run, space, FakeExecutor(), progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "status", str(run.path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `| head` that has read enough
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141


def test_the_session_event_records_the_worker_count(tmp_path: Path) -> None:
    space = space_from_dict(micro_space(optimizer={"name": "CMA", "budget": 3}, workers=2, test_top=0))
    run = RunDir.create(tmp_path / "r", space)
    run_search(run, space, FakeExecutor(capacity=4), progress=False)
    with run.archive(readonly=True) as a:
        data = a.events("session_start")[0]["data"]
    assert data["workers"] == 2 and data["capacity"] == 4


def test_an_empty_run_name_is_refused(tmp_path: Path) -> None:
    space = space_from_dict(micro_space())
    with pytest.raises(RunDirError, match="--name is empty"):
        default_run_path(space, "", tmp_path)
    with pytest.raises(RunDirError, match="--name is empty"):
        default_run_path(space, "  ", tmp_path)
    assert default_run_path(space, None, tmp_path) == tmp_path / "micro"


def test_resuming_a_finished_run_starts_no_worker(tmp_path: Path) -> None:
    path = write_space(tmp_path / "s.yaml", micro_space(optimizer={"name": "CMA", "budget": 4}, test_top=1))
    seen: list[Any] = []
    start_run(load_space(path), tmp_path / "r", log=_quiet, progress=False, executor_factory=_factory(seen), checks=False)
    assert len(seen) == 1
    said: list[str] = []
    result = resume_run(tmp_path / "r", log=said.append, progress=False, executor_factory=_factory(seen))
    assert len(seen) == 1 and result.finished_before is not None and _count(tmp_path / "r") == 4
    assert any("is finished" in m and "no worker started" in m for m in said)
    resume_run(tmp_path / "r", budget=6, log=_quiet, progress=False, executor_factory=_factory(seen))  # more budget: it goes on
    assert len(seen) == 2 and _count(tmp_path / "r") == 6


def test_merge_overwrite_refuses_an_output_folder_holding_an_input(tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = micro_copies(out, ("add",))  # the inputs live inside the folder to be replaced
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base_model": str(paths["base"]),
                                      "models": [{"model": str(paths["add"]), "parameters": {"weight": 0.5}}]}))
    assert main(["merge", str(recipe), str(out), "--overwrite", "--no-progress"]) == 2
    assert (paths["add"] / "model.safetensors").is_file() and (paths["base"] / "config.json").is_file()
    assert main(["merge", str(recipe), str(tmp_path / "elsewhere"), "--no-progress"]) == 0
    assert main(["merge", str(recipe), str(tmp_path / "elsewhere"), "--overwrite", "--no-progress"]) == 0

