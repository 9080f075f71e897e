"""`evomerge bench gpu`: the GPU path end to end, on a CUDA machine (refused clearly anywhere else).

Four parts, each timed with its peak GPU memory:

1. the resident merger in each memory tier (device, cpu: pinned host memory streamed per tensor, disk: mapped
   files) on the bfloat16 models of `bench merge`, per-layer task arithmetic and TIES (as `bench resident`);
2. the demo search (`search_spaces/demo.yaml`'s genes on the demo zoo) with one in-process GPU worker;
3. the population demo (`search_spaces/demo_population.yaml`, QP pair merges) on the GPU;
4. an lm-eval fitness on the demo zoo (its generated lm-eval task YAMLs) scoring the base model on the GPU.

For 2 and 3 it prints the share of wall time spent evaluating (inside the worker, scoring) and merging.
Record the figures with the date and the GPU (the header prints both).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge.bench.merge import _parse_count, build_models
from evomerge.bench.resident import print_rows, run_tiers
from evomerge.bench.workers import demo_space_dict
from evomerge.errors import ConfigError
from evomerge.fitness.evaluator import Evaluator, set_offline_env
from evomerge.fitness.spec import FitnessSpec
from evomerge.models.hf import load_causal_lm
from evomerge.search.driver import run_session
from evomerge.search.run import RunDir
from evomerge.search.space import space_from_dict
from evomerge.zoo.build import ensure_zoo

NAME = "gpu"
HELP = "on a CUDA machine: resident merge per tier, demo search and population demo on one GPU worker, lm-eval fitness"

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda:0", help="the CUDA device (default cuda:0)")
    parser.add_argument("--budget", type=int, default=60, help="evaluations of the demo search (default 60)")
    parser.add_argument("--population-budget", type=int, default=40,
                        help="evaluations of the population demo (default 40)")
    parser.add_argument("--params", default="250M", help="parameters per model of the resident part (default 250M)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("resident", "search", "population", "lmeval"),
                        help="parts to leave out")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def require_cuda(device: str) -> Any:
    """torch, once CUDA is known to work on ``device``; ConfigError saying why not otherwise."""

    if not device.startswith("cuda"):
        raise ConfigError(f"bench gpu: --device {device!r} is not a CUDA device")
    if not torch.cuda.is_available():
        raise ConfigError("bench gpu needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                          f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); run it on a GPU machine")
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"bench gpu: {device} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return torch


def _space_run(data: dict[str, Any], work: Path, torch: Any, device: str) -> dict[str, Any]:
    """Run a search space in-process on the GPU; wall time, shares and peak GPU memory."""

    space = space_from_dict(data, where=f"bench gpu ({data.get('name')})", text=yaml.safe_dump(data, sort_keys=False),
                            base_dir=ROOT / "search_spaces")
    torch.cuda.reset_peak_memory_stats(device)
    run = RunDir.create(work / str(data.get("name")), space)
    t0 = time.perf_counter()
    result = run_session(run, space, progress=False, log=lambda _m: None)
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {"wall_s": wall, "peak_cuda": int(torch.cuda.max_memory_allocated(device))}
    summary = result.summary
    if summary is not None:
        t = summary.timings
        out.update(evaluations=summary.evaluations, failed=summary.failed, best=summary.best,
                   per_minute=60 * summary.evaluations / wall, evaluating_share=t.evaluation / max(wall, 1e-9),
                   merging_share=t.merging / max(wall, 1e-9), timings=t.to_dict())
    return out


def run(args: argparse.Namespace) -> int:
    torch = require_cuda(args.device)

    set_offline_env()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"evomerge bench gpu: {name} ({total / 1e9:.1f} GB), torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{stamp}", flush=True)
    results: dict[str, Any] = {"gpu": name, "gpu_memory": total, "date": stamp, "torch": torch.__version__}
    work = Path(tempfile.mkdtemp(prefix="evomerge-bench-gpu-"))
    try:
        if "resident" not in args.skip:
            cache = Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge") / "bench"
            paths = build_models(cache, _parse_count(args.params), False)
            rows = run_tiers(paths, ["device", "cpu", "disk"], device=args.device, dtype="bfloat16", repeats=3,
                             threads=2)
            results["resident"] = rows
            print_rows(rows, f"1. resident merge per tier ({args.params} bf16 models, resident bfloat16)", False)
        ensure_zoo("demo")
        if "search" not in args.skip:
            data = demo_space_dict("demo", budget=args.budget, workers=1, executor={"kind": "inprocess"})
            data.update(device=args.device, name="gpu-demo")
            r = _space_run(data, work, torch, args.device)
            results["search"] = r
            print(f"\n2. demo search, one GPU worker: {r.get('evaluations')} candidates in {r['wall_s']:.1f} s "
                  f"({r.get('per_minute', float('nan')):.1f}/min), evaluating {100 * r.get('evaluating_share', 0):.0f}% "
                  f"and merging {100 * r.get('merging_share', 0):.0f}% of wall time, peak GPU "
                  f"{r['peak_cuda'] / 1e9:.2f} GB, best {r.get('best')}", flush=True)
        if "population" not in args.skip:
            data = yaml.safe_load((ROOT / "search_spaces" / "demo_population.yaml").read_text())
            data.update(device=args.device, name="gpu-population", test_top=0)
            data["optimizer"]["budget"] = args.population_budget
            r = _space_run(data, work, torch, args.device)
            results["population"] = r
            print(f"\n3. population demo (qp pair merges): {r.get('evaluations')} evaluations in {r['wall_s']:.1f} s, "
                  f"evaluating {100 * r.get('evaluating_share', 0):.0f}% and merging "
                  f"{100 * r.get('merging_share', 0):.0f}% of wall time, peak GPU {r['peak_cuda'] / 1e9:.2f} GB",
                  flush=True)
        if "lmeval" not in args.skip:
            zoo = ensure_zoo("demo")
            spec = FitnessSpec.from_yaml(zoo / "fitness_lmeval.yaml")
            torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            model = load_causal_lm(zoo / "base", args.device)
            evaluator = Evaluator(spec, str(zoo / "base"), device=args.device)
            setup = time.perf_counter() - t0
            res = evaluator.score(model, "search")
            results["lmeval"] = {"setup_s": setup, "score_s": res.seconds, "forward_s": res.forward_seconds,
                                 "aggregate": res.aggregate, "ok": res.ok,
                                 "peak_cuda": int(torch.cuda.max_memory_allocated(dev))}
            print(f"\n4. lm-eval fitness on the demo zoo (base model): {res.seconds:.1f} s to score "
                  f"({res.forward_seconds:.1f} s in forward passes; setup {setup:.1f} s), aggregate "
                  f"{res.aggregate:.4f}{'' if res.ok else ' FAILED: ' + str(res.error)}, peak GPU "
                  f"{results['lmeval']['peak_cuda'] / 1e9:.2f} GB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0
