"""`evomerge bench methods`: held-out scores of the merge methods at their default settings on the demo zoo.

Rows: linear (uniform soup), task arithmetic, TIES, DARE-TIES, mergeability_weighted (seed c), qp with each
basis (seed d; rho, the residual-energy diagnostic, next to each row, and its correlation with the scores) and
apl (seed e). Every method runs with its registry defaults; only the data-aware inputs are supplied: the
calibration rows (each task's search split) and the base scores (the base model on each task's search split).
Then the mergeability finding: the skill the base knows least is the least mergeable under uniform averaging,
and how much of that skill's fine-tuning gain the weighted merge keeps compared with the uniform mean.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

from evomerge.atomic import write_json_atomic
from evomerge.bench.harness import zoo_fitness
from evomerge.bench.options import add_zoo_arguments
from evomerge.lab import ZooLab, correlation, estimate_mergeability
from evomerge.zoo.build import SPECIALISTS

NAME = "methods"
HELP = "held-out scores of linear, TA, TIES, DARE-TIES, mergeability_weighted, qp (each basis), apl on the demo zoo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_zoo_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="recipe seed (DARE/APL masks, mergeability draws)")
    parser.add_argument("--m", type=int, default=1, help="mergeability: other models per trial")
    parser.add_argument("--n", type=int, default=3, help="mergeability: trials per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON (atomically)")


def _methods() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    rows: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
        ("linear", "linear", {}, {}),
        ("task_arithmetic", "task_arithmetic", {}, {}),
        ("ties", "ties", {}, {}),
        ("dare_ties", "dare_ties", {}, {}),
        ("mergeability_weighted", "mergeability_weighted", {}, {}),
    ]
    for basis in ("task", "masked", "full", "diagonal"):
        rows.append((f"qp basis={basis}", "qp", {}, {"basis": basis}))
    rows.append(("qp basis=full sequential", "qp", {}, {"basis": "full", "sequential": True}))
    rows.append(("apl", "apl", {}, {}))
    return rows


def run(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    zoo, spec = zoo_fitness(args.zoo_size, args.zoo_seed, args.metric)
    skills = list(SPECIALISTS)
    lab = ZooLab(str(zoo / "base"), {s: str(zoo / s) for s in skills}, spec, args.device,
                 splits=("search", "test"))
    base_search = lab.base_scores("search")
    out: dict[str, Any] = {"zoo": str(zoo), "metric": args.metric, "seed": args.seed, "rows": []}

    def test_scores(state: Any) -> dict[str, float]:
        res = lab.score_state(state, "test")
        if not res.ok:
            raise RuntimeError(res.error)
        return {s: float(res.task_values()[s]) for s in skills}

    print(f"demo zoo ({args.zoo_size}) held-out test split, metric {args.metric}; "
          f"base scores on the search split: " + ", ".join(f"{s} {v:.3f}" for s, v in base_search.items()),
          flush=True)
    ref_rows = []
    for key in [lab.base_key, *skills]:
        vals = lab.score_model(key, "test").task_values()
        ref_rows.append(("base" if key == lab.base_key else f"specialist {key}", {s: float(vals[s]) for s in skills}))
    results = []
    for label, method, params, options in _methods():
        model_params = {s: {"base_score": base_search[s]} for s in skills} if method == "mergeability_weighted" else None
        recipe = lab.recipe(method, skills, params, options, model_params, seed=args.seed)
        t0 = time.perf_counter()
        state, report = lab.merge(recipe)
        merge_s = time.perf_counter() - t0
        scores = test_scores(state)
        rho = report.overall() if report is not None else None
        results.append((label, rho, scores, merge_s))
        print(f"[bench methods] {label}: mean {sum(scores.values()) / len(skills):.4f} "
              f"({merge_s:.1f}s merge)", file=sys.stderr, flush=True)

    head = "| method | rho | " + " | ".join(skills) + " | mean | merge s |"
    lines = [head, "|---|---|" + "---|" * (len(skills) + 2)]
    for name, vals in ref_rows:
        lines.append(f"| {name} | | " + " | ".join(f"{vals[s]:.3f}" for s in skills)
                     + f" | {sum(vals.values()) / len(skills):.3f} | |")
    for label, rho, scores, merge_s in results:
        mean = sum(scores.values()) / len(skills)
        lines.append(f"| {label} | {'' if rho is None else f'{rho:.3f}'} | "
                     + " | ".join(f"{scores[s]:.3f}" for s in skills) + f" | {mean:.3f} | {merge_s:.1f} |")
        out["rows"].append({"method": label, "rho": rho, "scores": scores, "mean": mean, "merge_seconds": merge_s})
    print("\n".join(lines))
    qp_rows = [(rho, sum(sc.values()) / len(skills)) for _, rho, sc, _ in results if rho is not None]
    pr = correlation([r for r, _ in qp_rows], [m for _, m in qp_rows], "pearson")
    sr = correlation([r for r, _ in qp_rows], [m for _, m in qp_rows], "spearman")
    print(f"\nrho vs held-out mean over the {len(qp_rows)} qp rows: Pearson {pr:.3f}, Spearman {sr:.3f}")
    out["rho_correlation"] = {"pearson": pr, "spearman": sr, "n": len(qp_rows)}

    # ---- the mergeability finding
    weakest = min(base_search, key=lambda s: base_search[s])
    rep = estimate_mergeability(lab, m=args.m, n=args.n, method="linear", seed=args.seed, split="test")
    print()
    print(rep.table())
    least = min(rep.rows, key=lambda r: r.mergeability)
    lin = next(sc for lb, _, sc, _ in results if lb == "linear")
    mw = next(sc for lb, _, sc, _ in results if lb == "mergeability_weighted")
    base_t = ref_rows[0][1][weakest]
    spec_t = next(v for n, v in ref_rows if n == f"specialist {weakest}")[weakest]
    gain = spec_t - base_t

    def kept(v: float) -> float:
        return (v - base_t) / gain if gain != 0 else float("nan")

    print(f"\nskill the base knows least (search split): {weakest} (base {base_search[weakest]:.3f}); "
          f"least mergeable under uniform averaging: {least.model} ({least.mergeability:.3f})"
          f" -> {'same skill' if least.model == weakest else 'a different skill'}")
    print(f"{weakest} on the test split: base {base_t:.3f}, specialist {spec_t:.3f}; uniform mean {lin[weakest]:.3f} "
          f"(keeps {100 * kept(lin[weakest]):.0f}% of the fine-tuning gain), mergeability_weighted "
          f"{mw[weakest]:.3f} (keeps {100 * kept(mw[weakest]):.0f}%)")
    out["mergeability"] = rep.to_dict()
    out["finding"] = {"weakest_skill": weakest, "least_mergeable": least.model, "base": base_t,
                      "specialist": spec_t, "uniform": lin[weakest], "weighted": mw[weakest],
                      "kept_uniform": kept(lin[weakest]), "kept_weighted": kept(mw[weakest])}
    if args.json:
        write_json_atomic(args.json, out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(argparse.Namespace(**{"zoo_size": "micro", "zoo_seed": 0, "metric": "token_acc", "seed": 0,
                                       "m": 1, "n": 1, "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
                                       "device": "cpu", "json": None})))
