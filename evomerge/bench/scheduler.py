"""`evomerge bench scheduler`: the real search loop, Ray executor and archive driving simulated workers.

The workers load no model: each evaluation sleeps for a latency drawn from a lognormal distribution (mean and
coefficient of variation configurable, seeded per candidate), a few percent fail (recorded with the penalty)
and a few crash their process (the actor is replaced and the candidate re-queued), and the score is a smooth
function of the recipe. With W workers and mean latency L the ideal throughput is W / L evaluations per second;
the benchmark reports the achieved throughput over the whole run (ramp-up and tail included) and over its
steady middle (10% to 90% of completions), each as a fraction of the ideal. Target: >= 0.90.

Workers ask Ray for no CPU (``num_cpus=0``), so 32 of them fit on a 2-core machine: they only sleep.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from evomerge.atomic import write_json_atomic
from evomerge.bench.harness import timed_search
from evomerge.bench.workers import demo_space_dict
from evomerge.executors.ray_executor import RayExecutor
from evomerge.executors.simulated import simulated_worker
from evomerge.executors.worker import WorkerSpec
from evomerge.search.events import EventKind
from evomerge.search.space import space_from_dict

NAME = "scheduler"
HELP = "throughput of loop + Ray executor + archive with 32 simulated workers vs the ideal workers/latency"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=32, help="virtual workers (default 32)")
    parser.add_argument("--latency", type=float, default=2.0, help="mean evaluation latency in seconds (default 2)")
    parser.add_argument("--cv", type=float, default=0.3, help="coefficient of variation of the latency (0.3)")
    parser.add_argument("--failure-rate", type=float, default=0.03, help="failed evaluations (default 0.03)")
    parser.add_argument("--crash-rate", type=float, default=0.005,
                        help="evaluations whose worker process dies (default 0.005)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="ideal run length in seconds; the budget is workers / latency x duration (default 60)")
    parser.add_argument("--budget", type=int, default=None, help="evaluations (overrides --duration)")
    parser.add_argument("--optimizer", default="CMA", help="nevergrad optimizer (default CMA)")
    parser.add_argument("--zoo-size", choices=("micro", "demo"), default="demo",
                        help="zoo whose search space defines the genome (no model is loaded)")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of a local instance")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def run(args: argparse.Namespace) -> int:
    workers, latency = int(args.workers), float(args.latency)
    ideal = workers / latency
    budget = int(args.budget or round(ideal * args.duration))
    print(f"evomerge bench scheduler: {workers} simulated workers, latency lognormal mean {latency:g} s "
          f"cv {args.cv:g}, failures {args.failure_rate:.1%}, crashes {args.crash_rate:.1%}, budget {budget}, "
          f"optimizer {args.optimizer}", flush=True)
    data = demo_space_dict(args.zoo_size, budget=budget, workers=workers, optimizer=args.optimizer,
                           executor={"cpus_per_worker": 0.01, "max_retries": 2})
    space = space_from_dict(data, where="bench scheduler", text=yaml.safe_dump(data, sort_keys=False))
    extra = {"latency_mean": latency, "latency_cv": args.cv, "failure_rate": args.failure_rate,
             "crash_rate": args.crash_rate, "penalty": space.penalty, "seed": 0}
    spec = WorkerSpec(base=str(space.base_path), models={}, fitness=None, extra=extra)
    work = Path(tempfile.mkdtemp(prefix="evomerge-bench-scheduler-"))
    try:
        t0 = time.perf_counter()
        executor = RayExecutor(spec, workers, address=args.ray_address, cpus_per_worker=0.0, gpus_per_worker=0.0,
                               penalty=space.penalty, worker_factory=simulated_worker)
        startup = time.perf_counter() - t0
        print(f"  {workers} actors started in {startup:.1f} s", flush=True)
        try:
            timed = timed_search(work / "run", space, executor)
        finally:
            executor.close()
        run_dir, summary, wall, t1_wall, stats = timed.run_dir, timed.summary, timed.wall_s, timed.started_at, timed.stats
        with run_dir.archive(readonly=True) as archive:
            records = archive.results("search")
            requeued = len(archive.events(EventKind.REQUEUED))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    done = sorted(r.created_at - t1_wall for r in records)
    n = len(done)
    lo, hi = int(0.1 * n), max(int(0.1 * n) + 1, int(0.9 * n) - 1)
    steady = (hi - lo) / (done[hi] - done[lo]) if n > 10 and done[hi] > done[lo] else float("nan")
    achieved = n / wall
    failed = sum(1 for r in records if not r.ok)
    t = summary.timings.to_dict()
    driver_ms = 1000 * (t["optimizer"] + t["checkpoint"] + t["archive"]) / max(1, n)
    out: dict[str, Any] = {
        "workers": workers, "latency_mean": latency, "cv": args.cv, "budget": budget, "evaluations": n,
        "failed": failed, "requeued": requeued, "restarts": stats["restarts"], "wall_s": wall,
        "startup_s": startup, "ideal_per_s": ideal, "achieved_per_s": achieved, "achieved_ratio": achieved / ideal,
        "steady_per_s": steady, "steady_ratio": steady / ideal, "idle_fraction": stats["idle_fraction"],
        "driver_ms_per_candidate": driver_ms, "timings": t,
    }
    print(f"\n{'':<34}{'eval/s':>8}{'of ideal':>10}")
    print(f"{'ideal (workers / mean latency)':<34}{ideal:>8.2f}{1.0:>10.2f}")
    print(f"{'achieved, whole run':<34}{achieved:>8.2f}{achieved / ideal:>10.2f}")
    print(f"{'achieved, steady (10%-90%)':<34}{steady:>8.2f}{steady / ideal:>10.2f}")
    print(f"\n{n} evaluations in {wall:.1f} s ({failed} failed, recorded with the penalty; {requeued} re-queued after "
          f"{stats['restarts']} worker crashes); worker idle {100 * stats['idle_fraction']:.1f}%; driver "
          f"(ask/tell, checkpoint, archive) {driver_ms:.1f} ms per candidate ("
          + ", ".join(f"{k} {1000 * t[k] / max(1, n):.1f}" for k in ("optimizer", "checkpoint", "archive"))
          + "); target: achieved >= 0.90 of ideal")
    if args.json:
        write_json_atomic(args.json, out)
    return 0
