"""`evomerge status` on a real run directory stays light: no torch, transformers, nevergrad or ray imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.spaces import micro_space
from helpers.workers import RecipeScoreWorker

from evomerge.executors.base import InProcessExecutor
from evomerge.search.loop import run_search
from evomerge.search.population.session import run_population_session
from evomerge.search.run import RunDir
from evomerge.search.space import space_from_dict
from evomerge.search.stopping import StopFlag

HEAVY = ("torch", "transformers", "nevergrad", "ray", "safetensors", "matplotlib")
PROBE = """
import json, sys
from evomerge.cli import main
code = main(["status", *sys.argv[3:], sys.argv[1]])
print("IMPORTED " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[2]))))
sys.exit(code)
"""


def _status(run: Path, *flags: str) -> tuple[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, str(run), json.dumps(HEAVY), *flags], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    text, _, imported = done.stdout.rpartition("IMPORTED ")
    return text, json.loads(imported)


def test_status_of_a_population_and_a_plain_run_imports_no_heavy_library(micro_zoo: Path, tmp_path: Path) -> None:
    pop = space_from_dict(micro_space(optimizer={"name": "CMA", "budget": 12}, test_top=0,
                                      population={"k": 3, "pair_budget": 2, "saturation": None}))
    run = RunDir.create(tmp_path / "pop", pop)
    w = RecipeScoreWorker(lose_once={5})
    run_population_session(run, pop, InProcessExecutor(lambda: w, penalty=pop.penalty), stop=StopFlag(),
                           log=lambda m: None, progress=False)
    text, imported = _status(run.path)
    assert imported == [], imported
    assert "run pop: finished: budget of 12 evaluations used" in text and "evaluations 12/12 (0 failed)" in text
    assert "population: k=3" in text and "top-3:" in text and "re-queued after a lost worker: 1 time(s)" in text

    plain = space_from_dict(micro_space(optimizer={"name": "CMA", "budget": 4}, test_top=0))
    run = RunDir.create(tmp_path / "plain", plain)
    run_search(run, plain, InProcessExecutor(lambda: w, penalty=plain.penalty), progress=False)
    text, imported = _status(run.path)
    assert imported == [] and "evaluations 4/4" in text and "population:" not in text and "wall time" in text
    text, imported = _status(run.path, "--json")
    data = json.loads(text)
    assert imported == [] and data["evaluations"] == 4 and data["failed"] == 0 and data["best"]["id"] >= 1
    assert {"items_evaluated", "items_full", "wall_seconds", "eval_seconds"} <= set(data)
