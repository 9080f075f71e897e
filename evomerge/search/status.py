"""Views of a run read from its archive only: status (progress, rate, ETA, leaderboard, time), the same as a JSON
object for dashboards and scripts, and the summary.

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
from evomerge.search.population.status import population_status_lines, waste, waste_line
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
        lines += _items_lines(archive, counts)
        lines.append(waste_line(waste(archive)))
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


def _items_lines(archive: Archive, counts: dict[str, int]) -> list[str]:
    """Item evaluations of the search split against scoring every item, and candidates stopped by racing."""
    c = archive.item_counts("search")
    if not c["candidates"]:
        return []
    ratio = f", {c['full'] / c['evaluated']:.2f}x fewer" if c["evaluated"] and c["full"] > c["evaluated"] else ""
    return [f"  items evaluated {c['evaluated']} of {c['full']} (search split{ratio}); "
            f"{counts.get('partial', 0)} candidate(s) stopped early by racing"]


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


def status_json(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``evomerge status --json``: counts, item evaluations, the best candidate and time, as plain JSON data.

    ``items_evaluated``: item evaluations recorded (search split and re-scores); ``items_full``: what scoring
    every item of every task would have cost for the same evaluations (their ratio is what racing saved); both
    are over the evaluations that recorded per-item results (``items.*.evaluations``), null when none did (a run
    written before per-item results). ``best``: the best complete candidate by search score, with its held-out
    test score once re-scored. ``waste``: evaluations since the last improvement and on pairs of behaviourally
    identical parents (:func:`~evomerge.search.population.status.waste`)."""
    run = RunDir.open(run_dir)
    info = run.info()
    with run.archive(readonly=True) as archive:
        counts = archive.counts()
        starts = archive.events(EventKind.SESSION_START)
        ends = archive.events(EventKind.SESSION_END)
        holder = _running(run)
        if holder:
            state = "running"
        elif ends and len(ends) >= len(starts):
            state = "stopped"
        else:
            state = "interrupted" if starts else "not started"
        items = {split: archive.item_counts(split) for split in ("search", "test")}
        best_rows = archive.best(1)
        best: dict[str, Any] | None = None
        if best_rows:
            rec = best_rows[0]
            test = archive.rescore(rec.id, "test")
            best = {"id": rec.id, "search": rec.aggregate, "method": rec.method,
                    "test": test.aggregate if test is not None and test.status == "ok" else None}
        t = time_breakdown(archive)
        wasted = waste(archive)
    recorded = sum(c["candidates"] for c in items.values())
    return {
        "run": run.name, "state": state, "stop_reason": ends[-1]["data"].get("reason") if state == "stopped" else None,
        "seed": info.get("seed"), "sessions": len(starts),
        "budget": int(starts[-1]["data"].get("budget", 0)) if starts else 0,
        "evaluations": counts["evaluations"], "failed": counts["failed"], "partial": counts["partial"],
        "rescores": counts["rescores"],
        "items_evaluated": sum(c["evaluated"] for c in items.values()) if recorded else None,
        "items_full": sum(c["full"] for c in items.values()) if recorded else None,
        "items": {split: {"evaluations": c["candidates"], "evaluated": c["evaluated"], "full": c["full"]}
                  for split, c in items.items()},
        "best": best,
        "waste": wasted,
        "wall_seconds": float(t.get("wall", 0.0)), "eval_seconds": float(t.get("evaluation", 0.0)),
        "time": {k: float(v) for k, v in sorted(t.items())},
    }


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
