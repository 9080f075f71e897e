"""The population's lines of ``evomerge status``, read from the archive's events only (no torch, no models)."""

from __future__ import annotations

from typing import Any

from evomerge.search.archive import Archive
from evomerge.search.events import MANAGER_EVENTS, EventKind, logged_members
from evomerge.search.population.members import Member, top_k

DEFAULT_IDENTICAL_TOL = 0.002  # population.identical_tol's default, for runs that did not record theirs


def waste(archive: Archive) -> dict[str, Any]:
    """Evaluations a search spent without gain.

    ``since_improvement``: complete search evaluations archived after the best one (what the run spent since it
    last improved); ``identical_pairs``: evaluations of pair merges whose parents scored the items identically
    (weighted mean absolute item difference at most the run's ``identical_tol``: their child was predicted to
    equal them), ``identical_pair_merges`` how many such merges ran, ``pairs_skipped`` how many the manager
    skipped instead; the last three are None for a plain search or a run without per-item results.
    """
    records = [r for r in archive.results("search") if r.complete]
    since = 0
    if records:
        best = max(records, key=lambda r: (r.aggregate, -r.id))
        since = sum(1 for r in archive.results("search") if r.id > best.id)
    out: dict[str, Any] = {"since_improvement": since, "identical_pairs": None, "identical_pair_merges": None,
                           "pairs_skipped": None}
    start = archive.events(EventKind.POPULATION_START)
    if not start:
        return out
    tol = start[0]["data"].get("identical_tol", DEFAULT_IDENTICAL_TOL)
    tol = DEFAULT_IDENTICAL_TOL if tol is None else float(tol)
    done = archive.events(EventKind.PAIR_DONE)
    known = [e["data"] for e in done if e["data"].get("behaviour_distance") is not None]
    if done and not known:
        return out
    same = [p for p in known if float(p["behaviour_distance"]) <= tol]
    out.update(identical_pairs=sum(int(p.get("evaluations", 0)) for p in same), identical_pair_merges=len(same),
               pairs_skipped=len(archive.events(EventKind.PAIR_SKIPPED)))
    return out


def waste_line(w: dict[str, Any]) -> str:
    text = f"  waste: {w['since_improvement']} evaluation(s) since the last improvement"
    if w["identical_pairs"] is not None:
        text += (f", {w['identical_pairs']} on {w['identical_pair_merges']} pair(s) of behaviourally identical "
                 f"parents, {w['pairs_skipped']} such pair(s) skipped")
    return text


def population_status_lines(archive: Archive, k: int | None = None) -> list[str]:
    """Current generation, the top-k with scores and the last decision (empty for a plain search)."""
    events = [e for e in archive.events() if e["kind"] in (*MANAGER_EVENTS, EventKind.MEMBER)]
    start = next((e["data"] for e in events if e["kind"] == EventKind.POPULATION_START), None)
    if start is None:
        return []
    k = k or int(start.get("k", 3))
    members = [Member(m.key, float(m.score), m.generation, m.parents, m.candidate_id)
               for m in logged_members(events)]
    lines = [f"population: k={start.get('k')}, kinship {start.get('metric')}, pair budget "
             f"{start.get('pair_budget')}, exploration {'on' if start.get('explore') else 'off'}"
             + (f", niche alpha {start['niche_alpha']}, partner {start.get('partner')}"
                if "niche_alpha" in start else "")]
    joint = next((e["data"] for e in events if e["kind"] == EventKind.JOINT_DONE), None)
    if joint is not None:
        lines.append(f"  joint merge of {', '.join(map(str, joint['parents']))}: {joint['child']} "
                     f"{float(joint['score']):.4f} (#{joint['candidate_id']}, {joint['evaluations']} evaluation(s))")
    plans = [e["data"] for e in events if e["kind"] == EventKind.GENERATION_PLAN]
    if plans:
        cur = plans[-1]
        done = [e["data"] for e in events
                if e["kind"] == EventKind.PAIR_DONE and e["data"]["generation"] == cur["generation"]]
        first = [d for d in done if d.get("operator") != "extend"]
        line = f"  generation {cur['generation']}: {len(first)}/{len(cur['plans'])} pair merges done"
        screened = next((e["data"] for e in events if e["kind"] == EventKind.PAIRS_SCREENED
                         and e["data"]["generation"] == cur["generation"]), None)
        if cur.get("screen"):
            line += " (screened at their starting recipe" + (
                f"; {len(done) - len(first)}/{len(screened['plans'])} of the best searched on)"
                if screened is not None else ")")
        lines.append(line)
    top = top_k(members, k)
    if top:
        lines.append(f"  top-{k}: " + ", ".join(f"{m.key} {m.score:.4f}" + (f" (#{m.candidate_id})"
                                                                           if m.candidate_id is not None else "")
                                                for m in top))
    ends = [e["data"] for e in events if e["kind"] == EventKind.GENERATION_END]
    if ends and start.get("niche_alpha"):
        lines.append(f"  parents (top-{k} by niche fitness, alpha {start['niche_alpha']}) after generation "
                     f"{ends[-1].get('generation')}: {', '.join(map(str, ends[-1].get('top', [])))}")
    last = next((e for e in reversed(events) if e["kind"] in (EventKind.GENERATION_PLAN, EventKind.STOP)), None)
    if last is not None:
        what = "stop" if last["kind"] == EventKind.STOP else f"plan of generation {last['data'].get('generation')}"
        lines.append(f"  last decision ({what}): {last['data'].get('reason')}")
    return lines
