"""Search spaces over the micro zoo for tests (built once in the tests' cache, tiny, fast)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

MICRO_FITNESS: dict[str, Any] = {
    "batch_size": 64,
    "seed": 0,
    "limit": 24,
    "tasks": [
        {"name": s, "metric": "token_acc",
         "jsonl": {"search": f"zoo:micro/data/{s}/search.jsonl", "test": f"zoo:micro/data/{s}/test.jsonl"}}
        for s in ("add", "rev", "sort", "enc")
    ],
}

MICRO_SPACE: dict[str, Any] = {
    "name": "micro",
    "seed": 0,
    "models": {"base": "zoo:micro/base",
               "fine_tunes": {s: f"zoo:micro/{s}" for s in ("add", "rev", "sort", "enc")}},
    "fitness": MICRO_FITNESS,
    "methods": {"task_arithmetic": {"weight": [0.0, 1.0]}, "ties": {"weight": [0.0, 1.0], "density": [0.3, 1.0]}},
    "granularity": "per_layer",
    "optimizer": {"name": "CMA", "budget": 8},
    "progress_interval": 0,
    "test_top": 1,
}


def micro_space(**overrides: Any) -> dict[str, Any]:
    """A copy of the micro space with top-level keys replaced (``optimizer={...}`` etc.)."""
    data = copy.deepcopy(MICRO_SPACE)
    data.update(copy.deepcopy(overrides))
    return data


def write_space(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


class RecipeScoreWorker:
    """A model-free worker: a smooth score of the recipe's numbers (peak at 0.7), failures on request.

    Lets loop tests run hundreds of candidates in a second; the real merge+evaluate path is covered by the
    micro-zoo tests.
    """

    def __init__(self, fail_ids: set[int] = frozenset(), lose_once: set[int] = frozenset()) -> None:
        self.fail_ids = set(fail_ids)
        self.lose_once = set(lose_once)
        self.calls: list[tuple[int, int]] = []

    def evaluate(self, job: Any) -> Any:
        from evomerge.executors.base import EvalOutcome
        from evomerge.fitness.result import EvalResult, TaskScore

        self.calls.append((job.candidate_id, job.attempt))
        if job.candidate_id in self.lose_once and job.attempt == 0:
            return EvalOutcome(job=job, result=EvalResult.failure("worker died", -1.0), worker="w0", lost=True)
        if job.candidate_id in self.fail_ids:
            return EvalOutcome(job=job, result=EvalResult.failure("boom", -1.0), worker="w0")
        values: list[float] = []
        for m in job.recipe.models:
            for pv in m.parameters.values():
                for entry in pv.entries:
                    values.extend(float(v) for v in entry.values)
        score = 1.0 - sum((v - 0.7) ** 2 for v in values) / max(1, len(values))
        task = TaskScore("fake", "score", score)
        return EvalOutcome(job=job, result=EvalResult(aggregate=score, tasks=(task,)), worker="w0",
                           eval_seconds=0.001)


class ItemScoreWorker(RecipeScoreWorker):
    """Model-free, with per-item results: item j of task t is solved when ``u(t, j) < p``, where p is the mean of
    the recipe's numbers (clipped to [0, 1]) and u a fixed uniform draw per item; so a higher p solves a superset
    of a lower p's items (paired differences all of one sign). A job with a bar is raced through the real
    ``plan_race`` / ``run_race``, as the merge worker does."""

    TASKS = {"a": 240, "b": 160}

    def __init__(self, **kw: Any) -> None:
        import numpy as np

        super().__init__(**kw)
        self.u = {t: np.random.default_rng(i).random(n) for i, (t, n) in enumerate(self.TASKS.items())}
        self.scored: list[dict[str, int]] = []  # items scored per call of the score function

    def lists(self) -> dict[str, Any]:
        from evomerge.fitness.items import ItemList

        return {t: ItemList(n, tuple(range(n)), f"content-{t}", True) for t, n in self.TASKS.items()}

    def score(self, p: float, items: Any = None) -> Any:
        from evomerge.fitness.items import ItemScores
        from evomerge.fitness.result import EvalResult, TaskScore

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
        from evomerge.executors.base import EvalOutcome
        from evomerge.fitness.racing import plan_race, run_race

        self.calls.append((job.candidate_id, job.attempt))
        values = [float(v) for m in job.recipe.models for pv in m.parameters.values() for e in pv.entries
                  for v in e.values]
        p = min(1.0, max(0.0, sum(values) / max(1, len(values))))
        if job.race is None:
            res = self.score(p)
        else:
            res = run_race(plan_race(job.race, self.lists()), lambda items: self.score(p, items))
        return EvalOutcome(job=job, result=res, worker="w0", eval_seconds=0.001)


def run_cli(*args: str, hook: str | None = None, marker: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m evomerge ARGS --quiet`` in a subprocess, optionally paused at a test hook (see hooks.py)."""
    env = dict(os.environ)
    env.pop("EVOMERGE_TEST_HOOK", None)
    if hook:
        env["EVOMERGE_TEST_HOOK"] = hook
        env["EVOMERGE_TEST_HOOK_FILE"] = str(marker)
    return subprocess.Popen([sys.executable, "-m", "evomerge", *args, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_at_hook(proc: subprocess.Popen[bytes], marker: Path, timeout: float = 180.0) -> None:
    """Wait until ``proc`` pauses at its hook (the marker file appears), then SIGKILL it."""
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"the run ended before the hook: {out[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("hook never reached")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marker.unlink()
