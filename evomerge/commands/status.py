"""`evomerge status RUN_DIR`: progress, rate, ETA, leaderboard and time breakdown (safe while a run writes);
``--json`` prints the same as one JSON object for dashboards and scripts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evomerge.search.status import status_json, status_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run directory (runs/<name>)")
    parser.add_argument("--top", type=int, default=5, help="rows of the leaderboard (default 5)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object: evaluations, failed, partial, items_evaluated, items_full, best "
                             "{id, search, test}, wall_seconds, eval_seconds, ...")


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(status_json(args.run_dir), indent=2, sort_keys=True))
    else:
        print(status_text(args.run_dir, top=args.top))
    return 0
