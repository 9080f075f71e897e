"""`evomerge resume runs/<name>`: continue a search after any interruption."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.commands.run import _finish
from evomerge.search.driver import resume_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run directory (runs/<name>)")
    parser.add_argument("--space", type=Path, default=None,
                        help="an edited search space; only budget, workers, stopping, executor may change")
    parser.add_argument("--budget", type=int, default=None, help="new total evaluation budget")
    parser.add_argument("--workers", type=int, default=None, help="parallel evaluators")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    result = resume_run(args.run_dir, space_path=args.space, budget=args.budget, workers=args.workers,
                        address=args.ray_address, progress=not args.quiet)
    return _finish(result)
