"""`evomerge report runs/<name>`: PNG plots and a self-contained HTML page, from the run's archive only."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.report.html import write_report
from evomerge.report.load import load_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run directory (runs/<name>)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/report)")
    parser.add_argument("--top", type=int, default=8, help="models in the kinship heatmap (default 8)")


def run(args: argparse.Namespace) -> int:
    data = load_run(args.run_dir, top_items=args.top)
    out = args.out or (args.run_dir / "report")
    files = write_report(data, out, top_n=args.top)
    for key, path in files.images.items():
        print(f"{key:<8} {path}")
    for key, why in files.skipped.items():
        print(f"{key:<8} skipped: {why}")
    print(f"report: {files.html}")
    return 0
