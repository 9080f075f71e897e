"""`evomerge report`: PNG plots and one self-contained HTML page (images inlined as base64) from RunData."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evomerge.atomic import write_text_atomic
from evomerge.report import plots
from evomerge.report.data import RunData, lineage


@dataclass
class ReportFiles:
    html: Path
    images: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # plot -> why it was not drawn


def write_report(data: RunData, out_dir: str | os.PathLike[str], top_n: int = 8) -> ReportFiles:
    """Draw every plot the data supports into ``out_dir`` and write ``out_dir/report.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(html=out / "report.html")

    if data.candidates:
        gens = [c.generation for c in data.candidates]
        files.images["fitness"] = plots.fitness_over_evaluations(
            [c.score if c.ok else math.nan for c in data.candidates], out / "fitness.png",
            generations=gens if any(g is not None for g in gens) else None,
            failed=[not c.ok for c in data.candidates], title=f"{data.name}: fitness over evaluations")
    else:
        files.skipped["fitness"] = "no evaluations recorded yet"

    best = data.best_candidate()
    if best is not None and best.tasks:
        reference = {m.key: dict(m.tasks) for m in data.members if not m.parents and m.tasks}
        files.images["tasks"] = plots.task_scores_bar(dict(best.tasks), out / "tasks.png",
                                                      title=f"per-task scores of the best (#{best.id})",
                                                      reference=reference or None)
    else:
        files.skipped["tasks"] = "no successful evaluation with per-task scores"

    if any(m.parents for m in data.members):
        best_key = data.top_members(1)[0].key if data.top_members(1) else None
        nodes = [{"id": m.key, "label": m.key, "generation": m.generation, "score": m.score,
                  "highlight": m.key == best_key} for m in data.members]
        edges = [(p, m.key) for m in data.members for p in m.parents]
        files.images["tree"] = plots.family_tree(nodes, edges, out / "family_tree.png")
    else:
        files.skipped["tree"] = "no population (a plain search has no parent-child merges)"

    top = data.top_members(top_n)
    if len(top) >= 2 and any(math.isfinite(data.kin(a.key, b.key)) for a in top for b in top if a.key != b.key):
        keys = [m.key for m in top]
        mat = np.array([[data.kin(a, b) for b in keys] for a in keys])
        files.images["kinship"] = plots.kinship_heatmap(mat, keys, data.metric, out / "kinship.png",
                                                        title=f"kinship of the top {len(keys)} models ({data.metric})")
    else:
        files.skipped["kinship"] = "fewer than two population members with cached kinship"

    gains = data.gains()
    if gains:
        files.images["gain"] = plots.gain_vs_kinship([g[1] for g in gains], [g[2] for g in gains], data.metric,
                                                     out / "gain_vs_kinship.png", labels=[g[0] for g in gains])
    else:
        files.skipped["gain"] = "no merged child with scored parents and known kinship"

    if data.items is not None and data.items.scores:
        files.images["items"] = plots.item_heatmap(data.items.scores, data.items.models, out / "items.png",
                                                   title="per-item scores of the top candidates and originals")
    else:
        files.skipped["items"] = "no per-item results recorded (a run written before per-item results)"

    write_text_atomic(files.html, _page(data, files, top))
    return files


def _items_tables(data: RunData) -> str:
    """Items solved by no model of the view, and by one only (with the model), per task."""
    view = data.items
    if view is None:
        return ""
    none, one = view.solved_by_none(), view.solved_by_one()
    if not none:
        return "<p class='muted'>no task scores its items in [0, 1]: 'solved' is not defined here</p>"

    def shown(values: list[str], limit: int = 40) -> str:
        return ", ".join(values[:limit]) + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")

    rows: list[list[object]] = []
    for task in none:
        by_model: dict[str, list[str]] = {}
        for j, model in one[task]:
            by_model.setdefault(model, []).append(str(j))
        rows.append([task, f"{len(none[task])}: {shown([str(j) for j in none[task]])}" if none[task] else "0",
                     "; ".join(f"{m} ({len(v)}): {shown(v, 15)}" for m, v in by_model.items()) or "-"])
    return ("<p class='muted'>Solved = full marks on the item (exact match, or every token right). Item numbers "
            "are rows of the task's search split.</p>"
            + _table(["task", "solved by none of these models", "solved by one model only"], rows))


def _img(path: Path, alt: str) -> str:
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _fmt(v: object, digits: int = 4) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(head: list[str], rows: list[list[object]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.5em 0}.muted{color:#777}
code{background:#f6f6f6;padding:0 .2em}
"""


def _page(data: RunData, files: ReportFiles, top: list) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>evomerge report: {html.escape(data.name)}"
             f"</title><style>{_CSS}</style></head><body>", f"<h1>evomerge report: {html.escape(data.name)}</h1>"]
    best = data.best_candidate()
    facts: list[list[object]] = [[k, v] for k, v in data.info.items()]
    facts.append(["evaluations", len(data.candidates)])
    facts.append(["failed evaluations", sum(not c.ok for c in data.candidates)])
    if best is not None:
        facts.append(["best search fitness", f"{best.score:.4f} (candidate #{best.id})"])
    for split, scores in data.test_scores.items():
        facts.append([f"best on {split}", scores])
    parts.append(_table(["", ""], facts))

    sections = [("fitness", "Fitness over evaluations",
                 "Each dot is one evaluated candidate (colored by generation when there is a population); the line "
                 "is the best so far."),
                ("tasks", "Per-task scores of the best", "Next to the original models when they were scored."),
                ("tree", "Family tree", "Originals at the top, each merged child below its parents; color = "
                                        "search fitness, red outline = the best model."),
                ("kinship", "Kinship of the top models", f"Global {data.metric} of task vectors against the base."),
                ("gain", "Merge gain vs parent kinship", "gain = child fitness − mean fitness of its two parents."),
                ("items", "Items", "Who solves what: each column is one item of the search split, grouped by task; "
                                   "rows are the best complete candidates and the original models (when scored).")]
    for key, title, note in sections:
        parts.append(f"<h2>{title}</h2>")
        if key in files.images:
            parts.append(f"<p class='muted'>{html.escape(note)}</p>{_img(files.images[key], title)}")
            if key == "items":
                parts.append(_items_tables(data))
        else:
            parts.append(f"<p class='muted'>not drawn: {html.escape(files.skipped.get(key, ''))}</p>")

    if top:
        parts.append("<h2>Top models</h2>")
        rows: list[list[object]] = []
        for m in top:
            anc = lineage(data.members, m.key)
            originals = [a for a in anc if (mm := data.member(a)) is not None and not mm.parents]
            rows.append([m.key, m.score if m.score is not None else math.nan, m.generation,
                         " + ".join(m.parents) or "(original)", ", ".join(originals) or "-"])
        parts.append(_table(["model", "fitness", "generation", "parents", "originals in lineage"], rows))
    gens = data.generations()
    if gens:
        parts.append("<h2>Generations</h2>")
        parts.append(_table(["generation", "best", "best fitness", "top-k", "evaluations"],
                            [[g.get("generation"), g.get("best"), float(g.get("best_score", math.nan)),
                              ", ".join(g.get("top", [])), g.get("evaluations", "")] for g in gens]))
    decisions = data.decisions()
    if decisions:
        parts.append("<h2>Decisions</h2>")
        parts.append(_table(["decision", "reason"], [[k, r] for k, r in decisions]))
    if best is not None and best.recipe:
        parts.append("<h2>Best recipe</h2><pre><code>"
                     + html.escape(json.dumps(best.recipe, indent=2, sort_keys=True)) + "</code></pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
