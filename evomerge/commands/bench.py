"""`evomerge bench NAME`: benchmarks, one module each in ``evomerge.bench`` (``NAME``, ``HELP``,
``add_arguments``, ``run``), discovered so adding a benchmark touches no other file."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from types import ModuleType

import evomerge.bench


def benchmarks() -> list[ModuleType]:
    """Every module of ``evomerge.bench`` that defines a benchmark (NAME and run)."""
    found = []
    for info in sorted(pkgutil.iter_modules(evomerge.bench.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"evomerge.bench.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            found.append(module)
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    for module in benchmarks():
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
