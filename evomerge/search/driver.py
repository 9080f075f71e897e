"""One search session from start to end: open the run, build the executor, search, re-score the best, close.

Shared by ``evomerge run`` (new run directory) and ``evomerge resume`` (existing one). Ctrl-C or SIGTERM once:
stop asking and finish the candidates in flight; twice: abandon them (they are re-submitted on resume). While the
workers are still being started, the first signal aborts at once.

``run`` checks everything it can before the run directory exists (:mod:`~evomerge.search.preflight`) and removes
a run directory whose first session never started. ``resume`` refuses a run whose ``space.yaml`` was edited or
whose input models changed, continues the budget and workers last asked for, and starts no worker for a finished
run.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import RunDirError
from evomerge.models.fingerprint import fingerprint_changes, fingerprint_models
from evomerge.search.archive import Archive
from evomerge.search.events import EventKind
from evomerge.search.items import prepare_session_items
from evomerge.search.loop import rescore_best, run_search
from evomerge.search.population.session import run_population_session
from evomerge.search.preflight import check_ray_address, preflight
from evomerge.search.progress import SearchSummary
from evomerge.search.run import RunDir
from evomerge.search.run_space import (
    check_resumable,
    check_snapshot,
    given_raw,
    safe_overrides,
    snapshot_space,
    with_safe_fields,
)
from evomerge.search.run_state import pending_rescores
from evomerge.search.space import Space, load_space
from evomerge.search.stopping import SearchProgress, StopFlag, StoppingRules
from evomerge.search.workers import executor_kind, make_executor, worker_spec


@dataclass(frozen=True)
class SessionResult:
    run_dir: Path
    summary: SearchSummary | None
    rescored: list[int]
    interrupted: bool
    finished_before: str | None = None  # the run was finished already (why): no worker was started

    @property
    def failed_out(self) -> bool:
        """The search stopped because too many evaluations failed in a row."""
        return self.summary is not None and self.summary.failed_out


def _print(message: str) -> None:
    print(f"[evomerge] {message}", file=sys.stderr, flush=True)


class _Phase:
    """Whether the session is still starting its workers (a signal then aborts at once: nothing is in flight)."""

    def __init__(self) -> None:
        self.setup = True


@contextlib.contextmanager
def _graceful_signals(stop: StopFlag, log: Callable[[str], None], phase: _Phase | None = None) -> Iterator[None]:
    """First Ctrl-C/SIGTERM: finish in-flight work and stop; second: abandon it (KeyboardInterrupt). During
    ``phase.setup`` the first one aborts (KeyboardInterrupt)."""
    if sys.platform == "win32" or not _main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() or (phase is not None and phase.setup):
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


def nothing_to_do(archive: Archive, space: Space) -> str | None:
    """Why the run in ``archive`` is finished for ``space`` (its budget and stopping rules), or None when a session
    has something to do (evaluations, or test re-scores owed)."""
    if pending_rescores(archive, space.raw.test_top):
        return None
    done = archive.count()
    if done >= space.budget:
        return f"the budget of {space.budget} evaluations is used" + (
            " and the best are re-scored on the test split" if space.raw.test_top else "")
    if space.raw.population is not None:
        stops = archive.events(EventKind.STOP)
        reason = str(stops[-1]["data"].get("reason", "")) if stops else None
        if reason and not reason.startswith("budget"):
            return f"the population search stopped: {reason}"
        return None
    st = space.raw.stopping
    rules = StoppingRules(budget=space.budget, no_improvement=st.no_improvement, target=st.target)
    return rules.reason(SearchProgress.of((r.id, r.aggregate, r.ok, r.partial) for r in archive.results("search")), 0.0)


def run_session(run: RunDir, space: Space, *, address: str | None = None, progress: bool = True,
                log: Callable[[str], None] = _print, executor_factory: Callable[..., Any] | None = None
                ) -> SessionResult:
    """Search in ``run`` until a stopping rule fires, then re-score the best on the test split."""
    stop = StopFlag()
    phase = _Phase()
    with run.locked(), _graceful_signals(stop, log, phase):
        t0 = time.monotonic()
        with run.archive() as archive:
            done = archive.count()
            finished = nothing_to_do(archive, space)
        if finished is not None:
            log(f"run {run.path} is finished ({finished}); nothing to do, no worker started "
                "(raise the budget with `evomerge resume --budget N` to search on)")
            return SessionResult(run.path, None, [], False, finished)
        log(f"run {run.path}: {done}/{space.budget} evaluations done; starting "
            f"{space.raw.workers} worker(s) on {space.raw.device} (loading models and tasks)")
        racing = prepare_session_items(run, space, log)  # refuses task files changed since the run started
        spec = worker_spec(space, splits=("search",))
        factory = executor_factory or make_executor
        executor = factory(space, spec, address=address)
        phase.setup = False
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
            if not stop.is_set() and summary.final and space.raw.test_top > 0:
                rescored = rescore_best(run, space, executor, space.raw.test_top, log=log)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: in-flight candidates were abandoned; `evomerge resume` re-submits them")
            with contextlib.suppress(Exception), run.archive() as archive:
                archive.add_event(EventKind.SESSION_END, {"reason": "interrupted (abandoned in-flight work)"})
        finally:
            executor.close()
        return SessionResult(run.path, summary, rescored, interrupted or stop.is_set())


def _never_started(run: RunDir) -> bool:
    """Whether ``run`` holds nothing but what creating it wrote (no session started, nothing archived)."""
    try:
        with run.archive(readonly=True) as archive:
            return archive.count() == 0 and not archive.events(EventKind.SESSION_START)
    except RunDirError:
        return False


def start_run(space: Space, run_path: Path, *, address: str | None = None, progress: bool = True,
              log: Callable[[str], None] = _print, executor_factory: Callable[..., Any] | None = None,
              checks: bool = True) -> SessionResult:
    """Check everything (``checks``: :func:`~evomerge.search.preflight.preflight`), create the run directory,
    search. A failure before the first session started leaves no run directory behind."""
    RunDir.check_new(run_path)
    if checks:
        preflight(space, address=address, log=log)
    run = RunDir.create(run_path, space, overrides=safe_overrides(given_raw(space), space.raw))
    log(f"created {run.path} (space snapshot, archive, run.json)")
    try:
        return run_session(run, space, address=address, progress=progress, log=log,
                           executor_factory=executor_factory)
    except BaseException:
        if _never_started(run):
            shutil.rmtree(run.path, ignore_errors=True)
            log(f"removed {run.path}: its first session never started")
        raise


def check_models_unchanged(run: RunDir, archive: Archive, space: Space, log: Callable[[str], None]) -> None:
    """Refuse to resume when an input model changed since the run was created (fingerprints in the archive)."""
    stored = archive.get_meta("fingerprints")
    if stored is None:  # a run made before fingerprints: record them now
        archive.set_meta("fingerprints", fingerprint_models(space.model_paths()))
        log(f"{run.path}: model fingerprints recorded now (the run predates them: earlier sessions unchecked)")
        return
    changes = fingerprint_changes(stored, space.model_paths())
    if changes:
        shown = "\n  - ".join(changes[:10]) + (f"\n  ... and {len(changes) - 10} more" if len(changes) > 10 else "")
        raise RunDirError(f"cannot resume {run.path}: input models changed since the run was created, so the "
                          f"archive's scores are not scores of these models:\n  - {shown}\nRestore the models, "
                          "or start a new run with them")


def resume_run(run_path: Path, *, space_path: Path | None = None, budget: int | None = None,
               workers: int | None = None, address: str | None = None, progress: bool = True,
               log: Callable[[str], None] = _print, executor_factory: Callable[..., Any] | None = None
               ) -> SessionResult:
    """Continue a run; a changed space (``space_path``) is accepted only in the fields safe to change. The budget,
    workers and other safe fields asked for last (``run --budget``, an earlier resume) are kept unless changed."""
    run = RunDir.open(run_path)
    with run.archive(readonly=True) as archive:  # refuses a corrupt archive before anything else
        recorded = archive.get_meta("space")
    bare = snapshot_space(run, overrides=False)
    check_snapshot(run, bare, recorded)
    old = with_safe_fields(bare, run.overrides(), where=str(run.path / "overrides.json"))
    space = old
    if space_path is not None:
        space = load_space(space_path)
        changed = check_resumable(run, space, old)
        if changed:
            log(f"resuming with changed fields: {', '.join(changed)}")
    space = space.with_overrides(budget=budget, workers=workers)
    address_now = address or space.raw.executor.address
    if address_now and executor_kind(space, address_now) == "ray":
        check_ray_address(address_now)
    with run.archive() as archive:
        check_models_unchanged(run, archive, old, log)
        if space is not old:
            changed = check_resumable(run, space, old)
            if changed:
                archive.add_event(EventKind.SPACE_CHANGED, {"fields": changed, "budget": space.budget,
                                                            "workers": space.raw.workers})
    wanted = safe_overrides(bare.raw, space.raw)
    if wanted != run.overrides():
        run.save_overrides(wanted)
    return run_session(run, space, address=address, progress=progress, log=log, executor_factory=executor_factory)


def default_run_path(space: Space, name: str | None, runs_root: Path) -> Path:
    if name is not None and not name.strip():
        raise RunDirError("--name is empty: give the run a name (or leave --name out to use the space's name)")
    chosen = name or space.raw.name or (space.path.stem if space.path is not None else None)
    if not chosen:
        raise RunDirError("give the run a name with --name")
    if "/" in chosen or chosen in (".", ".."):
        raise RunDirError(f"--name {chosen!r}: a run name is one folder name (no '/')")
    return runs_root / chosen
