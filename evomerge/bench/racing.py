"""`evomerge bench racing`: what racing saves and what it costs, on the demo zoo, through `evomerge run`'s path.

For each search space (default ``search_spaces/demo.yaml``, the plain per-layer CMA-ES search, and
``demo_population.yaml``, the population manager) and seed, two runs with the same evaluation budget: racing
off, and racing on (the space's ``racing:`` settings, or ``--stages`` / ``--level`` / ``--margin`` /
``--min-items``). Each run is a run directory driven by the same session code as ``evomerge run`` (archive,
item lists, checkpoints, the best re-scored on the held-out test split), with the space's stopping rules other
than the budget removed, so both runs get every evaluation. Reported per row (means over seeds): evaluations,
item evaluations on the search split (and their share of scoring every candidate on every item), wall time of
the session, the best complete candidate's search score and its held-out test score. One more pair of rows
goes through lm-eval (``demo_lmeval.yaml``, one seed, ``--lmeval-budget`` evaluations; 0 skips it).

Targets (issue 13): at least 3x fewer items evaluated with racing, at a mean held-out score within 0.01 of the
runs without it. Wall times are ratios measured in the same invocation; on a shared machine they move with the
load (the load average is printed before each row).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

import evomerge
from evomerge.atomic import write_json_atomic
from evomerge.errors import ConfigError
from evomerge.search.driver import run_session
from evomerge.search.run import RunDir
from evomerge.search.space import space_from_dict
from evomerge.search.status import status_json

NAME = "racing"
HELP = "items evaluated, wall time, best search and held-out test score with and without racing (demo zoo)"

SPACES_DIR = Path(evomerge.__file__).resolve().parent.parent / "search_spaces"
DEFAULT_SPACES = ("demo.yaml", "demo_population.yaml")
LMEVAL_SPACE = "demo_lmeval.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spaces", type=Path, nargs="+", default=None,
                        help=f"search spaces (default {' '.join(DEFAULT_SPACES)} of search_spaces/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--budget", type=int, default=None, help="evaluations per run (default: each space's)")
    parser.add_argument("--lmeval-budget", type=int, default=30,
                        help="evaluations of the lm-eval rows (demo_lmeval.yaml, first seed; 0 skips them)")
    parser.add_argument("--stages", type=float, nargs="+", default=None, help="racing stage fractions, ending at 1")
    parser.add_argument("--level", type=float, default=None, help="racing level (default: the space's or 0.05)")
    parser.add_argument("--margin", type=float, default=None,
                        help="racing indifference margin in aggregate units (default: the space's or 0)")
    parser.add_argument("--min-items", type=int, default=None, help="fewest items a stop may rest on (default 32)")
    parser.add_argument("--small", action="store_true", help="quick run: budget 20, first seed, lm-eval budget 6")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker (default 1)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the run folders here (default: temporary)")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures as JSON (atomically)")


def _log(msg: str) -> None:
    print(f"[bench racing] {msg}", file=sys.stderr, flush=True)


def racing_section(args: argparse.Namespace, base: Any) -> dict[str, Any] | bool:
    """The ``racing:`` section of the runs with racing: the space's, with the command line's overrides."""
    section: dict[str, Any] = dict(base) if isinstance(base, Mapping) else {}
    if args.stages is not None:
        section["stages"] = list(args.stages)
    if args.level is not None:
        section["level"] = args.level
    if args.min_items is not None:
        section["min_items"] = args.min_items
    if args.margin is not None:
        section["margin"] = args.margin
    return section or True


def run_space(path: Path, seed: int, racing: bool, budget: int | None, args: argparse.Namespace,
              work: Path) -> dict[str, Any]:
    """One run of ``path`` (seed, racing on or off) as `evomerge run` does it; its figures from the archive."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    base_racing = data.get("racing")
    tag = f"{path.stem}-seed{seed}-{'racing' if racing else 'full'}"
    data.update(name=tag, seed=seed, progress_interval=0, test_top=1,
                racing=racing_section(args, base_racing) if racing else False)
    data["stopping"] = {}  # the budget only: both runs of a pair get every evaluation
    data["executor"] = {**(data.get("executor") or {}), "threads_per_worker": args.threads}
    if budget is not None:
        data.setdefault("optimizer", {})["budget"] = budget
    space = space_from_dict(data, where=f"{path.name} ({tag})", base_dir=path.parent)
    run_dir = work / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    run = RunDir.create(run_dir, space, argv=["bench", "racing"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    result = run_session(run, space, progress=False, log=lambda m: None)
    wall = time.perf_counter() - t0
    status = status_json(run_dir)
    best = status["best"] or {}
    search = status["items"]["search"]
    row = {"space": path.name, "seed": seed, "racing": racing, "budget": space.budget,
           "evaluations": status["evaluations"], "partial": status["partial"], "failed": status["failed"],
           "items": search["evaluated"], "items_full": search["full"], "wall": wall,
           "eval_seconds": status["eval_seconds"], "search": best.get("search"), "test": best.get("test"),
           "best": best.get("id"), "load": load,
           "stop": result.summary.stop_reason if result.summary is not None else "interrupted"}
    _log(f"{tag}: {row['evaluations']} evaluations ({row['partial']} stopped early), items {row['items']}/"
         f"{row['items_full']}, wall {wall:.0f}s, best #{row['best']} search {row['search']:.4f} test "
         f"{row['test']:.4f} (load {load:.1f})")
    return row


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and datasets' progress bars, per candidate
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.small:
        args.budget, args.seeds, args.lmeval_budget = 20, args.seeds[:1], min(args.lmeval_budget, 6)
    spaces = [Path(p) for p in args.spaces] if args.spaces else [SPACES_DIR / s for s in DEFAULT_SPACES]
    for p in spaces + ([SPACES_DIR / LMEVAL_SPACE] if args.lmeval_budget > 0 else []):
        if not p.is_file():
            raise ConfigError(f"bench racing: search space {p} does not exist")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="evomerge-bench-racing-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    try:
        for path in spaces:
            for seed in args.seeds:
                for racing in (False, True):  # interleaved, so the machine's load falls on both alike
                    rows.append(run_space(path, seed, racing, args.budget, args, work))
        if args.lmeval_budget > 0:
            for racing in (False, True):
                rows.append(run_space(SPACES_DIR / LMEVAL_SPACE, args.seeds[0], racing, args.lmeval_budget, args,
                                      work))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    print(f"\n{len(rows)} runs in {(time.perf_counter() - t_all) / 60:.1f} min; seeds {args.seeds}; items and scores "
          "are means over seeds; held-out = the best complete candidate re-scored on the test split")
    if args.json:
        write_json_atomic(args.json, {"rows": rows, "seconds": time.perf_counter() - t_all})
    return 0


def _mean(values: Sequence[float | None]) -> float:
    got = [float(v) for v in values if v is not None]
    return statistics.fmean(got) if got else float("nan")


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The README table: one line per space and racing setting, then each space's ratios."""
    head = ("| space | racing | seeds | evaluations (stopped early) | items evaluated | of full | wall s | "
            "best search | held-out test ± sd |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, bool], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["space"]), bool(r["racing"])), []).append(r)
    summary = []
    for (space, racing), rs in groups.items():
        tests = [float(r["test"]) for r in rs if r["test"] is not None]
        sd = statistics.stdev(tests) if len(tests) > 1 else 0.0
        items, full = _mean([r["items"] for r in rs]), _mean([r["items_full"] for r in rs])
        lines.append(f"| {space} | {'on' if racing else 'off'} | {len(rs)} | {_mean([r['evaluations'] for r in rs]):.0f} "
                     f"({_mean([r['partial'] for r in rs]):.0f}) | {items:.0f} | {items / full:.3f} | "
                     f"{_mean([r['wall'] for r in rs]):.0f} | {_mean([r['search'] for r in rs]):.4f} | "
                     f"{_mean(tests):.4f} ± {sd:.4f} |")
        if racing and (space, False) in groups:
            off = groups[(space, False)]
            ratio = _mean([r["items"] for r in off]) / items if items else float("nan")
            speed = _mean([r["wall"] for r in off]) / _mean([r["wall"] for r in rs])
            delta = _mean(tests) - _mean([r["test"] for r in off])
            summary.append(f"{space}: {ratio:.2f}x fewer items with racing, wall time {speed:.2f}x faster, "
                           f"held-out {delta:+.4f}")
    return "\n".join(lines + [""] + summary)
