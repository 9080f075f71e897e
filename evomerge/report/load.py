"""Read a run directory's archive into :class:`RunData` (the report reads nothing else)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from evomerge.errors import RunDirError
from evomerge.report.data import CandidateRow, MemberRow, RunData


def find_store(run_dir: str | os.PathLike[str]) -> Path:
    """The population store of ``run_dir`` (RunDirError naming what was looked for when missing)."""
    from evomerge.search.population_backend import PopulationStore

    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"run directory {run} does not exist")
    path = run / PopulationStore.FILE
    if not path.is_file():
        raise RunDirError(f"{run}: no archive found (looked for {PopulationStore.FILE})")
    return path


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Candidates, members, kinship cache and events of a population run."""
    from evomerge.search.population_backend import PopulationStore

    store = PopulationStore.open_readonly(find_store(run_dir))
    try:
        settings = json.loads(store.get_meta("settings") or "{}")
        metric = str(settings.get("population", {}).get("metric", "pcc"))
        cands = store.candidates()
        by_id = {c["id"]: c for c in cands}
        rows = [CandidateRow(c["id"], float(c["score"]), bool(c["ok"]), c["tasks"], c["generation"],
                             c["member"] or (c["pair"] or "").replace("|", " x "), c["recipe"], c["error"])
                for c in cands]
        members = []
        for m, _recipe in store.members():
            tasks = by_id.get(m.candidate_id, {}).get("tasks", {}) if m.candidate_id is not None else {}
            members.append(MemberRow(m.key, m.score if math.isfinite(m.score) else None, m.generation, m.parents,
                                     m.candidate_id, tasks))
        kin = {(a, b): v for (a, b, _m), v in store.kinship_table(metric).items()}
        events = store.events()
        info: dict[str, Any] = {}
        pop = settings.get("population", {})
        if settings:
            info["base"] = settings.get("base")
            info["models"] = ", ".join(settings.get("originals", {}))
            info["budget"] = settings.get("budget")
            info["seed"] = settings.get("seed")
            info["population"] = (f"k={pop.get('k')}, metric={metric}, pair_budget={pop.get('pair_budget')}, "
                                  f"explore={pop.get('explore')}, saturation={pop.get('saturation')}")
        stop = next((e["payload"].get("reason") for e in reversed(events) if e["kind"] == "stop"), None)
        gens = [e["payload"] for e in events if e["kind"] == "generation_end"]
        info["status"] = f"stopped: {stop}" if stop else (
            f"running or interrupted (generation {gens[-1]['generation'] + 1 if gens else 1})")
        tests = {}
        for cid, splits in store.test_scores().items():
            for split, v in splits.items():
                tests[f"{split} (#{cid})"] = f"{v['score']:.4f} " + ", ".join(
                    f"{k} {x:.3f}" for k, x in v["tasks"].items())
        return RunData(Path(run_dir).resolve().name, rows, members, kin, metric, events, info, tests)
    finally:
        store.close()


def status_text(run_dir: str | os.PathLike[str]) -> str:
    """Generation, top-k and the last decision of a population run (for ``evomerge status``)."""
    data = load_run(run_dir)
    lines = [f"run {data.name}: {len(data.candidates)} evaluations, {data.info.get('status')}"]
    gens = data.generations()
    plans = [e["payload"] for e in data.events if e["kind"] == "generation_plan"]
    if plans:
        cur = plans[-1]
        done = {tuple(sorted((e["payload"]["a"], e["payload"]["b"]))) for e in data.events
                if e["kind"] == "pair_done" and e["payload"]["generation"] == cur["generation"]}
        lines.append(f"generation {cur['generation']}: {len(done)}/{len(cur['plans'])} pair merges done")
    if gens:
        last = gens[-1]
        lines.append(f"top-k after generation {last['generation']}: "
                     + ", ".join(f"{k} ({_score(data, k)})" for k in last["top"]))
    best = data.best_candidate()
    if best is not None:
        lines.append(f"best: #{best.id} {best.label} fitness {best.score:.4f}")
    dec = data.decisions()
    if dec:
        lines.append(f"last decision: {dec[-1][0]}: {dec[-1][1]}")
    return "\n".join(lines)


def _score(data: RunData, key: str) -> str:
    m = data.member(key)
    return "?" if m is None or m.score is None else f"{m.score:.4f}"
