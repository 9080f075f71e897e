"""PNG plots of a search (matplotlib, Agg backend: no display needed). Each takes plain data and a path.

Kept free of archive access so the kinship command and tests can call them directly; ``report.data`` turns an
archive into these inputs.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.atomic import write_bytes_atomic

_DPI = 110


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write a PNG atomically (render to bytes, then rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    _plt().close(fig)
    write_bytes_atomic(path, buf.getvalue())
    os.chmod(path, 0o644)  # mkstemp creates 0600; a report is meant to be shared
    return Path(path)


def _short(name: str, width: int = 18) -> str:
    name = Path(name).name or name
    return name if len(name) <= width else name[: width - 1] + "…"


def kinship_heatmap(matrix: np.ndarray, names: Sequence[str], metric: str, path: str | os.PathLike[str],
                    title: str | None = None) -> Path:
    """Annotated heatmap of a kinship matrix (ED gets its own color scale; similarities span [-1, 1])."""
    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    n = len(names)
    size = max(4.0, 0.75 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    if metric == "ed":
        finite = m[np.isfinite(m)]
        vmin, vmax, cmap = 0.0, float(finite.max()) if finite.size else 1.0, "viridis_r"
    else:
        vmin, vmax, cmap = -1.0, 1.0, "RdBu_r"
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
    labels = [_short(s) for s in names]
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(n), labels, fontsize=9)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                v = m[i, j]
                text = "nan" if not math.isfinite(v) else f"{v:.2f}"
                shade = (v - vmin) / (vmax - vmin) if vmax > vmin and math.isfinite(v) else 0.5
                color = "white" if (shade > 0.8 or shade < 0.2) else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    label = {"pcc": "Pearson", "cos": "cosine", "abs_cos": "|cosine|", "ed": "Euclidean distance"}.get(metric, metric)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    ax.set_title(title or f"model kinship ({label} of task vectors)")
    return _save(fig, path)


def fitness_over_evaluations(scores: Sequence[float], path: str | os.PathLike[str],
                             generations: Sequence[int | None] | None = None, title: str = "fitness over evaluations",
                             failed: Sequence[bool] | None = None) -> Path:
    """Every candidate's score (dots, colored by generation when given) and the running best (line)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = np.arange(1, len(scores) + 1)
    y = np.asarray(scores, dtype=float)
    ok = np.ones(len(y), bool) if failed is None else ~np.asarray(failed, bool)
    if generations is not None and len({g for g in generations if g is not None}) > 1:  # one generation: no scale
        g = np.array([-1 if v is None else v for v in generations], float)
        sc = ax.scatter(x[ok], y[ok], c=g[ok], cmap="viridis", s=14, alpha=0.8, label="candidate")
        fig.colorbar(sc, ax=ax, label="generation", pad=0.01)
    else:
        ax.scatter(x[ok], y[ok], s=14, alpha=0.6, color="tab:blue", label="candidate")
    if (~ok).any():
        floor = np.nanmin(y[ok]) if ok.any() else 0.0
        ax.scatter(x[~ok], np.full((~ok).sum(), floor), marker="x", color="tab:red", s=18, label="failed")
    best = np.maximum.accumulate(np.where(ok, y, -np.inf)) if len(y) else y
    ax.step(x, np.where(np.isfinite(best), best, np.nan), where="post", color="black", lw=1.8, label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("search fitness (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def task_scores_bar(tasks: Mapping[str, float], path: str | os.PathLike[str], title: str = "per-task scores of the best",
                    reference: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Bars per task for the best model, optionally next to reference models (e.g. the originals)."""
    plt = _plt()
    names = list(tasks)
    series: dict[str, Mapping[str, float]] = {"best": tasks, **(reference or {})}
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2), 4))
    for k, (label, vals) in enumerate(series.items()):
        xs = np.arange(len(names)) + (k - (len(series) - 1) / 2) * width
        ys = [vals.get(t, np.nan) for t in names]
        bars = ax.bar(xs, ys, width=width, label=_short(label, 24))
        if label == "best":
            for b, v in zip(bars, ys):
                if math.isfinite(v):
                    ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.3f}", ha="center", va="bottom",
                            fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def family_tree(nodes: Sequence[Mapping[str, Any]], edges: Sequence[tuple[str, str]], path: str | os.PathLike[str],
                title: str = "family tree (parents → children)") -> Path:
    """Models by generation (rows), arrows from parents to children, colored by score.

    ``nodes``: dicts with ``id``, ``label``, ``generation`` (0 for originals), ``score`` (None: unscored),
    optional ``highlight`` (the best, drawn with a thick outline).
    """
    plt = _plt()
    from matplotlib import cm, colors

    # rows: the originals, generation 0's merges of them (the joint merge) between them and generation 1, then
    # one row per generation
    children = {str(b) for _a, b in edges}
    by_gen: dict[float, list[Mapping[str, Any]]] = {}
    for node in nodes:
        g = int(node.get("generation") or 0)
        by_gen.setdefault(0.5 if g == 0 and str(node["id"]) in children else float(g), []).append(node)
    gens = sorted(by_gen)
    widest = max((len(v) for v in by_gen.values()), default=1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.25 * widest + 2), max(3.5, 1.4 * len(gens) + 1.5)))
    pos: dict[str, tuple[float, float]] = {}
    for row, g in enumerate(gens):
        members = sorted(by_gen[g], key=lambda n: str(n["id"]))
        for i, node in enumerate(members):
            pos[str(node["id"])] = ((i + 0.5) * widest / len(members), -row)
    scores = [float(n["score"]) for n in nodes if n.get("score") is not None and math.isfinite(float(n["score"]))]
    lo, hi = (min(scores), max(scores)) if scores else (0.0, 1.0)
    if hi - lo < 1e-6:  # one score (or all equal): a readable scale around it
        lo, hi = lo - 0.05, hi + 0.05
    norm = colors.Normalize(vmin=lo, vmax=hi)
    cmap = cm.get_cmap("viridis") if hasattr(cm, "get_cmap") else plt.get_cmap("viridis")
    for a, b in edges:
        if a in pos and b in pos:
            (x0, y0), (x1, y1) = pos[a], pos[b]
            ax.annotate("", xy=(x1, y1 + 0.12), xytext=(x0, y0 - 0.12),
                        arrowprops={"arrowstyle": "->", "color": "0.55", "lw": 0.8, "shrinkA": 4, "shrinkB": 4})
    for node in nodes:
        x, y = pos[str(node["id"])]
        s = node.get("score")
        face = cmap(norm(float(s))) if s is not None and math.isfinite(float(s)) else (0.85, 0.85, 0.85, 1)
        ax.scatter([x], [y], s=420, color=face, edgecolors="red" if node.get("highlight") else "black",
                   linewidths=2.5 if node.get("highlight") else 0.8, zorder=3)
        ax.text(x, y - 0.3, _short(str(node.get("label", node["id"])), 14), ha="center", va="top", fontsize=7)
    ax.set_yticks([-r for r in range(len(gens))],
                  ["originals" if g == 0 else "gen 0 (joint)" if g == 0.5 else f"gen {g:.0f}" for g in gens])
    ax.set_xticks([])
    ax.set_xlim(-0.2, widest + 0.2)
    ax.set_ylim(-len(gens) + 0.3, 0.6)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    sm.set_array([])
    fig.colorbar(sm, ax=ax, label="search fitness", pad=0.01)
    ax.set_title(title)
    return _save(fig, path)


def gain_vs_kinship(kinships: Sequence[float], gains: Sequence[float], metric: str, path: str | os.PathLike[str],
                    labels: Sequence[str] | None = None) -> Path:
    """Merge gain (child − mean of parents) against the parents' kinship, with a least-squares line and r."""
    plt = _plt()
    x = np.asarray(kinships, float)
    y = np.asarray(gains, float)
    keep = np.isfinite(x) & np.isfinite(y)
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    ax.scatter(x[keep], y[keep], s=22, alpha=0.8, color="tab:purple")
    ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
    title = "merge gain vs parent kinship"
    if keep.sum() >= 3 and np.ptp(x[keep]) > 0 and np.ptp(y[keep]) > 0:
        slope, icpt = np.polyfit(x[keep], y[keep], 1)
        xs = np.linspace(x[keep].min(), x[keep].max(), 50)
        ax.plot(xs, slope * xs + icpt, color="black", lw=1)
        r = float(np.corrcoef(x[keep], y[keep])[0, 1])
        title += f" (r = {r:+.2f}, n = {int(keep.sum())})"
    if labels is not None and keep.sum() <= 25:
        for xi, yi, lab, k in zip(x, y, labels, keep):
            if k:
                ax.annotate(_short(lab, 14), (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    name = {"pcc": "Pearson", "cos": "cosine", "abs_cos": "|cosine|", "ed": "Euclidean distance"}.get(metric, metric)
    ax.set_xlabel(f"parent kinship ({name})")
    ax.set_ylabel("gain: child − mean(parents)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def item_heatmap(scores: Mapping[str, np.ndarray], models: Sequence[str], path: str | os.PathLike[str],
                 title: str = "per-item scores (search split)") -> Path:
    """Models (rows) by items (columns, grouped by task, a line between tasks); grey: no result on that item.

    Scores in [0, 1] keep their values; a task with other values (log-likelihood) is scaled to [0, 1] within
    the task, which the title then says."""
    plt = _plt()
    from matplotlib import colormaps

    blocks, scaled = [], []
    for task, m in scores.items():
        m = np.asarray(m, dtype=float)
        finite = m[np.isfinite(m)]
        if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
            lo, hi = float(finite.min()), float(finite.max())
            m = (m - lo) / (hi - lo) if hi > lo else np.where(np.isfinite(m), 0.5, np.nan)
            scaled.append(task)
        blocks.append((task, m))
    matrix = np.concatenate([m for _, m in blocks], axis=1) if blocks else np.zeros((len(models), 0))
    n_items = matrix.shape[1]
    fig, ax = plt.subplots(figsize=(min(18.0, max(6.0, 0.012 * n_items + 3)), max(2.5, 0.35 * len(models) + 1.5)))
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0,
                   vmax=1.0)
    start, centers, names = 0, [], []
    for task, m in blocks:
        centers.append(start + m.shape[1] / 2 - 0.5)
        names.append(f"{task} ({m.shape[1]})")
        start += m.shape[1]
        if start < n_items:
            ax.axvline(start - 0.5, color="white", lw=2)
    ax.set_xticks(centers, names, fontsize=9)
    ax.set_yticks(range(len(models)), [_short(m, 22) for m in models], fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="item score" + (" (scaled per task)" if scaled else ""))
    ax.set_title(title + (f"; scaled within {', '.join(scaled)}" if scaled else ""))
    return _save(fig, path)
