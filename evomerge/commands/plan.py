"""`evomerge plan SPACE.yaml`: each worker's memory plan (store per tier, calibration, the tier auto picks, merge time).

Reads only configs and safetensors headers, so it runs before anything is loaded (and on a config-only
stand-in of the models); `evomerge run` prints the same plan first and refuses to start when nothing fits.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from evomerge.merge.engines.tiers import plan_resident
from evomerge.models.writer import parse_size
from evomerge.search.space import load_space
from evomerge.search.workers import plan_methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("space", help="search space YAML")
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="device memory per worker, e.g. 24GB (default: what this machine's device has free)")
    parser.add_argument("--host-memory", default=None, metavar="SIZE",
                        help="host memory of the machine, e.g. 256GB (default: MemAvailable; shared by its workers)")
    parser.add_argument("--no-probe", action="store_true",
                        help="estimate merge times from stated bandwidths (default: a short probe on real tensors)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan_for_space(space: Any, *, device_memory: int | None = None, host_memory: int | None = None,
                   probe: bool = True) -> Any:
    """The :class:`~evomerge.merge.engines.tiers.ResidentPlan` of one worker of ``space`` (a loaded Space)."""

    raw = space.raw
    methods, pair_models = plan_methods(space)
    local_workers = raw.workers if not raw.executor.address else 1
    return plan_resident(space.base_path, {k: str(v) for k, v in space.models.items()}, device=raw.device,
                         dtype=raw.dtype, resident=raw.resident, workers=local_workers,
                         device_memory=device_memory, host_memory=host_memory, methods=methods,
                         pair_models=pair_models, eval_batch=int(space.fitness.batch_size), probe=probe)


def run(args: argparse.Namespace) -> int:
    space = load_space(args.space, check_models=False)  # headers only: stand-ins without weights work too
    plan = plan_for_space(space, device_memory=parse_size(args.device_memory) if args.device_memory else None,
                          host_memory=parse_size(args.host_memory) if args.host_memory else None,
                          probe=not args.no_probe)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, sort_keys=True, default=str))
    else:
        print(f"{space.where}: {space.raw.workers} worker{'s' if space.raw.workers > 1 else ''} on {space.raw.device}")
        print(plan.table())
    plan.require_fit(f"{space.where}: resident")
    return 0
