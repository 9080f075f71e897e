"""The population's lines of ``evomerge status``, read from the archive's events only (no torch, no models)."""

from __future__ import annotations

from evomerge.search.archive import Archive
from evomerge.search.events import MANAGER_EVENTS, EventKind
from evomerge.search.population.members import Member, top_k


def population_status_lines(archive: Archive, k: int | None = None) -> list[str]:
    """Current generation, the top-k with scores and the last decision (empty for a plain search)."""
    events = [e for e in archive.events() if e["kind"] in (*MANAGER_EVENTS, EventKind.MEMBER)]
    start = next((e["data"] for e in events if e["kind"] == EventKind.POPULATION_START), None)
    if start is None:
        return []
    k = k or int(start.get("k", 3))
    members: list[Member] = []
    for e in events:
        p = e["data"]
        if e["kind"] == EventKind.MEMBER:
            members.append(Member(str(p["key"]), float(p["score"]), 0, (), p.get("candidate_id")))
        elif e["kind"] == EventKind.PAIR_DONE:
            members.append(Member(str(p["child"]), float(p["score"]), int(p["generation"]), (p["a"], p["b"]),
                                  p.get("candidate_id")))
    lines = [f"population: k={start.get('k')}, kinship {start.get('metric')}, pair budget "
             f"{start.get('pair_budget')}, exploration {'on' if start.get('explore') else 'off'}"]
    plans = [e["data"] for e in events if e["kind"] == EventKind.GENERATION_PLAN]
    if plans:
        cur = plans[-1]
        done = sum(1 for e in events
                   if e["kind"] == EventKind.PAIR_DONE and e["data"]["generation"] == cur["generation"])
        lines.append(f"  generation {cur['generation']}: {done}/{len(cur['plans'])} pair merges done")
    top = top_k(members, k)
    if top:
        lines.append(f"  top-{k}: " + ", ".join(f"{m.key} {m.score:.4f}" + (f" (#{m.candidate_id})"
                                                                           if m.candidate_id is not None else "")
                                                for m in top))
    last = next((e for e in reversed(events) if e["kind"] in (EventKind.GENERATION_PLAN, EventKind.STOP)), None)
    if last is not None:
        what = "stop" if last["kind"] == EventKind.STOP else f"plan of generation {last['data'].get('generation')}"
        lines.append(f"  last decision ({what}): {last['data'].get('reason')}")
    return lines
