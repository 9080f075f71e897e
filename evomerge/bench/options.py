"""Command-line options several benchmarks share (argparse only: importing this loads no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_set_arguments(parser: argparse.ArgumentParser, small_help: str, threads_help: str) -> None:
    """``--cache``, ``--params``, ``--small``, ``--threads``: the ~250M Llama sets of ``bench merge``."""
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the benchmark models are kept (default $EVOMERGE_CACHE or ~/.cache/evomerge, /bench)")
    parser.add_argument("--params", default="250M", help="parameters per model (default 250M)")
    parser.add_argument("--small", action="store_true", help=small_help)
    parser.add_argument("--threads", type=int, default=2, help=threads_help)


def add_zoo_arguments(parser: argparse.ArgumentParser) -> None:
    """``--zoo-size``, ``--zoo-seed``, ``--metric``: the demo zoo a benchmark scores on."""
    parser.add_argument("--zoo-size", "--zoo", choices=("micro", "demo", "hard"), default="demo",
                        help="which zoo: demo (default), hard (the base never sees sort) or micro (tests)")
    parser.add_argument("--zoo-seed", type=int, default=0)
    parser.add_argument("--metric", default="token_acc",
                        help="built-in metric for every task (exact match of merged demo models is mostly 0)")
