"""Text views of a run read from its archive only: status (progress, rate, ETA, leaderboard, time) and summary.

Opened read-only, so ``evomerge status`` is safe while the search writes; light (no torch, no nevergrad), so it
answers at once.
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from pathlib import Path
from typing import Any

from evomerge.search.archive import Archive, CandidateRecord
from evomerge.search.events import EventKind
from evomerge.search.population.status import population_status_lines
from evomerge.search.progress import format_duration
from evomerge.search.run import LOCK_FILE, RunDir
from evomerge.search.run_state import run_state

TIME_PARTS = ("evaluation", "merging", "optimizer", "checkpoint", "archive", "setup")


def time_breakdown(archive: Archive) -> dict[str, float]:
    """Seconds by part, summed over sessions (each session's last timing snapshot), plus ``wall``."""
    last: dict[int, dict[str, float]] = {}
    for ev in archive.events():
        if ev["kind"] in (EventKind.TIMING, EventKind.SESSION_END) and "timings" in ev["data"]:
            last[int(ev["data"].get("session", 0))] = ev["data"]["timings"]
    total: dict[str, float] = {}
    for t in last.values():
        for k, v in t.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def _running(run: RunDir) -> str | None:
    """The holder of the run's lock, if a process is running it."""
    lock = run.path / LOCK_FILE
    if not lock.is_file():
        return None
    with open(lock, encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


def _task_text(scores: dict[str, Any]) -> str:
    return " ".join(f"{k} {v['value']:.3f}" for k, v in scores.items())


def leaderboard(archive: Archive, k: int = 5) -> list[str]:
    rows = archive.best(k)
    if not rows:
        return ["  (no successful evaluation yet)"]
    out = [f"  {'rank':>4} {'id':>5} {'method':<16} {'search':>8} {'test':>8}  tasks (search)"]
    for i, r in enumerate(rows, 1):
        test = archive.rescore(r.id, "test")
        test_txt = f"{test.aggregate:8.4f}" if test is not None and test.status == "ok" else f"{'-':>8}"
        out.append(f"  {i:>4} {r.id:>5} {r.method:<16} {r.aggregate:8.4f} {test_txt}  {_task_text(r.scores)}")
    return out


def status_text(run_dir: str | os.PathLike[str], top: int = 5) -> str:
    """Progress, rate, ETA, the leaderboard and where the wall time went."""
    run = RunDir.open(run_dir)
    info = run.info()
    with run.archive(readonly=True) as archive:
        records = archive.results("search")
        counts = archive.counts()
        starts = archive.events(EventKind.SESSION_START)
        holder = _running(run)
        now = run_state(run, archive, running=holder is not None)
        budget = now.budget
        lines = [f"run {run.name}: {now.text(run, holder)}",
                 f"  evaluations {counts['evaluations']}/{budget} ({counts['failed']} failed), "
                 f"sessions {len(starts)}, seed {info.get('seed')}"]
        lines += _rate_lines(records, budget, starts)
        lines.append("leaderboard (aggregate, higher is better):")
        lines += leaderboard(archive, top)
        lines += population_status_lines(archive)
        t = time_breakdown(archive)
        if t.get("wall"):
            wall = t["wall"]
            parts = ", ".join(f"{p} {t.get(p, 0.0):.1f}s ({100 * t.get(p, 0.0) / wall:.1f}%)" for p in TIME_PARTS)
            lines.append(f"wall time {wall:.1f}s: {parts}")
            per_worker = t.get("evaluation", 0.0) + t.get("merging", 0.0)
            if per_worker > wall * 1.05:
                lines.append(f"  (evaluation and merging are summed over workers: {per_worker / wall:.2f} "
                             "worker-seconds per second of wall time)")
        requeued = archive.events(EventKind.REQUEUED)
        if requeued:
            lines.append(f"re-queued after a lost worker: {len(requeued)} time(s)")
    return "\n".join(lines)


def _rate_lines(records: list[CandidateRecord], budget: int, starts: list[dict[str, Any]]) -> list[str]:
    if not records or not starts:
        return []
    session = max(r.session for r in records)
    this = [r for r in records if r.session == session]
    t0 = next((e["time"] for e in starts if e["data"].get("session") == session), this[0].created_at)
    span = max(1e-9, this[-1].created_at - t0)
    rate = len(this) / span
    left = max(0, budget - len(records))
    eta = left / rate if rate > 0 else math.inf
    ago = time.time() - records[-1].created_at
    return [f"  rate {rate * 60:.1f} eval/min (this session), ETA {format_duration(eta) if left else '-'}, "
            f"last result {format_duration(ago)} ago"]


def summary_text(run_dir: str | os.PathLike[str]) -> str:
    """What ``run``/``resume`` print at the end: the best candidates and how to go on."""
    run = RunDir.open(Path(run_dir))
    with run.archive(readonly=True) as archive:
        counts = archive.counts()
        lines = [f"{run.path}: {counts['evaluations']} evaluations ({counts['failed']} failed)"]
        lines += leaderboard(archive, 5)
        t = time_breakdown(archive)
        if t.get("wall"):
            lines.append(f"evaluation took {100 * t.get('evaluation', 0.0) / t['wall']:.1f}% of the wall time "
                         f"({t['wall']:.1f}s)")
    return "\n".join(lines)


def failure_text(run_dir: str | os.PathLike[str], stop_reason: str | None = None) -> str | None:
    """What went wrong when a search has nothing to export: it stopped for failures in a row (``stop_reason``),
    or no evaluation succeeded. None when the search has a successful candidate and did not fail out."""
    run = RunDir.open(Path(run_dir))
    with run.archive(readonly=True) as archive:
        counts = archive.counts()
        failed = [r for r in archive.results("search") if not r.ok]
    if stop_reason is None and (counts["ok"] or not counts["evaluations"]):
        return None
    last = (failed[-1].error or "no error text").strip().splitlines()[0][:300] if failed else ""
    what = (f"the search stopped: {stop_reason}" if stop_reason is not None
            else f"none of the {counts['evaluations']} evaluations succeeded")
    return (f"evomerge: {what} (last error: {last}). Something systematic is wrong (a model with NaN weights, "
            f"an executor.eval_timeout every candidate hits, a broken task): see {run.path / 'log.txt'}. "
            "Nothing worth exporting; after a fix `evomerge resume` counts the failures afresh")
