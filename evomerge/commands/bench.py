"""`evomerge bench NAME`: benchmarks, one module each in ``evomerge.bench`` (``NAME``, ``HELP``,
``add_arguments``, ``run``), discovered so adding a benchmark touches no other file.

Only the benchmark named on the command line is imported (``bench merge`` starts its process spawner before
torch is loaded, so the tools' peak memory is their own); ``evomerge bench --help`` imports them all to list them.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

import evomerge.bench


def benchmark_names() -> list[str]:
    """The modules of ``evomerge.bench`` (not imported)."""
    return sorted(i.name for i in pkgutil.iter_modules(evomerge.bench.__path__) if not i.name.startswith("_"))


def _module(name: str) -> ModuleType | None:
    module = importlib.import_module(f"evomerge.bench.{name}")
    return module if hasattr(module, "NAME") and hasattr(module, "run") else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    names = benchmark_names()
    argv = sys.argv[1:]
    chosen = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "bench" and argv[i + 1] in names), None)
    for name in ([chosen] if chosen else names):
        module = _module(name)
        if module is None:
            continue
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
