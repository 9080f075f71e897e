"""`evomerge status RUN_DIR`: progress of a run: evaluations, generation, top-k, the last decision."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "status"
HELP = "show a run's progress: evaluations, current generation, top-k and the last population decision"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run directory (runs/<name>)")


def run(args: argparse.Namespace) -> int:
    from evomerge.report.load import status_text

    print(status_text(args.run_dir))
    return 0
