"""Where a run stands, read from its archive and files only (light: no torch, no search-space machinery).

The state is the last session's: ``running`` (its lock is held), ``interrupted`` (it started and never ended:
killed), ``stopped`` (it ended before the search was over: a signal, a session's wall time, failures in a row),
``finished`` (the budget is used, or a stopping rule ended the search, *and* the best candidates are re-scored on
the test split), or ``search done`` (the same, with test re-scores still to do). ``evomerge status`` shows it;
``resume`` starts no worker for a finished run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from evomerge.search.archive import Archive
from evomerge.search.events import EventKind
from evomerge.search.run import RunDir

DEFAULT_TEST_TOP = 3  # SpaceModel.test_top's default (a test keeps them equal)
DEFAULT_BUDGET = 100  # OptimizerSection.budget's default


@dataclass(frozen=True)
class RunState:
    """The last session's state and what it rests on."""

    state: str  # not started | running | interrupted | stopped | search done | finished
    reason: str  # why the last session ended (empty when it did not)
    evaluations: int
    budget: int
    pending_rescores: list[int] = field(default_factory=list)

    def text(self, run: RunDir, holder: str | None = None) -> str:
        """The state as ``evomerge status`` words it (with the way forward)."""
        again = f"continue with `evomerge resume {run.path}`"
        if self.state == "running":
            return f"running ({holder})" if holder else "running"
        if self.state == "finished":
            return f"finished: {self.reason}"
        if self.state == "search done":
            return (f"search done ({self.reason}); test re-scores of {self.pending_rescores} still to do: "
                    f"{again}")
        if self.state == "stopped":
            return f"stopped: {self.reason} ({again})"
        if self.state == "interrupted":
            return f"interrupted ({again})"
        return "not started"


def requested(run: RunDir, archive: Archive) -> dict[str, Any]:
    """The budget and ``test_top`` the run was last asked for: its overrides, else the last session's, else
    space.yaml's (or the defaults)."""
    overrides = run.overrides()
    starts = archive.events(EventKind.SESSION_START)
    last = starts[-1]["data"] if starts else {}
    try:
        data = yaml.safe_load(run.space_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        data = {}
    optimizer = data.get("optimizer") if isinstance(data.get("optimizer"), dict) else {}
    budget = overrides.get("optimizer.budget", last.get("budget", optimizer.get("budget", DEFAULT_BUDGET)))
    test_top = overrides.get("test_top", last.get("test_top", data.get("test_top", DEFAULT_TEST_TOP)))
    return {"budget": int(budget), "test_top": int(test_top)}


def pending_rescores(archive: Archive, test_top: int, split: str = "test") -> list[int]:
    """The best ``test_top`` candidates not re-scored on ``split`` yet (what a finished search still owes)."""
    if test_top <= 0:
        return []
    return [r.id for r in archive.best(test_top) if archive.rescore(r.id, split) is None]


def run_state(run: RunDir, archive: Archive, *, running: bool = False, budget: int | None = None,
              test_top: int | None = None) -> RunState:
    """The state of ``run``'s last session (``budget``/``test_top``: the run's, unless given)."""
    asked = requested(run, archive)
    budget = asked["budget"] if budget is None else budget
    test_top = asked["test_top"] if test_top is None else test_top
    evaluations = archive.count()
    pending = pending_rescores(archive, test_top)
    if running:
        return RunState("running", "", evaluations, budget, pending)
    starts = archive.events(EventKind.SESSION_START)
    if not starts:
        return RunState("not started", "", evaluations, budget, pending)
    ends = [e for e in archive.events(EventKind.SESSION_END) if e["id"] > starts[-1]["id"]]
    if not ends:
        return RunState("interrupted", "", evaluations, budget, pending)
    end = ends[-1]["data"]
    reason = str(end.get("reason", ""))
    over = evaluations >= budget or (bool(end.get("final")) and not reason.startswith("budget"))
    if over:
        why = f"budget of {budget} evaluations used" if evaluations >= budget else reason
        return RunState("search done" if pending else "finished", why, evaluations, budget, pending)
    return RunState("stopped", reason, evaluations, budget, pending)
