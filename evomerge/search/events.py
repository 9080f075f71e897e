"""The kinds of event a run's archive records, as one enum every writer and reader uses.

The archive stores the plain string (``EventKind.PAIR_DONE.value == "pair_done"``), as it always did, so archives
written before this enum read unchanged; an :class:`EventKind` compares equal to its string, so readers may test
``e["kind"] == EventKind.STOP`` on rows that hold ``"stop"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any


class EventKind(str, Enum):
    """What happened; the payload of each kind is written by the module named in its comment."""

    # a session of a search (search/loop.py, search/population/session.py, search/driver.py)
    SESSION_START = "session_start"  # {session, budget, workers, resubmitted, evaluations[, mode]}
    SESSION_END = "session_end"  # {session, reason, timings, evaluations, ...}
    SPACE_CHANGED = "space_changed"  # {fields, budget, workers}: a resume changed safe fields
    # the evaluation dispatcher (search/dispatch.py)
    TIMING = "timing"  # {session, timings, evaluations[, executor]}: a snapshot every few evaluations
    REQUEUED = "requeued"  # {candidate, attempt, worker, error, split}: a lost job submitted again
    # the plain loop (search/loop.py)
    REPLAYED = "replayed"  # {ids}: archived results told on resume (killed between archive and tell)
    CHECKPOINT_IGNORED = "checkpoint_ignored"  # {reason, evaluations}: no usable checkpoint; rebuilt from the archive
    # the population manager (search/population/manager.py, session.py)
    POPULATION_START = "population_start"  # {starting, k, metric, budget, explore, pair_budget}
    MEMBER = "member"  # {key, generation, parents, candidate_id, score, reason}: an original scored
    GENERATION_PLAN = "generation_plan"  # {generation, plans, reason[, revival][, escape]}
    PAIR_DONE = "pair_done"  # {generation, a, b, reason, child, score, candidate_id, evaluations, ok,
    #                          behaviour_distance, operator}
    JOINT_DONE = "joint_done"  # {generation: 0, parents, child, score, candidate_id, evaluations, ok, method}: the
    #                            joint merge of the starting models (population.joint)
    PAIRS_SCREENED = "pairs_screened"  # {generation, plans, screened}: the screened pairs searched on
    #                                    (population.screen; plans: operator extend) and every pair's screen score
    PAIR_SKIPPED = "pair_skipped"  # {generation, a, b, reason, distance, tol}: parents behave identically
    GENERATION_END = "generation_end"  # {generation, top, best, best_score, improved, stall, evaluations}
    STOP = "stop"  # {generation, reason, evaluations}
    EXCLUDED = "excluded"  # {generation, keys, reason}: failed members taken out of pairing

    def __str__(self) -> str:
        return self.value


# the population manager's decisions, replayed on resume
MANAGER_EVENTS: tuple[EventKind, ...] = (EventKind.POPULATION_START, EventKind.GENERATION_PLAN,
                                         EventKind.PAIR_DONE, EventKind.GENERATION_END, EventKind.STOP,
                                         EventKind.EXCLUDED, EventKind.PAIR_SKIPPED, EventKind.JOINT_DONE,
                                         EventKind.PAIRS_SCREENED)
# the events that add a merged member to a population (its parents: ``merge_parents``)
MERGE_EVENTS: tuple[EventKind, ...] = (EventKind.PAIR_DONE, EventKind.JOINT_DONE)


def merge_parents(payload: dict[str, object]) -> tuple[str, ...]:
    """The parents of the member a merge event added: a pair's ``a`` and ``b``, the joint merge's ``parents``."""
    parents = payload.get("parents")
    if isinstance(parents, (list, tuple)):
        return tuple(str(k) for k in parents)
    return str(payload["a"]), str(payload["b"])


@dataclass(frozen=True)
class MemberEntry:
    """A population member as the event log names it (``score`` as recorded: a number, or None where it was not)."""

    key: str
    score: Any
    generation: int
    parents: tuple[str, ...]
    candidate_id: int | None


def logged_members(events: Iterable[Mapping[str, Any]]) -> list[MemberEntry]:
    """The members an event log adds (originals by ``member``, children by a merge event), one per key: a screened
    pair searched on replaces its member (the same key, a later event)."""
    out: dict[str, MemberEntry] = {}
    for e in events:
        p = e["data"]
        if e["kind"] == EventKind.MEMBER:
            out[str(p["key"])] = MemberEntry(str(p["key"]), p.get("score"), 0, (), p.get("candidate_id"))
        elif e["kind"] in MERGE_EVENTS:
            out[str(p["child"])] = MemberEntry(str(p["child"]), p.get("score"), int(p["generation"]),
                                               merge_parents(p), p.get("candidate_id"))
    return list(out.values())
