"""Stopping rules of a search: budget, wall time, no improvement for N evaluations, a target score, and N failed
evaluations in a row (something systematic is wrong: a NaN model, a timeout every candidate hits)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evomerge.search.events import EventKind

if TYPE_CHECKING:
    from evomerge.search.archive import Archive
    from evomerge.search.space import Space


class StopFlag:
    """Set from a signal handler (Ctrl-C, SIGTERM): stop asking, finish what is in flight."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class StoppingRules:
    """When a search stops asking for candidates (checked before every ask; in-flight work is finished)."""

    budget: int
    wall_time: float | None = None  # seconds of search, summed over sessions
    no_improvement: int | None = None  # evaluations since the best one
    target: float | None = None  # stop once the best aggregate reaches this
    max_consecutive_failures: int | None = None  # stop after this many failed evaluations in a row

    def reason(self, progress: SearchProgress, elapsed: float) -> str | None:
        """Why the search should stop now, or None."""
        if progress.evaluations >= self.budget:
            return f"budget of {self.budget} evaluations reached"
        failed = self.failure_reason(progress)
        if failed is not None:
            return failed
        if self.target is not None and progress.best is not None and progress.best >= self.target:
            return f"target {self.target:g} reached (best {progress.best:.6g})"
        if self.no_improvement is not None and progress.best is not None \
                and progress.since_best >= self.no_improvement:
            return f"no improvement for {progress.since_best} evaluations"
        if self.wall_time is not None and elapsed >= self.wall_time:
            return f"wall time of {self.wall_time:g}s reached"
        return None

    def failure_reason(self, progress: SearchProgress) -> str | None:
        """The stop for too many failed evaluations in a row (counted over sessions), or None."""
        limit = self.max_consecutive_failures
        if limit is not None and progress.failed_in_a_row >= limit:
            return f"{FAILURE_STOP}: the last {progress.failed_in_a_row} evaluations failed"
        return None


FAILURE_STOP = "too many failures in a row"  # how a failure stop's reason starts (stopping.max_consecutive_failures)


class SearchProgress:
    """Running counts over finished evaluations in archive order: total, best, evaluations since the best."""

    def __init__(self) -> None:
        self.evaluations = 0
        self.failed = 0
        self.best: float | None = None
        self.best_id: int | None = None
        self.since_best = 0
        self.failed_in_a_row = 0  # failed evaluations since the last successful one

    def add(self, candidate_id: int, aggregate: float, ok: bool, partial: bool = False) -> bool:
        """Count one evaluation; True when it is a new best (a candidate stopped by racing never is: its
        aggregate is an estimate, below the bar it lost to)."""
        self.evaluations += 1
        if not ok:
            self.failed += 1
        self.failed_in_a_row = 0 if ok else self.failed_in_a_row + 1
        if ok and not partial and math.isfinite(aggregate) and (self.best is None or aggregate > self.best):
            self.best, self.best_id, self.since_best = aggregate, candidate_id, 0
            return True
        self.since_best += 1
        return False

    @staticmethod
    def of(records: Iterable[tuple[int, float, bool] | tuple[int, float, bool, bool]]) -> SearchProgress:
        """Counts over ``(id, aggregate, ok[, partial])`` in archive order."""
        p = SearchProgress()
        for rec in records:
            p.add(*rec)
        return p


def stopping_rules(space: Space) -> StoppingRules:
    """The stopping rules ``space`` asks for (its ``optimizer.budget`` and ``stopping`` section)."""
    st = space.raw.stopping
    return StoppingRules(budget=space.budget, wall_time=st.wall_time, no_improvement=st.no_improvement,
                         target=st.target, max_consecutive_failures=st.max_consecutive_failures)


def resume_failure_streak(archive: Archive, progress: SearchProgress, say: Callable[[str], None]) -> None:
    """After a session that stopped for failures in a row, a resume counts them afresh (the user changed
    something, e.g. ``executor.eval_timeout``); after a crash the count goes on."""
    ends = archive.events(EventKind.SESSION_END)
    if ends and ends[-1]["data"].get("failures") and progress.failed_in_a_row:
        say(f"resuming after {progress.failed_in_a_row} failed evaluations in a row: counting them afresh")
        progress.failed_in_a_row = 0
