"""`evomerge status RUN_DIR`: progress, rate, ETA, leaderboard and time breakdown (safe while a run writes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.search.status import status_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run directory (runs/<name>)")
    parser.add_argument("--top", type=int, default=5, help="rows of the leaderboard (default 5)")


def run(args: argparse.Namespace) -> int:
    print(status_text(args.run_dir, top=args.top))
    return 0
