"""What a report shows, as plain data: candidates, population members, kinship, events.

:class:`RunData` is filled from a run's archive by :func:`evomerge.report.load.load_run` (the report reads
nothing else), or built directly in tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.search.events import MERGE_EVENTS, EventKind

SOLVED = 1.0 - 1e-6  # an item counts as solved at full marks (exact match 1, every token right)


@dataclass(frozen=True)
class CandidateRow:
    """One evaluation, in the order it was recorded."""

    id: int
    score: float
    ok: bool = True
    tasks: Mapping[str, float] = field(default_factory=dict)
    generation: int | None = None
    label: str = ""
    recipe: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class MemberRow:
    """A population member: an original (no parents) or the best child of a parent pair."""

    key: str
    score: float | None
    generation: int = 0
    parents: tuple[str, ...] = ()
    candidate_id: int | None = None
    tasks: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemsView:
    """Per-item results of some models on the search split: one row per model, each task's items in columns
    (NaN: the model has no result on that item)."""

    models: list[str]
    scores: dict[str, np.ndarray]  # task -> len(models) x items

    def solvable_tasks(self) -> list[str]:
        """Tasks whose item scores lie in [0, 1], where 'solved' (full marks) means something."""
        out = []
        for task, m in self.scores.items():
            finite = m[np.isfinite(m)]
            if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
                out.append(task)
        return out

    def solved_by_none(self) -> dict[str, list[int]]:
        """Per task, the items every model was scored on and none solved."""
        out = {}
        for task in self.solvable_tasks():
            m = self.scores[task]
            seen = np.isfinite(m).all(axis=0)
            out[task] = [int(j) for j in np.flatnonzero(seen & ~(np.nan_to_num(m, nan=0.0) >= SOLVED).any(axis=0))]
        return out

    def solved_by_one(self) -> dict[str, list[tuple[int, str]]]:
        """Per task, the items exactly one model solved, with that model."""
        out = {}
        for task in self.solvable_tasks():
            solved = np.nan_to_num(self.scores[task], nan=0.0) >= SOLVED
            only = np.flatnonzero(solved.sum(axis=0) == 1)
            out[task] = [(int(j), self.models[int(np.flatnonzero(solved[:, j])[0])]) for j in only]
        return out


@dataclass
class RunData:
    name: str
    candidates: list[CandidateRow] = field(default_factory=list)
    members: list[MemberRow] = field(default_factory=list)
    kinship: dict[tuple[str, str], float] = field(default_factory=dict)  # (a, b) sorted -> value
    metric: str = "pcc"
    events: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # space/run facts to print (method, budget, status...)
    test_scores: dict[str, Any] = field(default_factory=dict)  # held-out scores of the best, when recorded
    items: ItemsView | None = None  # per-item results of the top candidates and the originals, when recorded

    # -------------------------------------------------------------------------------------------------- views
    def best_candidate(self) -> CandidateRow | None:
        ok = [c for c in self.candidates if c.ok and math.isfinite(c.score)]
        return max(ok, key=lambda c: (c.score, -c.id)) if ok else None

    def member(self, key: str) -> MemberRow | None:
        return next((m for m in self.members if m.key == key), None)

    def kin(self, a: str, b: str) -> float:
        if a == b:
            return 0.0 if self.metric == "ed" else 1.0
        return self.kinship.get((a, b) if a <= b else (b, a), math.nan)

    def top_members(self, n: int) -> list[MemberRow]:
        scored = [m for m in self.members if m.score is not None and math.isfinite(m.score)]
        return sorted(scored, key=lambda m: (-float(m.score or 0.0), m.generation, m.key))[:n]

    def gains(self) -> list[tuple[str, float, float]]:
        """(child, parent kinship, gain = child − mean(parents)) for every child whose numbers are known."""
        out = []
        for m in self.members:
            if len(m.parents) != 2 or m.score is None:
                continue
            ps = [self.member(p) for p in m.parents]
            if any(p is None or p.score is None for p in ps):
                continue
            k = self.kin(*m.parents)
            gain = float(m.score) - sum(float(p.score) for p in ps if p is not None and p.score is not None) / 2
            out.append((m.key, k, gain))
        return out

    def generations(self) -> list[dict[str, Any]]:
        """generation_end events, in order (generation, top, best, best_score)."""
        return [e["payload"] for e in self.events if e.get("kind") == EventKind.GENERATION_END]

    def decisions(self) -> list[tuple[str, str]]:
        """(kind, reason) of every recorded decision, in order."""
        out = []
        for e in self.events:
            p = e.get("payload", {})
            if e.get("kind") == EventKind.GENERATION_PLAN:
                out.append((f"plan generation {p.get('generation')}", str(p.get("reason", ""))))
                if p.get("revival"):
                    rv = p["revival"]
                    keys = ", ".join(str(r.get("key")) for r in rv.get("revived", []))
                    out.append((f"revival {rv.get('revival')}", f"{rv.get('reason')}; revived {keys}"))
            elif e.get("kind") == EventKind.STOP:
                out.append(("stop", str(p.get("reason", ""))))
            elif e.get("kind") not in (*MERGE_EVENTS, EventKind.GENERATION_END, EventKind.POPULATION_START) \
                    and "reason" in p:
                out.append((str(e.get("kind")), str(p["reason"])))
        return out


def lineage(members: Sequence[MemberRow], key: str) -> list[str]:
    """Every ancestor of ``key`` back to the originals (breadth first, no repeats)."""
    by_key = {m.key: m for m in members}
    out: list[str] = []
    queue = list(by_key[key].parents) if key in by_key else []
    while queue:
        k = queue.pop(0)
        if k in out:
            continue
        out.append(k)
        if k in by_key:
            queue.extend(by_key[k].parents)
    return out
