"""The population manager as a mode of the search core: pairing rules through the archive, stopping rules,
lost workers, SIGKILL + resume (same archive as an uninterrupted run), status and report from the archive."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
from helpers.processes import kill_at_hook, run_cli
from helpers.spaces import micro_space, write_space
from helpers.workers import RecipeScoreWorker

from evomerge.executors.base import InProcessExecutor
from evomerge.search.events import MANAGER_EVENTS
from evomerge.search.population.members import pair_key
from evomerge.search.population.rules import exploration_partner
from evomerge.search.population.session import population_config, run_population_session
from evomerge.search.progress import SearchSummary
from evomerge.search.run import RunDir
from evomerge.search.space import space_from_dict
from evomerge.search.stopping import StopFlag

POP = {"k": 3, "pair_budget": 2, "saturation": None, "max_generations": 4, "revive_after": 1, "max_revivals": 1,
       "joint": False}


@pytest.fixture(scope="module", autouse=True)
def _micro() -> None:
    from evomerge.zoo.build import ensure_zoo

    ensure_zoo("micro")


class HashScoreWorker(RecipeScoreWorker):
    """Model-free: a score in [0, 1) from the recipe's hash, so rankings shuffle like real merges do."""

    def evaluate(self, job: Any) -> Any:
        from evomerge.executors.base import EvalOutcome
        from evomerge.fitness.result import EvalResult, TaskScore

        self.calls.append((job.candidate_id, job.attempt))
        if job.candidate_id in self.lose_once and job.attempt == 0:
            return EvalOutcome(job=job, result=EvalResult.failure("worker died", -1.0), worker="w0", lost=True)
        score = int(job.recipe.content_hash()[:8], 16) / 2**32
        return EvalOutcome(job=job, result=EvalResult(aggregate=score, tasks=(TaskScore("fake", "score", score),)),
                           worker="w0", eval_seconds=0.001)


def _pop_space(budget: int, **pop: Any) -> dict[str, Any]:
    return micro_space(optimizer={"name": "CMA", "budget": budget}, population={**POP, **pop}, test_top=0)


def _fake_pop(tmp_path: Path, data: dict[str, Any], worker: RecipeScoreWorker | None = None,
              name: str = "p") -> tuple[RunDir, SearchSummary, RecipeScoreWorker]:
    space = space_from_dict(data)
    run = RunDir.create(tmp_path / name, space)
    w = worker or HashScoreWorker()
    summary = run_population_session(run, space, InProcessExecutor(lambda: w, penalty=space.penalty),
                                     stop=StopFlag(), log=lambda m: None, progress=False)
    return run, summary, w


def _events(run: RunDir, kind: str | None = None) -> list[dict[str, Any]]:
    with run.archive(readonly=True) as a:
        return [e["data"] for e in a.events(kind)]


# ------------------------------------------------------------------------------------------ pairing rules


def test_pairing_rules_through_the_archive(tmp_path: Path) -> None:
    run, summary, _ = _fake_pop(tmp_path, _pop_space(40, screen=0))  # screening: its own test
    plans = _events(run, "generation_plan")
    gen_ends = {e["generation"]: e for e in _events(run, "generation_end")}
    done = _events(run, "pair_done")
    with run.archive(readonly=True) as a:
        records = a.results()
        kin = {(x, y): v for (x, y, _m), v in a.kinship_table("pcc").items()}
    originals = ["add", "rev", "sort", "enc"]
    # generation 1: every pair of the starting models
    assert plans[0]["generation"] == 1
    assert {pair_key(p["a"], p["b"]) for p in plans[0]["plans"]} == {
        pair_key(x, y) for x, y in itertools.combinations(originals, 2)}
    assert {p["reason"] for p in plans[0]["plans"]} == {"initial"}
    assert len(plans) >= 2
    scores = {m["key"]: m["score"] for m in _events(run, "member")}
    scores.update({d["child"]: d["score"] for d in done})
    merged_before: set[tuple[str, str]] = set()
    for plan in plans:
        g = plan["generation"]
        pairs = [pair_key(p["a"], p["b"]) for p in plan["plans"]]
        assert len(pairs) == len(set(pairs)) and not set(pairs) & merged_before  # no pair twice
        if g > 1 and not plan.get("revival"):
            top = gen_ends[g - 1]["top"]
            topk = {pair_key(p["a"], p["b"]) for p in plan["plans"] if p["reason"] == "top-k"}
            assert topk == {pair_key(x, y) for x, y in itertools.combinations(top, 2)} - merged_before
            explore = [p for p in plan["plans"] if p["reason"] == "exploration"]
            assert len(explore) == 1 and explore[0]["a"] == top[0]
            # the exploration partner has the lowest kinship to the best among the unmerged members
            existing = [m for m in scores if m in originals or any(d["child"] == m and d["generation"] < g
                                                                   for d in done)]
            from evomerge.search.population.members import Member

            members = [Member(k, scores[k]) for k in existing]
            chosen = exploration_partner(top[0], members, lambda x, y: kin[pair_key(x, y)], "pcc",
                                         merged_before | topk)
            assert chosen is not None and chosen[0] == explore[0]["b"]
        merged_before |= {pair_key(d["a"], d["b"]) for d in done if d["generation"] == g}
    # every evaluation is in the archive with its parents, generation and recipe; no recipe twice
    assert len(records) == summary.evaluations <= 40
    assert len({r.recipe_hash for r in records}) == len(records)
    assert [r.parents for r in records[:4]] == [[o] for o in originals]
    assert {r.generation for r in records[:4]} == {0}
    members = set(scores)
    for r in records[4:]:
        assert r.generation >= 1 and len(r.parents) == 2 and set(r.parents) <= members
        assert r.genome is not None and len(r.genome["x"]) == 4
        assert {m["model"] for m in r.recipe["models"]} == set(r.parents)
    # a child is the best candidate of its pair
    for d in done:
        pair = [r for r in records if r.generation == d["generation"] and pair_key(*r.parents) == pair_key(d["a"], d["b"])]
        assert d["candidate_id"] == max(pair, key=lambda r: (r.aggregate, -r.id)).id
    assert _events(run, "stop")[-1]["reason"] == summary.stop_reason
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in kin.values())


def test_stopping_rules(tmp_path: Path) -> None:
    _, s, _ = _fake_pop(tmp_path, _pop_space(100, saturation=-1.0, max_revivals=0), name="sat")  # pcc > -1
    assert s.stop_reason.startswith("saturated") and s.evaluations == 4 + 6 * 2
    _, s, _ = _fake_pop(tmp_path, _pop_space(100, max_generations=1, max_revivals=0), name="maxgen")
    assert s.stop_reason.startswith("max_generations") and s.evaluations == 16
    run, s, _ = _fake_pop(tmp_path, _pop_space(100, max_generations=20, k=2, explore=False, max_revivals=0),
                          name="conv")
    assert s.stop_reason.startswith(("converged", "exhausted")), s.stop_reason
    assert _events(run, "stop")[-1]["reason"] == s.stop_reason
    _, s, _ = _fake_pop(tmp_path, _pop_space(100, pair_budget=0, max_generations=1, max_revivals=0), name="fixed")
    assert s.evaluations == 4 + 6  # budget 0: the fixed starting recipe of each pair only


def test_a_lost_worker_requeues_then_the_budget_continues_on_resume(tmp_path: Path) -> None:
    run, s, w = _fake_pop(tmp_path, _pop_space(12), HashScoreWorker(lose_once={6}))
    assert (6, 0) in w.calls and (6, 1) in w.calls and s.evaluations == 12
    assert _events(run, "requeued")[0]["candidate"] == 6
    # a larger budget on resume continues after the budget stop, without repeating an evaluation
    space = space_from_dict(_pop_space(20))
    w2 = HashScoreWorker()
    s2 = run_population_session(run, space, InProcessExecutor(lambda: w2, penalty=space.penalty), stop=StopFlag(),
                                log=lambda m: None, progress=False)
    ref, _, _ = _fake_pop(tmp_path, _pop_space(20), name="ref20")
    assert s2.evaluations == 20 and len(w2.calls) == 8
    assert _rows(run) == _rows(ref)


class StoppingWorker(HashScoreWorker):
    """Sets the session's stop flag after ``after`` evaluations (Ctrl-C between two evaluations)."""

    def __init__(self, stop: StopFlag, after: int) -> None:
        super().__init__()
        self.stop, self.after = stop, after

    def evaluate(self, job: Any) -> Any:
        out = super().evaluate(job)
        if len(self.calls) >= self.after:
            self.stop.set("test: interrupted")
        return out


def test_the_joint_merge_through_the_archive_and_its_resume_mid_search(tmp_path: Path) -> None:
    originals = ["add", "rev", "sort", "enc"]
    data = _pop_space(30, joint=True, joint_budget=4, max_generations=2, pair={"points": 1})
    ref, summary, _ = _fake_pop(tmp_path, data, name="ref")
    with ref.archive(readonly=True) as a:
        joint = [r for r in a.results() if r.generation == 0 and len(r.parents) > 1]
        done = [e["data"] for e in a.events("joint_done")]
        members = a.member_candidates()
    # 4 evaluations of the joint genome (one weight per original), all of the 4 originals, the pair method's
    assert len(joint) == 4 and all(sorted(r.parents) == sorted(originals) for r in joint)
    assert all(r.method == "task_arithmetic" and len(r.recipe["models"]) == 4 for r in joint)
    best = max(joint, key=lambda r: (r.aggregate, -r.id))
    assert done == [{"generation": 0, "parents": originals, "child": "joint", "score": best.aggregate,
                     "candidate_id": best.id, "evaluations": 4, "ok": True}]
    assert members["joint"] == best.id
    plan = _events(ref, "generation_plan")[0]
    assert sum("joint" in (p["a"], p["b"]) for p in plan["plans"]) == 4 and len(plan["plans"]) == 10
    assert summary.evaluations == 30
    # the first joint start: w = 1 / (1 + 3 c), c the originals' mean pairwise max(0, cos)
    with ref.archive(readonly=True) as a:
        cos = [v for (x, y, _m), v in a.kinship_table("cos").items() if x in originals and y in originals]
    assert len(cos) == 6
    w0 = 1.0 / (1.0 + 3 * sum(max(0.0, c) for c in cos) / 6)
    first = min(joint, key=lambda r: r.id)
    assert first.genome is not None and first.genome["x"] == pytest.approx([w0] * 4) == first.genome["x0"]
    # interrupted inside the joint search, then resumed: the same archive and decisions as without a stop
    space = space_from_dict(data)
    run = RunDir.create(tmp_path / "cut", space)
    stop = StopFlag()
    w = StoppingWorker(stop, after=6)  # the 4 originals, then 2 of the joint's 4
    run_population_session(run, space, InProcessExecutor(lambda: w, penalty=space.penalty), stop=stop,
                           log=lambda m: None, progress=False)
    assert len(_rows(run)) == 6 and not _events(run, "joint_done")
    w2 = HashScoreWorker()
    s2 = run_population_session(run, space, InProcessExecutor(lambda: w2, penalty=space.penalty), stop=StopFlag(),
                                log=lambda m: None, progress=False)
    assert _rows(run) == _rows(ref) and s2.evaluations == 30 and len(w2.calls) == 24
    assert [(e["kind"], e["data"]) for e in _manager_events(run)] == [(e["kind"], e["data"])
                                                                      for e in _manager_events(ref)]


def _manager_events(run: RunDir) -> list[dict[str, Any]]:
    with run.archive(readonly=True) as a:
        return [e for e in a.events() if e["kind"] in MANAGER_EVENTS]


def test_population_section_errors_name_the_field(tmp_path: Path) -> None:
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match="population.pair: unknown"):
        population_config(space_from_dict(_pop_space(10, pair={"pionts": 2})))
    with pytest.raises(ConfigError, match="population.kk: unknown"):
        population_config(space_from_dict(_pop_space(10, kk=2)))


def _rows(run: RunDir) -> list[tuple[Any, ...]]:
    with run.archive(readonly=True) as a:
        return [(r.id, r.recipe_hash, round(r.aggregate, 9), r.parents, r.generation, r.partial)
                for r in a.results()]


# ------------------------------------------------------------------------------------------ SIGKILL + resume


def _decisions(run: Path) -> list[tuple[str, Any]]:
    with RunDir.open(run).archive(readonly=True) as a:
        return [(e["kind"], e["data"]) for e in a.events() if e["kind"] in (*MANAGER_EVENTS, "member")]


@pytest.mark.slow
def test_sigkill_mid_generation_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    # 4 originals + 6 pairs x 2 in generation 1, then generation 2; kills inside a pair of each generation
    data = micro_space(optimizer={"name": "CMA", "budget": 22}, population=POP, test_top=1,
                       executor={"threads_per_worker": 1},
                       racing={"stages": [0.25, 0.5, 1.0], "level": 0.2, "min_items": 8})
    space = write_space(tmp_path / "space.yaml", data)
    runs = tmp_path / "runs"
    ref = run_cli("run", str(space), "--runs-dir", str(runs), "--name", "ref")
    out = ref.communicate(timeout=600)[0].decode()
    assert ref.returncode == 0, out[-2000:]
    marker = tmp_path / "hook"
    kill_at_hook(run_cli("run", str(space), "--runs-dir", str(runs), "--name", "k", hook="after_record@7", marker=marker),
             marker)
    assert len(_rows(RunDir.open(runs / "k"))) == 7  # killed after the first evaluation of the second pair
    kill_at_hook(run_cli("resume", str(runs / "k"), hook="after_record@12", marker=marker), marker)
    assert len(_rows(RunDir.open(runs / "k"))) == 19  # inside a pair of generation 2
    kill_at_hook(run_cli("resume", str(runs / "k"), hook="race_stage@1", marker=marker), marker)  # mid-race
    assert len(_rows(RunDir.open(runs / "k"))) == 19
    final = run_cli("resume", str(runs / "k"))
    out = final.communicate(timeout=600)[0].decode()
    assert final.returncode == 0, out[-2000:]

    got, want = _rows(RunDir.open(runs / "k")), _rows(RunDir.open(runs / "ref"))
    assert len(got) == 22 and got == want
    assert any(r[5] for r in want)  # some candidates were stopped by racing (against the k-th best member)
    assert _decisions(runs / "k") == _decisions(runs / "ref")
    with RunDir.open(runs / "k").archive(readonly=True) as a, RunDir.open(runs / "ref").archive(readonly=True) as b:
        assert len(a.events("session_start")) == 4
        assert {r.id: a.items(r.id) for r in a.results()} == {r.id: b.items(r.id) for r in b.results()}
        assert a.kinship_table() == pytest.approx(b.kinship_table())
        assert [(r.candidate_id, round(r.aggregate, 9)) for r in a.rescores()] == [
            (r.candidate_id, round(r.aggregate, 9)) for r in b.rescores()]
        assert a.rescores() and a.rescores()[0].status == "ok"  # re-scored with its merged parents

    # status and report read the same archive
    from evomerge.search.status import status_text

    text = status_text(runs / "k")
    assert "population: k=3" in text and "top-3:" in text and "last decision" in text
    from evomerge.report.html import write_report
    from evomerge.report.load import load_run

    rd = load_run(runs / "k")
    assert len(rd.candidates) == 22 and rd.test_scores
    assert {m.key for m in rd.members} >= {"add", "rev", "sort", "enc", "g1.1", "g2.1"}
    files = write_report(rd, tmp_path / "report")
    assert set(files.images) >= {"fitness", "tasks", "tree", "kinship", "gain"}, files.skipped
    assert files.html.is_file()

    # export a generation-2 child: its merged parents are rebuilt from their recipes, then it scores as archived
    from evomerge.search.export import export_candidate, verify_export

    with RunDir.open(runs / "k").archive(readonly=True) as a:
        child = max((r for r in a.results() if r.generation == 2 and r.ok), key=lambda r: r.aggregate)
        assert any(p.startswith("g1.") for p in child.parents)
    summary = export_candidate(runs / "k", tmp_path / "child", candidate_id=child.id, progress=False)
    got, want = verify_export(runs / "k", summary.out_dir, child.id)
    assert got == pytest.approx(want, abs=1e-6)
    card = (tmp_path / "child" / "README.md").read_text()
    assert "member `g1." in card and (tmp_path / "child" / "evomerge_recipe_chain.yaml").is_file()
    assert not [p for p in tmp_path.iterdir() if ".parents-" in p.name or p.name.endswith(".partial")]


def test_report_and_status_of_a_plain_search(tmp_path: Path) -> None:
    from evomerge.report.html import write_report
    from evomerge.report.load import load_run
    from evomerge.search.loop import run_search
    from evomerge.search.status import status_text

    space = space_from_dict(micro_space(optimizer={"name": "CMA", "budget": 6}, test_top=0))
    run = RunDir.create(tmp_path / "plain", space)
    w = RecipeScoreWorker()
    run_search(run, space, InProcessExecutor(lambda: w, penalty=space.penalty), progress=False)
    rd = load_run(run.path)
    assert len(rd.candidates) == 6 and rd.info["mode"].startswith("search")
    best = [m for m in rd.members if m.parents]
    assert len(best) == 1 and set(best[0].parents) <= {"add", "rev", "sort", "enc"}
    files = write_report(rd, tmp_path / "report")
    assert {"fitness", "tasks", "tree"} <= set(files.images)
    assert "population:" not in status_text(run.path)


class ShuffledExecutor:
    """Three slots; finished jobs come back newest first (as from several workers finishing out of order)."""

    def __init__(self, worker: RecipeScoreWorker) -> None:
        self.worker, self.jobs = worker, []

    @property
    def capacity(self) -> int:
        return 3

    def submit(self, job: Any) -> None:
        self.jobs.append(job)

    def pending(self) -> int:
        return len(self.jobs)

    def poll(self, timeout: float | None = None) -> list[Any]:
        out = [self.worker.evaluate(j) for j in reversed(self.jobs)]
        self.jobs = []
        return out

    def close(self) -> None:
        pass


def test_several_slots_fill_the_budget_out_of_order(tmp_path: Path) -> None:
    space = space_from_dict(_pop_space(30))
    run = RunDir.create(tmp_path / "wide", space)
    w = HashScoreWorker(lose_once={9})
    s = run_population_session(run, space, ShuffledExecutor(w), stop=StopFlag(), log=lambda m: None,
                               progress=False)
    rows = _rows(run)
    assert s.evaluations == len(rows) == 30
    assert len({r[0] for r in rows}) == len({r[1] for r in rows}) == 30
    assert sorted(cid for cid, attempt in w.calls if attempt == 0) == sorted(r[0] for r in rows)


@pytest.mark.slow
def _task_spy_worker(space: Any) -> tuple[Any, list[dict[str, tuple[str, ...]]]]:
    """A real worker over ``space`` that records each job's ``model_tasks`` (what a merged parent stands for)."""
    from evomerge.executors.worker import MergeEvalWorker, WorkerSpec

    worker = MergeEvalWorker(WorkerSpec(base=str(space.base_path), models={k: str(v) for k, v in space.models.items()},
                                        fitness=space.fitness))
    seen_tasks: list[dict[str, tuple[str, ...]]] = []
    evaluate = worker.evaluate

    def spy(job: Any) -> Any:
        seen_tasks.append(dict(job.model_tasks))
        return evaluate(job)

    worker.evaluate = spy  # type: ignore[method-assign]
    return worker, seen_tasks


def test_qp_pairs_of_merged_members_export_and_rebuild_from_the_written_files(tmp_path: Path) -> None:
    # pair merges by sequential QP: a generation-2 pair merges merged members, whose calibration rows are their
    # originals' tasks; the export rebuilds the whole chain and scores as archived, and its written recipes
    # (with calibration.yaml) rebuild the same weights with `evomerge merge` alone
    import yaml
    from safetensors.torch import load_file

    from evomerge.merge.recipe import Recipe
    from evomerge.method_data import merge_recipe_to_disk
    from evomerge.search.export import export_candidate, verify_export

    pop = {**POP, "max_generations": 2, "pair": {"method": "qp", "options": {"sequential": True}, "points": 1}}
    data = _pop_space(22, **pop)
    space = space_from_dict(data)
    run = RunDir.create(tmp_path / "qp", space)
    worker, seen_tasks = _task_spy_worker(space)
    run_population_session(run, space, InProcessExecutor(lambda: worker, penalty=space.penalty), stop=StopFlag(),
                           log=lambda m: None, progress=False)
    with run.archive(readonly=True) as a:
        results = a.results()
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert {r.method for r in results if r.generation > 0} == {"qp"}
        child = max((r for r in results if r.generation == 2 and all(p.startswith("g1.") for p in r.parents)),
                    key=lambda r: r.aggregate)
        members = a.member_candidates()
        first = Recipe.from_dict(a.get(members[child.parents[0]]).recipe)
    # the worker was told which tasks a merged parent stands for: the union of its originals'
    want = tuple(m.model for m in first.models)
    assert any(t.get(child.parents[0]) == want for t in seen_tasks)
    # ... and pairs of merged members split them by competence: the worse parent of a task is not calibrated on it
    split = [r for r in results if r.generation == 2 and r.recipe["options"].get("rows")]
    assert split, "no generation-2 pair split its parents' tasks"

    out = tmp_path / "child"
    export_candidate(run.path, out, candidate_id=child.id, progress=False)
    got, archived = verify_export(run.path, out, child.id)
    assert got == pytest.approx(archived, abs=1e-6)
    calib = yaml.safe_load((out / "calibration.yaml").read_text())
    assert set(calib["models"]) >= set(child.parents)
    from evomerge.paths import resolve_path as _resolve

    source = {t.name: str(_resolve(t.source("search")).resolve()) for t in space.fitness.tasks}
    assert calib["models"][child.parents[0]] == [source[k] for k in want]

    # rebuild from the written chain: each member into a folder named by its key, then the output
    chain = yaml.safe_load((out / "evomerge_recipe_chain.yaml").read_text())
    built: dict[str, str] = {}
    for step in chain:
        recipe = Recipe.from_dict(step["recipe"])
        assert recipe.options["calibration"] == str((out / "calibration.yaml").resolve())
        names = {k: built.get(k, k) for k in recipe.model_keys()}
        from evomerge.search.export import recipe_with_paths

        target = tmp_path / "rebuilt" / step["member"]
        merge_recipe_to_disk(recipe_with_paths(recipe, names), target, progress=False)
        built[step["member"]] = str(target)
    rebuilt, exported = load_file(str(tmp_path / "rebuilt" / "output" / "model.safetensors")), load_file(
        str(out / "model.safetensors"))
    assert rebuilt.keys() == exported.keys()
    for name, tensor in exported.items():
        assert (rebuilt[name].float() - tensor.float()).abs().max().item() <= 1e-5, name


def test_a_child_of_the_joint_merge_exports_and_scores_as_archived(tmp_path: Path) -> None:
    """A real QP run with the joint merge: the joint stands for every task in its children's calibration rows, and
    a generation-1 child of it exports (the chain rebuilds the joint first) and re-scores as archived."""
    from evomerge.search.export import export_candidate, verify_export

    pop = {**POP, "joint": True, "max_generations": 1, "pair_budget": 1,
           "pair": {"method": "qp", "options": {"sequential": True}, "points": 1, "parameters": {"ridge": 1e-4}}}
    space = space_from_dict(_pop_space(15, **pop))
    run = RunDir.create(tmp_path / "qpj", space)
    worker, seen_tasks = _task_spy_worker(space)
    summary = run_population_session(run, space, InProcessExecutor(lambda: worker, penalty=space.penalty),
                                     stop=StopFlag(), log=lambda m: None, progress=False)
    assert summary.evaluations == 15  # 4 originals, the joint, 10 pairs of 5 starting models
    with run.archive(readonly=True) as a:
        results = a.results()
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        joint = a.get(a.member_candidates()["joint"])
        assert joint is not None and joint.method == "qp" and joint.generation == 0
        assert joint.recipe["parameters"] == {"ridge": 1e-4} and len(joint.recipe["models"]) == 4
        child = max((r for r in results if r.generation == 1 and "joint" in r.parents), key=lambda r: r.aggregate)
    assert any(t.get("joint") == ("add", "rev", "sort", "enc") for t in seen_tasks)
    out = tmp_path / "child"
    export_candidate(run.path, out, candidate_id=child.id, progress=False)
    got, archived = verify_export(run.path, out, child.id)
    assert got == pytest.approx(archived, abs=1e-6)


def test_a_refine_escape_searches_the_best_members_merge_again_and_resumes(tmp_path: Path) -> None:
    """A saturated top-k escapes by refining its best member: the same parents, method and genome start, a new
    member whose lineage is those parents; a resumed run replays it (no orphans, the same archive)."""
    from evomerge.search.events import EventKind

    data = _pop_space(40, saturation=-1.0, max_escapes=1, refine=True, escape_pair_budget=4, max_revivals=0,
                      leader_first=False)
    run, summary, _ = _fake_pop(tmp_path, data)
    with run.archive(readonly=True) as a:
        plans = [e["data"] for e in a.events(EventKind.GENERATION_PLAN)]
        refine = [p for plan in plans for p in plan["plans"] if p.get("operator") == "refine"]
        assert len(refine) == 1 and refine[0]["a"] == refine[0]["b"] and refine[0]["budget"] == 4
        target = refine[0]["a"]
        done = next(e["data"] for e in a.events(EventKind.PAIR_DONE) if e["data"].get("operator") == "refine")
        members = a.member_candidates()
        made = a.get(members[target])
        assert done["a"] == target and sorted(done["parents"]) == sorted(made.parents)
        runs = [r for r in a.results() if r.generation == done["generation"] and sorted(r.parents) ==
                sorted(made.parents)]
        assert 1 <= len(runs) <= 4 and {r.method for r in runs} == {made.method}
        # its start is the member itself, answered by the archive: no evaluation repeats the member's genome
        assert made.genome is not None and all(r.genome["x"] != made.genome["x"] for r in runs)
        assert summary.evaluations == a.count()
        count = a.count()
    # resuming the finished run adds nothing and keeps its members
    space = space_from_dict(data)
    again = run_population_session(run, space, InProcessExecutor(lambda: HashScoreWorker(), penalty=space.penalty),
                                   stop=StopFlag(), log=lambda m: None, progress=False)
    with run.archive(readonly=True) as a:
        assert a.count() == count and again.evaluations == count
        assert a.member_candidates() == members


def test_screened_pairs_search_on_from_their_screen_and_resume_mid_search(tmp_path: Path) -> None:
    """Generation 1 screens its 6 pairs at their starting recipe, then searches the best 3 on (1 + 6 x 2 / 3 = 5
    evaluations each, the screen's replayed by the archive), and generation 2 its 4; a stop inside a search
    resumes to the same archive and decisions."""
    data = _pop_space(30, screen=0.5, max_generations=2, pair_budget=3)
    ref, summary, _ = _fake_pop(tmp_path, data, name="ref")
    screened = _events(ref, "pairs_screened")
    assert [e["generation"] for e in screened] == [1, 2] and len(screened[0]["screened"]) == 6
    assert len(screened[1]["screened"]) == 4 and [p["budget"] for p in screened[1]["plans"]] == [5, 5]
    kept = [(p["a"], p["b"]) for p in screened[0]["plans"]]
    assert len(kept) == 3 and all(p["budget"] == 5 and p["operator"] == "extend" for p in screened[0]["plans"])
    with ref.archive(readonly=True) as a:
        gen1 = [r for r in a.results() if r.generation == 1]
        members = a.member_candidates()
    by_pair: dict[tuple[str, ...], list[Any]] = {}
    for r in gen1:
        by_pair.setdefault(tuple(sorted(r.parents)), []).append(r)
    # 6 screens + 3 x 4 more; a kept pair's first evaluation is its screen (its starting genome), none repeated
    assert len(gen1) == 6 + 3 * 4
    for pair, recs in by_pair.items():
        if pair in {tuple(sorted(k)) for k in kept}:
            assert len(recs) == 5 and recs[0].genome["x"] == recs[0].genome["x0"]
            assert len({tuple(r.genome["x"]) for r in recs}) == 5
        else:
            assert len(recs) == 1
    # the kept pair's member is the best of its 5, under the screen's key
    done = [d for d in _events(ref, "pair_done") if d.get("operator") == "extend" and d["generation"] == 1]
    for d in done:
        recs = by_pair[tuple(sorted((d["a"], d["b"])))]
        best = max(recs, key=lambda r: (r.aggregate, -r.id))
        assert members[d["child"]] == best.id == d["candidate_id"] and d["evaluations"] == 5
    assert summary.evaluations == 30
    # status: one line per member (the searched-on child replaces its screen), the screen's progress
    from evomerge.report.load import load_run
    from evomerge.search.population.status import population_status_lines

    keys = [m.key for m in load_run(ref.path).members]
    gen2 = {d["child"] for d in _events(ref, "pair_done") if d["generation"] == 2}
    assert len(keys) == len(set(keys)) == 4 + 6 + len(gen2)
    # stopped inside the second searched-on pair (4 originals + 6 screens + 4 + 2), then resumed
    space = space_from_dict(data)
    run = RunDir.create(tmp_path / "cut", space)
    stop = StopFlag()
    w = StoppingWorker(stop, after=16)
    run_population_session(run, space, InProcessExecutor(lambda: w, penalty=space.penalty), stop=stop,
                           log=lambda m: None, progress=False)
    assert len(_rows(run)) == 16
    with run.archive(readonly=True) as a:
        lines = population_status_lines(a)
    assert "  generation 1: 6/6 pair merges done (screened at their starting recipe; 1/3 of the best searched on)" \
        in lines
    w2 = HashScoreWorker()
    s2 = run_population_session(run, space, InProcessExecutor(lambda: w2, penalty=space.penalty), stop=StopFlag(),
                                log=lambda m: None, progress=False)
    assert _rows(run) == _rows(ref) and s2.evaluations == 30 and len(w2.calls) == 14
    assert _events(run, "pairs_screened") == screened  # decided once, replayed on resume
    assert [(e["kind"], e["data"]) for e in _manager_events(run)] == [(e["kind"], e["data"])
                                                                      for e in _manager_events(ref)]
