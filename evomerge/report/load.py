"""Read a run directory's ``archive.sqlite`` into :class:`RunData` (the report reads nothing else).

Both kinds of run: a plain search (candidates over evaluations, the best's per-task scores, a family tree of the
best with the original models as its parents) and a population run (members and their parents from the
``member``/``pair_done`` events, generations, kinship of the top models, merge gain vs parent kinship).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from evomerge.errors import RunDirError
from evomerge.report.data import CandidateRow, ItemsView, MemberRow, RunData
from evomerge.search.archive import FILE_NAME, Archive, CandidateRecord
from evomerge.search.events import EventKind, logged_members
from evomerge.search.population.status import waste


def find_archive(run_dir: str | os.PathLike[str]) -> Path:
    """The archive of ``run_dir`` (RunDirError naming what was looked for when missing)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"run directory {run} does not exist")
    path = run / FILE_NAME
    if not path.is_file():
        raise RunDirError(f"{run}: no archive found (looked for {FILE_NAME})")
    return path


def _tasks(rec: CandidateRecord | Any) -> dict[str, float]:
    return {k: float(v["value"]) for k, v in rec.scores.items() if isinstance(v, dict) and "value" in v}


def _label(rec: CandidateRecord) -> str:
    if rec.generation == 0 and len(rec.parents) == 1:
        return str(rec.parents[0])
    if rec.settings.get("mode") == "population":
        return " x ".join(map(str, rec.parents))
    return rec.method


def load_run(run_dir: str | os.PathLike[str], top_items: int = 8) -> RunData:
    """Candidates, members, kinship, events and test scores of a run (plain search or population), and the
    per-item results of the ``top_items`` best complete candidates and the originals (when scored)."""
    with Archive.open(find_archive(run_dir), readonly=True) as archive:
        records = archive.results("search")
        by_id = {r.id: r for r in records}
        rows = [CandidateRow(r.id, r.aggregate, r.ok, _tasks(r), r.generation, _label(r), r.recipe, r.error)
                for r in records]
        raw_events = archive.events()
        events = [{"kind": e["kind"], "payload": e["data"], "time": e["time"]} for e in raw_events]
        start = next((e["data"] for e in raw_events if e["kind"] == EventKind.POPULATION_START), None)
        models = archive.get_meta("models", {}) or {}
        originals = [k for k in models if k != "base"]
        info: dict[str, Any] = {"base": models.get("base"), "models": ", ".join(originals),
                                "seed": archive.get_meta("seed")}
        sessions = [e["data"] for e in raw_events if e["kind"] == EventKind.SESSION_START]
        if sessions:
            info["budget"] = sessions[-1].get("budget")
        ends = [e["data"] for e in raw_events if e["kind"] == EventKind.SESSION_END]
        info["status"] = (f"stopped: {ends[-1].get('reason')}" if ends and len(ends) >= len(sessions)
                          else "running or interrupted")
        if start is not None:
            metric = str(start.get("metric", "pcc"))
            info["population"] = (f"k={start.get('k')}, metric={metric}, pair_budget={start.get('pair_budget')}, "
                                  f"explore={start.get('explore')}")
            members = _population_members(raw_events, by_id)
        else:
            metric = "pcc"
            info["mode"] = "search over the whole genome"
            members = _search_members(archive, originals)
        kin = {(a, b): v for (a, b, _m), v in archive.kinship_table(metric).items()}
        tests: dict[str, str] = {}
        for r in archive.best(len(records) or 1, rank_by="test"):
            res = archive.rescore(r.id, "test")
            if res is None:
                continue
            tests[f"test (#{r.id})"] = f"{res.aggregate:.4f} " + ", ".join(
                f"{k} {v['value']:.3f}" for k, v in res.scores.items())
        items = _items_view(archive, raw_events, top_items)
        w = waste(archive)
        info["evaluations since the last improvement"] = w["since_improvement"]
        if w["identical_pairs"] is not None:
            info["evaluations on behaviourally identical parents"] = (
                f"{w['identical_pairs']} ({w['identical_pair_merges']} pair merge(s); {w['pairs_skipped']} "
                "such pair(s) skipped)")
    return RunData(Path(run_dir).resolve().name, rows, members, kin, metric, events, info, tests, items)


def _items_view(archive: Archive, events: list[dict[str, Any]], top: int) -> ItemsView | None:
    """The top complete candidates (``#ID``) and the scored originals (by name), as rows of item results."""
    rows: dict[int, str] = {r.id: f"#{r.id}" for r in archive.best(top)}
    for e in events:
        if e["kind"] == EventKind.MEMBER and e["data"].get("candidate_id") is not None:
            cid = int(e["data"]["candidate_id"])
            rows[cid] = str(e["data"]["key"]) + (f" (#{cid})" if cid in rows else "")
    if not rows:
        return None
    ids = list(rows)
    matrix = archive.item_matrix(ids, "search")
    if not matrix:
        return None
    return ItemsView([rows[i] for i in ids], {task: s for task, (s, _w) in sorted(matrix.items())})


def _population_members(events: list[dict[str, Any]], by_id: dict[int, CandidateRecord]) -> list[MemberRow]:
    out = []
    for m in logged_members(events):
        rec = by_id.get(m.candidate_id) if m.candidate_id is not None else None
        out.append(MemberRow(m.key, _finite(m.score), m.generation, m.parents, m.candidate_id,
                             _tasks(rec) if rec else {}))
    return out


def _search_members(archive: Archive, originals: list[str]) -> list[MemberRow]:
    """The originals (unscored) and the best candidate with the models of its recipe as its parents."""
    out = [MemberRow(k, None, 0) for k in originals]
    best = archive.best(1)
    if best:
        r = best[0]
        parents = tuple(str(p) for p in r.parents if str(p) in originals)
        out.append(MemberRow(f"#{r.id}", r.aggregate, 1, parents, r.id, _tasks(r)))
    return out


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
