"""`evomerge run SPACE.yaml`: start a search in a new run directory (``runs/<name>/``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.commands.plan import plan_for_space
from evomerge.search.driver import default_run_path, start_run
from evomerge.search.space import load_space
from evomerge.search.status import failure_text, summary_text

if TYPE_CHECKING:
    from evomerge.search.driver import SessionResult



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("space", type=Path, help="search space YAML (see search_spaces/)")
    parser.add_argument("--name", default=None, help="run name (default: the space's `name`, else the file name)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go (runs/)")
    parser.add_argument("--budget", type=int, default=None, help="evaluations (overrides optimizer.budget)")
    parser.add_argument("--workers", type=int, default=None, help="parallel evaluators (overrides workers)")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster (e.g. HEAD_IP:6379, started with `ray start --head`)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    space = load_space(args.space).with_overrides(budget=args.budget, workers=args.workers)
    # the memory plan first: a search that cannot fit is refused before anything is loaded
    plan = plan_for_space(space)
    if not args.quiet:
        print(plan.table(), flush=True)
    plan.require_fit(f"{space.where}: resident")
    path = default_run_path(space, args.name, args.runs_dir)
    result = start_run(space, path, address=args.ray_address, progress=not args.quiet)
    return _finish(result)


def _finish(result: SessionResult) -> int:
    """Print the summary and the way on; exit 1 when the search failed out or nothing succeeded."""
    print(summary_text(result.run_dir))
    if result.interrupted:
        print(f"stopped early; continue with: evomerge resume {result.run_dir}")
        return 130
    failure = failure_text(result.run_dir, result.summary.stop_reason if result.failed_out and result.summary
                           else None)
    if failure is not None:
        print(failure, file=sys.stderr)
        return 1
    print(f"export the best model with: evomerge export {result.run_dir} OUT_DIR")
    return 0
