"""One search session from start to end: open the run, build the executor, search, re-score the best, close.

Shared by ``evomerge run`` (new run directory) and ``evomerge resume`` (existing one). Ctrl-C or SIGTERM once:
stop asking and finish the candidates in flight; twice: abandon them (they are re-submitted on resume).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import RunDirError
from evomerge.search.events import EventKind
from evomerge.search.items import prepare_session_items
from evomerge.search.loop import rescore_best, run_search
from evomerge.search.population.session import run_population_session
from evomerge.search.progress import SearchSummary
from evomerge.search.run import RunDir
from evomerge.search.run_space import check_resumable, snapshot_space
from evomerge.search.space import Space, load_space
from evomerge.search.stopping import StopFlag
from evomerge.search.workers import make_executor, worker_spec


@dataclass(frozen=True)
class SessionResult:
    run_dir: Path
    summary: SearchSummary | None
    rescored: list[int]
    interrupted: bool


def _print(message: str) -> None:
    print(f"[evomerge] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _graceful_signals(stop: StopFlag, log: Callable[[str], None]) -> Iterator[None]:
    """First Ctrl-C/SIGTERM: finish in-flight work and stop; second: abandon it (KeyboardInterrupt)."""
    if sys.platform == "win32" or not _main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        stop.set(f"stopped by {name}")
        log(f"{name}: finishing the candidates in flight, then stopping (again to abandon them; "
            "`evomerge resume` continues either way)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def run_session(run: RunDir, space: Space, *, address: str | None = None, progress: bool = True,
                log: Callable[[str], None] = _print, executor_factory: Callable[..., Any] | None = None
                ) -> SessionResult:
    """Search in ``run`` until a stopping rule fires, then re-score the best on the test split."""
    stop = StopFlag()
    with run.locked(), _graceful_signals(stop, log):
        t0 = time.monotonic()
        with run.archive() as archive:
            done = archive.count()
        log(f"run {run.path}: {done}/{space.budget} evaluations done; starting "
            f"{space.raw.workers} worker(s) on {space.raw.device} (loading models and tasks)")
        racing = prepare_session_items(run, space, log)  # refuses task files changed since the run started
        spec = worker_spec(space, splits=("search",))
        factory = executor_factory or make_executor
        executor = factory(space, spec, address=address)
        setup = time.monotonic() - t0
        run.log(f"session setup took {setup:.1f}s ({type(executor).__name__}, capacity {executor.capacity})")
        interrupted = False
        summary: SearchSummary | None = None
        rescored: list[int] = []
        try:
            if space.raw.population is not None:
                summary = run_population_session(run, space, executor, stop=stop, log=log, progress=progress,
                                                 setup_seconds=setup, racing=racing)
            else:
                summary = run_search(run, space, executor, progress=progress, stop=stop, setup_seconds=setup,
                                     log=log, racing=racing)
            if not stop.is_set() and space.raw.test_top > 0:
                rescored = rescore_best(run, space, executor, space.raw.test_top, log=log)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: in-flight candidates were abandoned; `evomerge resume` re-submits them")
            with contextlib.suppress(Exception), run.archive() as archive:
                archive.add_event(EventKind.SESSION_END, {"reason": "interrupted (abandoned in-flight work)"})
        finally:
            executor.close()
        return SessionResult(run.path, summary, rescored, interrupted or stop.is_set())


def start_run(space: Space, run_path: Path, *, address: str | None = None, progress: bool = True,
              log: Callable[[str], None] = _print) -> SessionResult:
    run = RunDir.create(run_path, space)
    log(f"created {run.path} (space snapshot, archive, run.json)")
    return run_session(run, space, address=address, progress=progress, log=log)


def resume_run(run_path: Path, *, space_path: Path | None = None, budget: int | None = None,
               workers: int | None = None, address: str | None = None, progress: bool = True,
               log: Callable[[str], None] = _print) -> SessionResult:
    """Continue a run; a changed space (``space_path``) is accepted only in the fields safe to change."""
    run = RunDir.open(run_path)
    with run.archive(readonly=True):  # refuses a corrupt archive before anything else
        pass
    old = snapshot_space(run)
    space = old
    if space_path is not None:
        space = load_space(space_path)
        changed = check_resumable(run, space, old)
        if changed:
            log(f"resuming with changed fields: {', '.join(changed)}")
    space = space.with_overrides(budget=budget, workers=workers)
    if space is not old:
        changed = check_resumable(run, space, old)
        if changed:
            with run.archive() as archive:
                archive.add_event(EventKind.SPACE_CHANGED, {"fields": changed, "budget": space.budget,
                                                    "workers": space.raw.workers})
    return run_session(run, space, address=address, progress=progress, log=log)


def default_run_path(space: Space, name: str | None, runs_root: Path) -> Path:
    chosen = name or space.raw.name or (space.path.stem if space.path is not None else None)
    if not chosen:
        raise RunDirError("give the run a name with --name")
    if "/" in chosen or chosen in (".", ".."):
        raise RunDirError(f"--name {chosen!r}: a run name is one folder name (no '/')")
    return runs_root / chosen
