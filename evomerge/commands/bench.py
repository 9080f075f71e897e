"""`evomerge bench NAME`: benchmarks, discovered from ``evomerge.bench`` (same contract as commands)."""

from __future__ import annotations

import argparse

from evomerge.cli import discover

NAME = "bench"
HELP = "run a benchmark (merge, eval, search, workers, scheduler, methods) and print ratios against peers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    for module in discover("evomerge.bench"):
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
