"""What benchmarks that search or score share: a timed search run, the demo zoo with its fitness."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.executors.base import Executor
from evomerge.fitness.spec import FitnessSpec
from evomerge.search.loop import run_search
from evomerge.search.progress import SearchSummary
from evomerge.search.run import RunDir
from evomerge.search.space import Space
from evomerge.zoo.build import ensure_zoo


@dataclass(frozen=True)
class TimedSearch:
    """One search's summary, wall time (from the first ask) and the executor's statistics."""

    run_dir: RunDir
    summary: SearchSummary
    wall_s: float
    started_at: float  # time.time() when the search began (archive timestamps are on that clock)
    stats: dict[str, Any]


def timed_search(run_path: Path, space: Space, executor: Executor) -> TimedSearch:
    """Create ``run_path`` and search in it with ``executor`` (statistics reset first), timing the loop alone."""
    reset = getattr(executor, "reset_stats", None)
    if callable(reset):
        reset()
    run_dir = RunDir.create(run_path, space)
    started_at = time.time()
    t0 = time.perf_counter()
    summary = run_search(run_dir, space, executor, progress=False)
    wall = time.perf_counter() - t0
    stats = getattr(executor, "stats", None)
    return TimedSearch(run_dir, summary, wall, started_at, stats() if callable(stats) else {})


def zoo_fitness(zoo_size: str, zoo_seed: int, metric: str) -> tuple[Path, FitnessSpec]:
    """The demo zoo (built on first use) and its built-in fitness with every task scored by ``metric``."""
    zoo = ensure_zoo(zoo_size, zoo_seed)
    return zoo, FitnessSpec.from_yaml(zoo / "fitness.yaml").with_metric(metric)
