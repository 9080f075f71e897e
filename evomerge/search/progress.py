"""Progress of a search: the periodic line while it runs, where its time went, what a session ended with."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import TextIO


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressLine:
    """Prints at most one line per ``interval`` seconds (and on every new best); ``interval`` 0 prints each."""

    def __init__(self, total: int, interval: float = 5.0, stream: TextIO | None = None, enabled: bool = True,
                 done_before: int = 0) -> None:
        self.total = total
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done_before = done_before  # evaluations of earlier sessions (not part of this session's rate)
        self.t0 = time.monotonic()
        self._last = -float("inf")

    def rate(self, done: int) -> float:
        """Evaluations per second in this session."""
        dt = time.monotonic() - self.t0
        n = done - self.done_before
        return n / dt if dt > 0 and n > 0 else 0.0

    def line(self, done: int, best: float | None, best_id: int | None, last: float | None = None) -> str:
        rate = self.rate(done)
        eta = (self.total - done) / rate if rate > 0 else None
        best_txt = "-" if best is None else f"{best:.4f} (#{best_id})"
        last_txt = "" if last is None else f" | last {last:.4f}"
        return (f"[evomerge] eval {done}/{self.total} | best {best_txt}{last_txt} | "
                f"{rate * 60:.1f} eval/min | ETA {format_duration(eta)}")

    def update(self, done: int, best: float | None, best_id: int | None, last: float | None = None,
               force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval or done >= self.total:
            self._last = now
            print(self.line(done, best, best_id, last), file=self.stream, flush=True)


@dataclass
class Timings:
    """Where this session's wall time went (seconds)."""

    setup: float = 0.0
    evaluation: float = 0.0  # inside workers: scoring (summed over workers)
    merging: float = 0.0  # inside workers: merging recipes into the resident model
    optimizer: float = 0.0  # ask, tell, decoding
    checkpoint: float = 0.0
    archive: float = 0.0
    waiting: float = 0.0  # the search blocked on the executor (covers evaluation when in-process)
    wall: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SearchSummary:
    """What one session of a search (plain or population) ended with."""

    evaluations: int
    failed: int
    best_id: int | None
    best: float | None
    stop_reason: str
    session: int
    timings: Timings
    final: bool = True  # the search is over (a stopping rule), not paused (a signal, a session's wall time)
    failed_out: bool = False  # stopped by stopping.max_consecutive_failures
