"""The Ray executor on a local Ray instance (2 CPUs, at most 2 workers) with the micro zoo.

Same scores as in-process, a SIGKILLed or hung worker is replaced and its job comes back as ``lost``, resource
requests the cluster cannot meet fail at once, resident memory stays flat, and a whole search through the loop
equals the in-process search.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.processes import wait_for_hook
from helpers.waiting import hook_text, wait_until

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # every test here runs on a local Ray instance

from evomerge.errors import ConfigError, EvomergeError  # noqa: E402
from evomerge.executors.base import EvalJob, EvalOutcome, Executor, InProcessExecutor  # noqa: E402
from evomerge.executors.ray_executor import RayExecutor  # noqa: E402
from evomerge.executors.simulated import SimulatedWorker, fake_score, simulated_worker  # noqa: E402
from evomerge.executors.worker import MergeEvalWorker, WorkerSpec  # noqa: E402
from evomerge.merge.params import ParamValue  # noqa: E402
from evomerge.merge.recipe import ModelEntry, Recipe  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Any:
    """One local Ray instance for the module (about 5 s to start); shut down only if we started it."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, namespace="evomerge-tests", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def micro(micro_zoo: Path) -> dict[str, Any]:
    from evomerge.fitness.spec import FitnessSpec
    from evomerge.zoo.build import SPECIALISTS

    root = micro_zoo
    raw = FitnessSpec.from_yaml(root / "fitness.yaml")
    fitness = FitnessSpec.from_dict({**raw.model_dump(exclude_none=True), "limit": 16, "tasks": [
        {**t.model_dump(exclude_none=True), "metric": "token_acc", "direction": None} for t in raw.tasks]})
    spec = WorkerSpec(base=str(root / "base"), models={s: str(root / s) for s in SPECIALISTS}, fitness=fitness,
                      threads=1)
    return {"root": root, "spec": spec, "skills": list(SPECIALISTS)}


def _recipe(skills: list[str], i: int) -> Recipe:
    if i % 3 == 2:
        return Recipe("ties", tuple(ModelEntry(s, {"weight": ParamValue.constant(0.3 + 0.1 * ((i + k) % 5)),
                                                   "density": ParamValue.constant(0.5)})
                                    for k, s in enumerate(skills)), base_model="base")
    return Recipe("task_arithmetic",
                  tuple(ModelEntry(s, {"weight": ParamValue.per_layer([0.2 + 0.05 * ((i + k) % 7), 0.7])})
                        for k, s in enumerate(skills)), base_model="base")


def _drain(executor: Executor, timeout: float = 400.0) -> list[EvalOutcome]:
    out: list[EvalOutcome] = []
    deadline = time.monotonic() + timeout
    while executor.pending():
        assert time.monotonic() < deadline, "executor did not finish in time"
        out += executor.poll(timeout=1.0)
    return out


@pytest.fixture(scope="module")
def reference(micro: dict[str, Any]) -> dict[int, float]:
    """In-process scores of the first 8 recipes (the executor-independent truth)."""
    worker = MergeEvalWorker(micro["spec"])
    executor = InProcessExecutor(lambda: worker)
    for i in range(8):
        executor.submit(EvalJob(i, _recipe(micro["skills"], i)))
    return {o.job.candidate_id: o.result.aggregate for o in _drain(executor)}


def _hook_env(tmp_path: Path, nth: int) -> dict[str, str]:
    return {"EVOMERGE_TEST_HOOK": f"evaluate@{nth}", "EVOMERGE_TEST_HOOK_FILE": str(tmp_path / "hook")}


def _wait_for(path: Path, timeout: float = 60.0, executor: Executor | None = None,
              outcomes: list[EvalOutcome] | None = None) -> str:
    """The marker's line once the hook wrote it (polling ``executor`` meanwhile, so its workers get jobs)."""

    def poll() -> None:
        got = executor.poll(timeout=0.05)  # type: ignore[union-attr]
        if outcomes is not None:
            outcomes.extend(got)

    return wait_until(lambda: hook_text(path), timeout, what=f"the hook {path.name}", interval=0.05,
                      between=poll if executor is not None else None)


def test_two_workers_score_like_in_process_and_spread_the_work(micro: dict[str, Any],
                                                               reference: dict[int, float]) -> None:
    with RayExecutor(micro["spec"], 2, cpus_per_worker=1) as executor:
        # one running job per worker plus one queued at each actor (prefetch), so no worker waits on the driver
        assert isinstance(executor, Executor) and executor.capacity == 4
        for i in range(8):
            executor.submit(EvalJob(i, _recipe(micro["skills"], i)))
        outcomes = _drain(executor)
        stats = executor.stats()
    assert sorted(o.job.candidate_id for o in outcomes) == list(range(8))
    assert not any(o.lost for o in outcomes) and all(o.result.ok for o in outcomes)
    for o in outcomes:
        assert o.result.aggregate == pytest.approx(reference[o.job.candidate_id], abs=1e-6)
    assert {o.worker for o in outcomes} == {"w0", "w1"}  # steady state: both workers got work
    assert sum(w["jobs"] for w in stats["workers"].values()) == 8
    assert all(w["busy_seconds"] > 0 and w["restarts"] == 0 for w in stats["workers"].values())


def test_sigkilled_worker_is_replaced_and_its_job_comes_back_lost(micro: dict[str, Any], reference: dict[int, float],
                                                                  tmp_path: Path) -> None:
    env = {"w1": _hook_env(tmp_path, 2)}  # worker w1 stops in its 2nd evaluation
    with RayExecutor(micro["spec"], 2, cpus_per_worker=1, worker_env=env) as executor:
        for i in range(6):
            executor.submit(EvalJob(i, _recipe(micro["skills"], i)))
        outcomes: list[EvalOutcome] = []
        pid = int(_wait_for(tmp_path / "hook", executor=executor, outcomes=outcomes).split("pid")[1])
        assert pid == executor.worker_pids()["w1"]
        os.kill(pid, signal.SIGKILL)
        outcomes += _drain(executor)
        lost = [o for o in outcomes if o.lost]
        assert len(lost) == 1 and lost[0].worker == "w1" and not lost[0].result.ok
        assert "died" in (lost[0].result.error or "")
        executor.submit(EvalJob(lost[0].job.candidate_id, lost[0].job.recipe, attempt=1))
        again = _drain(executor)
        stats = executor.stats()
    assert len(again) == 1 and again[0].result.ok and not again[0].lost
    done = [o for o in outcomes if not o.lost] + again
    assert sorted(o.job.candidate_id for o in done) == list(range(6))  # every job exactly once
    for o in done:
        assert o.result.aggregate == pytest.approx(reference[o.job.candidate_id], abs=1e-6)
    assert stats["workers"]["w1"]["restarts"] == 1 and stats["workers"]["w0"]["restarts"] == 0
    assert executor.worker_pids()["w1"] != pid


def test_hung_evaluation_past_timeout_is_lost_and_the_worker_replaced(micro: dict[str, Any], tmp_path: Path,
                                                                      reference: dict[int, float]) -> None:
    # the hook makes job 0 hang forever; the timeout leaves a loaded machine room for job 1's honest evaluation
    with RayExecutor(micro["spec"], 1, eval_timeout=20.0, worker_env={"*": _hook_env(tmp_path, 1)}) as executor:
        first_pid = executor.worker_pids()["w0"]
        executor.submit(EvalJob(0, _recipe(micro["skills"], 0)))
        executor.submit(EvalJob(1, _recipe(micro["skills"], 1)))
        t0 = time.monotonic()
        outcomes = _drain(executor)
        assert (tmp_path / "hook").exists()
    by_id = {o.job.candidate_id: o for o in outcomes}
    assert by_id[0].lost and "eval_timeout" in (by_id[0].result.error or "")
    assert by_id[1].result.ok and by_id[1].result.aggregate == pytest.approx(reference[1], abs=1e-6)
    assert time.monotonic() - t0 >= 20.0
    assert executor.stats()["workers"]["w0"]["restarts"] == 1
    assert executor.worker_pids()["w0"] != first_pid


def test_unmet_resource_requests_fail_at_once_with_a_clear_message(micro: dict[str, Any]) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"2 workers × 1 CPU and 1 GPU but the local Ray instance has 0 GPUs"):
        RayExecutor(micro["spec"], 2, gpus_per_worker=1)
    with pytest.raises(ConfigError, match="can place only 2"):
        RayExecutor(micro["spec"], 3, cpus_per_worker=1)
    assert time.monotonic() - t0 < 30  # at once: no waiting for resources that will never come


def test_worker_that_cannot_start_raises_instead_of_hanging(micro: dict[str, Any], tmp_path: Path) -> None:
    from dataclasses import replace

    bad = replace(micro["spec"], base=str(tmp_path / "no-such-model"))
    t0 = time.monotonic()
    with pytest.raises(EvomergeError, match="Ray worker w0 could not start"):
        RayExecutor(bad, 1)
    assert time.monotonic() - t0 < 300  # well before the 600 s startup timeout: the error is reported, not waited out


def test_resident_memory_does_not_grow_over_many_candidates(micro: dict[str, Any]) -> None:
    with RayExecutor(micro["spec"], 1) as executor:
        def batch(start: int, n: int) -> None:
            for i in range(start, start + n):
                executor.submit(EvalJob(i, _recipe(micro["skills"], i)))
            assert all(o.result.ok for o in _drain(executor))

        batch(0, 6)  # warm-up: caches, allocator pools
        before = executor.call("w0", "memory_bytes")["rss"]
        batch(6, 30)
        after = executor.call("w0", "memory_bytes")["rss"]
    assert after - before < max(16 << 20, 0.05 * before), (before, after)


def test_simulated_worker_is_reproducible_and_crashes_are_replaced() -> None:
    spec = WorkerSpec(base="-", models={}, fitness=None,
                      extra={"latency_mean": 0.05, "latency_cv": 0.5, "failure_rate": 0.2, "seed": 3})
    sim = SimulatedWorker(spec)
    job = EvalJob(7, Recipe("linear", (ModelEntry("a", {"weight": ParamValue.constant(0.4)}),)))
    assert sim.latency(job) == sim.latency(job) and sim.latency(job) != sim.latency(EvalJob(8, job.recipe))
    first, second = sim.evaluate(job), sim.evaluate(job)
    assert first.result == second.result
    if first.result.ok:
        assert first.result.aggregate == fake_score(job.recipe, 3)
    crashing = WorkerSpec(base="-", models={}, fitness=None, extra={"latency_mean": 0.05, "crash_rate": 0.5})
    with RayExecutor(crashing, 2, cpus_per_worker=0.5, worker_factory=simulated_worker) as executor:
        attempts: dict[int, int] = {}
        for i in range(12):
            executor.submit(EvalJob(i, job.recipe))
        done: dict[int, EvalOutcome] = {}
        deadline = time.monotonic() + 120
        while executor.pending():
            assert time.monotonic() < deadline
            for o in executor.poll(timeout=1.0):
                if o.lost and attempts.get(o.job.candidate_id, 0) < 8:
                    attempts[o.job.candidate_id] = o.job.attempt + 1
                    executor.submit(EvalJob(o.job.candidate_id, o.job.recipe, attempt=o.job.attempt + 1))
                else:
                    done[o.job.candidate_id] = o
        assert sorted(done) == list(range(12)) and all(not o.lost for o in done.values())
        assert executor.stats()["restarts"] == sum(attempts.values()) > 0


# ------------------------------------------------------------------------------------------ through the loop


def _space_file(tmp_path: Path, workers: int, budget: int) -> Path:
    import yaml

    data = {
        "name": "ray-micro", "seed": 0,
        "models": {"base": "zoo:micro/base",
                   "fine_tunes": {s: f"zoo:micro/{s}" for s in ("add", "rev", "sort", "enc")}},
        "fitness": {"batch_size": 64, "seed": 0, "limit": 16, "tasks": [
            {"name": s, "metric": "token_acc", "jsonl": {"search": f"zoo:micro/data/{s}/search.jsonl",
                                                         "test": f"zoo:micro/data/{s}/test.jsonl"}}
            for s in ("add", "rev", "sort", "enc")]},
        "methods": {"task_arithmetic": {"weight": [0.0, 1.2]}},
        "granularity": "per_layer",
        # RandomSearch: its asks do not depend on the order results arrive in, so 1 and 2 workers can be compared
        "optimizer": {"name": "RandomSearch", "budget": budget},
        "workers": workers, "device": "cpu",
        "executor": {"kind": "ray" if workers > 1 else "inprocess", "threads_per_worker": 1},
        "stopping": {"no_improvement": 1000},
        "progress_interval": 0,
        # racing inside the Ray workers too: small stages, a lax level, so the 64 items stop some candidates
        "racing": {"stages": [0.25, 0.5, 1.0], "level": 0.2, "min_items": 8},
    }
    path = tmp_path / f"space-{workers}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _search(tmp_path: Path, workers: int, budget: int, executor_of: Any = None) -> tuple[Any, list[Any], Any]:
    from evomerge.search.loop import run_search
    from evomerge.search.run import RunDir
    from evomerge.search.space import load_space
    from evomerge.search.workers import make_executor, worker_spec

    space = load_space(_space_file(tmp_path, workers, budget))
    run = RunDir.create(tmp_path / f"run-{workers}", space)
    spec = worker_spec(space)
    executor = executor_of(space, spec) if executor_of else make_executor(space, spec)
    try:
        run_search(run, space, executor, progress=False)
    finally:
        executor.close()
    with run.archive(readonly=True) as archive:
        return archive.results("search"), archive.events("requeued"), archive.items_of(None, "search")


def test_search_with_two_ray_workers_equals_the_in_process_search(tmp_path: Path) -> None:
    pytest.importorskip("evomerge.search.loop")
    local, _, local_items = _search(tmp_path, 1, 10)
    distributed, requeued, items = _search(tmp_path, 2, 10)
    assert len(local) == len(distributed) == 10 and not requeued
    ref = {r.recipe_hash: r for r in local}
    got = {r.recipe_hash: r for r in distributed}
    assert set(got) == set(ref)
    # each job races the bar it drew when sent, which with two workers depends on who finished first: a
    # complete candidate scores the same, and every item both runs scored scores the same
    assert any(r.partial for r in distributed) and any(r.partial for r in local)
    for h, r in got.items():
        if r.complete and ref[h].complete:
            assert r.aggregate == pytest.approx(ref[h].aggregate, abs=1e-6)
        mine, theirs = items[r.id], local_items[ref[h].id]
        assert set(mine) == set(theirs) == {"add", "rev", "sort", "enc"}
        for task, it in mine.items():
            s_ref, _ = theirs[task].dense()
            common = ~np.isnan(s_ref[it.index])
            np.testing.assert_allclose(it.scores[common], s_ref[it.index][common], atol=1e-6)
    assert {r.worker for r in distributed} == {"w0", "w1"}


def test_search_survives_a_sigkilled_worker_and_archives_every_candidate_once(tmp_path: Path) -> None:
    pytest.importorskip("evomerge.search.loop")
    marker = tmp_path / "hook"

    def executor_of(space: Any, spec: WorkerSpec) -> RayExecutor:
        return RayExecutor(spec, 2, cpus_per_worker=1, penalty=space.penalty,
                           worker_env={"w0": _hook_env(tmp_path, 3)})

    killed: list[int] = []

    def killer() -> None:
        pid = int(_wait_for(marker, timeout=120).split("pid")[1])
        killed.append(pid)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    records, requeued, _ = _search(tmp_path, 2, 10, executor_of)
    thread.join(timeout=5)
    assert killed, "the hook never fired"
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == 10 and len({r.recipe_hash for r in records}) == 10
    assert all(r.ok for r in records)
    assert len(requeued) == 1  # the killed candidate was evaluated again, once
    again = next(r for r in records if r.id == requeued[0]["data"]["candidate"])
    assert again.settings["attempt"] == 1


def test_driver_killed_with_ray_workers_resumes_and_requeues_in_flight_candidates(tmp_path: Path) -> None:
    """SIGKILL the driver of a 2-worker Ray search; `evomerge resume` re-submits what was in flight."""
    import subprocess
    import sys

    from evomerge.search.run import RunDir

    space, runs, marker = _space_file(tmp_path, 2, 8), tmp_path / "runs", tmp_path / "hook"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOMERGE_TEST_HOOK")}

    def cli(*args: str, **extra: str) -> subprocess.Popen[bytes]:
        # its own process group: the kill takes the driver's local Ray instance with it (Ray's node agents
        # outlive a SIGKILLed driver otherwise)
        return subprocess.Popen([sys.executable, "-m", "evomerge", *args, "--quiet"], env={**env, **extra},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    # the driver stops after archiving its 3rd candidate (workers never reach this point)
    proc = cli("run", str(space), "--runs-dir", str(runs), "--name", "k",
               EVOMERGE_TEST_HOOK="after_record@3", EVOMERGE_TEST_HOOK_FILE=str(marker))
    wait_for_hook(proc, marker, timeout=150)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    final = cli("resume", str(runs / "k"))
    out = final.communicate(timeout=240)[0].decode()
    assert final.returncode == 0, out[-2000:]
    with RunDir.open(runs / "k").archive(readonly=True) as archive:
        records = archive.results("search")
        sessions = archive.events("session_start")
    assert len(records) == 8 and len({r.id for r in records}) == len({r.recipe_hash for r in records}) == 8
    assert all(r.ok for r in records)
    assert len(sessions) == 2 and sessions[1]["data"]["resubmitted"]  # in flight at the kill, submitted again
    assert {r.worker for r in records} <= {"w0", "w1"}


def test_workers_set_their_threads_from_their_allotment(micro: dict[str, Any]) -> None:
    """Never inherited: a Ray worker of 1 CPU runs 1 torch thread; an in-process worker the CPUs it may use."""
    import dataclasses

    import torch

    from evomerge.executors.worker import available_cpus

    spec = dataclasses.replace(micro["spec"], threads=None)
    with RayExecutor(spec, 1, cpus_per_worker=1) as executor:
        assert executor.stats()["workers"]["w0"]["threads"] == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, available_cpus() + 3))  # something else than the allotment
        worker = MergeEvalWorker(spec)
        assert worker.threads == available_cpus() == torch.get_num_threads()
        assert worker.tier == "device" and worker.plan.choice == "device"
    finally:
        torch.set_num_threads(before)
