"""The population manager end to end on the micro zoo: store, pair searches, parent cache, kinship, resume, CLI."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.errors import RunDirError
from evomerge.executors.base import EvalJob, EvalOutcome, InProcessExecutor
from evomerge.search.population import PopulationConfig
from evomerge.search.population_backend import PairSpace, PopulationStore, PopulationWorker, run_population

BUDGET = 22
CFG = PopulationConfig(k=3, pair_budget=2, saturation=None, max_generations=4, revive_after=1, max_revivals=1)


@pytest.fixture(scope="module")
def zoo() -> dict[str, Any]:
    from evomerge.fitness.spec import FitnessSpec
    from evomerge.fitness.zoo import SPECIALISTS, micro_zoo_dir

    torch.set_num_threads(1)
    root = micro_zoo_dir()
    raw = FitnessSpec.from_yaml(root / "fitness.yaml")
    spec = FitnessSpec.from_dict({**raw.model_dump(exclude_none=True), "limit": 16, "tasks": [
        {**t.model_dump(exclude_none=True), "metric": "token_acc", "direction": None} for t in raw.tasks]})
    originals = {s: str(root / s) for s in SPECIALISTS}
    worker = PopulationWorker(root / "base", originals, spec, max_extra=2)
    return {"root": root, "spec": spec, "originals": originals, "worker": worker}


class CrashingExecutor(InProcessExecutor):
    """Raises (like a killed process) once ``crash_at`` jobs have been run."""

    def __init__(self, worker: PopulationWorker, crash_at: int | None) -> None:
        super().__init__(lambda: worker)
        self.crash_at = crash_at
        self.ran = 0

    def poll(self, timeout: float | None = None) -> list[EvalOutcome]:
        if self.crash_at is not None and self.ran >= self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        self.ran += 1
        return super().poll(timeout)


def _run(zoo: dict, run_dir: Path, crash_at: int | None = None, cfg: PopulationConfig = CFG, **kw: Any) -> Any:
    ex = CrashingExecutor(zoo["worker"], crash_at)
    return run_population(run_dir, base=zoo["root"] / "base", originals=zoo["originals"], spec=zoo["spec"], cfg=cfg,
                          budget=BUDGET, seed=3, executor=ex, space=PairSpace(points=2), **kw)


def _trace(run_dir: Path) -> tuple[list[Any], list[Any]]:
    store = PopulationStore(run_dir / PopulationStore.FILE)
    try:
        cands = [(c["generation"], c["pair"], [round(v, 10) for v in c["genome"] or []], round(c["score"], 10))
                 for c in store.candidates()]
        events = [(e["kind"], {k: v for k, v in e["payload"].items() if k != "evaluations"}) for e in store.events()]
        return cands, events
    finally:
        store.close()


@pytest.fixture(scope="module")
def reference(zoo: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    run_dir = tmp_path_factory.mktemp("pop") / "ref"
    outcome, backend = _run(zoo, run_dir)
    return run_dir, outcome, backend


def test_run_records_members_lineage_and_budget(reference: tuple[Path, Any, Any]) -> None:
    run_dir, outcome, backend = reference
    store = backend.store
    assert store.count() == outcome.evaluations <= BUDGET
    members = {m.key: m for m, _ in store.members()}
    assert {"add", "rev", "sort", "enc"} <= set(members)
    children = [m for m in members.values() if m.parents]
    assert len(children) >= 6  # generation 1: every pair of the four specialists
    # every child's parents exist and the lineage reaches the originals
    for child in children:
        assert all(p in members for p in child.parents)
        stack, seen = list(child.parents), set()
        while stack:
            k = stack.pop()
            seen.add(k)
            stack.extend(members[k].parents)
        assert seen & {"add", "rev", "sort", "enc"}
    # the child's score is its best candidate's
    cands = {c["id"]: c for c in store.candidates()}
    for child in children:
        pair_rows = [c for c in cands.values() if c["generation"] == child.generation
                     and set((c["pair"] or "").split("|")) == set(child.parents)]
        assert child.score == pytest.approx(max(c["score"] for c in pair_rows))
    # events: plans, pair merges, generation ends, stop with a reason
    kinds = [e["kind"] for e in store.events()]
    assert kinds[0] == "population_start" and kinds[-1] == "stop" and "generation_end" in kinds
    assert outcome.stop_reason


def test_kinship_of_members_from_recipe_algebra_equals_materialized(reference: tuple[Path, Any, Any]) -> None:
    from evomerge.kinship import kinship

    run_dir, _, backend = reference
    table = backend.store.kinship_table("pcc")
    assert table, "kinship of members is cached in the store"
    nested = [m for m, _ in backend.store.members() if m.parents and any(p.startswith("g") for p in m.parents)]
    children = [m for m, _ in backend.store.members() if m.parents]
    pick = nested[0] if nested else children[0]
    other = "rev" if "rev" not in pick.parents else "enc"
    algebra = backend.kinship(pick.key, other)
    direct = kinship(backend.model_path(pick.key), backend.model_path(other), backend.base, "pcc")
    assert algebra == pytest.approx(direct, rel=1e-4, abs=1e-6)
    assert math.isfinite(algebra)


def test_resume_mid_generation_is_identical(zoo: dict, reference: tuple[Path, Any, Any], tmp_path: Path) -> None:
    ref_dir, ref_outcome, _ = reference
    run_dir = tmp_path / "resumed"
    # kill inside generation 1's third pair search (4 originals + 2 pairs x 2 evaluations + 1)
    with pytest.raises(KeyboardInterrupt):
        _run(zoo, run_dir, crash_at=9)
    with pytest.raises(KeyboardInterrupt):  # and again in a later generation
        _run(zoo, run_dir, crash_at=7)
    outcome, _ = _run(zoo, run_dir)
    assert _trace(run_dir) == _trace(ref_dir)
    assert outcome.best.key == ref_outcome.best.key and outcome.stop_reason == ref_outcome.stop_reason
    # other settings in the same run directory are refused
    with pytest.raises(RunDirError, match="other settings"):
        _run(zoo, run_dir, cfg=dataclasses.replace(CFG, k=2))


def test_parent_cache_is_bounded_and_rebuilds(zoo: dict, tmp_path: Path) -> None:
    cfg = dataclasses.replace(CFG, cache_disk_bytes=1, max_generations=3)
    outcome, backend = _run(zoo, tmp_path / "small-cache", cfg=cfg)
    parents = [p for p in (tmp_path / "small-cache" / "parents").iterdir() if p.is_dir()]
    assert backend.cache.materialized >= 1
    assert len(parents) <= 2  # only the pair being merged is kept over a 1-byte budget
    # an evicted merged member is rebuilt on demand, identical to its recipe
    child = next(m for m, _ in backend.store.members() if m.parents)
    path = Path(backend.model_path(child.key))
    assert (path / "config.json").is_file()


def test_worker_keeps_a_bounded_number_of_extra_models(zoo: dict, reference: tuple[Path, Any, Any]) -> None:
    _, _, backend = reference
    worker = PopulationWorker(zoo["root"] / "base", zoo["originals"], zoo["spec"], max_extra=1)
    merged = [m.key for m, _ in backend.store.members() if m.parents][:2]
    for key in merged:
        out = worker.evaluate(EvalJob(1, _single(key), extra_models={key: backend.model_path(key)}))
        assert out.result.ok, out.result.error
        assert list(worker._extra) == [key]  # the previous one was evicted
    # evaluating the materialized child alone gives the child's recorded score
    member = next(m for m, _ in backend.store.members() if m.key == merged[-1])
    assert out.result.aggregate == pytest.approx(member.score, abs=1e-6)


def _single(key: str) -> Any:
    from evomerge.merge.recipe import ModelEntry, Recipe

    return Recipe("linear", (ModelEntry(key),))


def test_report_and_status_commands(reference: tuple[Path, Any, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from evomerge.cli import main

    run_dir, outcome, _ = reference
    assert main(["status", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "generation" in text and "top-k after generation" in text and outcome.top[0].key in text
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    report = run_dir / "report"
    for name in ("fitness.png", "tasks.png", "family_tree.png", "kinship.png", "gain_vs_kinship.png"):
        assert (report / name).read_bytes()[:4] == b"\x89PNG", (name, out)
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert outcome.stop_reason.split(":")[0] in page
    assert main(["report", str(run_dir / "missing")]) == 2


def test_population_command_runs_resumes_and_refuses_other_settings(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from evomerge.cli import main

    run_dir = tmp_path / "cli"
    argv = ["population", str(run_dir), "--zoo", "micro", "--budget", "8", "--pair-budget", "1",
            "--metric-override", "token_acc", "--test"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "best:" in out and "held-out test:" in out and "budget: 8 of 8" in out
    store = PopulationStore(run_dir / PopulationStore.FILE)
    assert store.count() == 8 and len(store.test_scores()) == 1
    store.close()
    assert main(argv) == 0  # a finished run: nothing more to do, same answer
    assert "budget: 8 of 8" in capsys.readouterr().out
    assert main([*argv[:-1], "--k", "2"]) == 2
    assert "other settings" in capsys.readouterr().err
