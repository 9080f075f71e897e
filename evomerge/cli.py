"""Command-line entry point: parses arguments and dispatches to ``evomerge.commands.*``; no logic here.

Each module in ``evomerge/commands/`` is one verb and defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; they are discovered, so adding a verb touches no
other file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from evomerge import __version__
from evomerge.errors import EvomergeError


def discover(package: str, only: str | None = None) -> list[ModuleType]:
    """Import every module of ``package`` that defines a command (NAME and run); with ``only``, just the module
    of that verb (``qp-diagnose`` is ``qp_diagnose.py``), so one command imports nothing the others need."""
    pkg = importlib.import_module(package)
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or (only is not None and info.name != only.replace("-", "_")):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            found.append(module)
    return found


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser: every verb, or only the verb ``only`` (then only its module is imported)."""
    parser = argparse.ArgumentParser(
        prog="evomerge", description="Evolutionary model-merge optimizer (kinship-guided, per-layer, resumable)."
    )
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in discover("evomerge.commands", only):
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run, _fast_exit=bool(getattr(module, "FAST_EXIT", False)))
    return parser


def _verb(argv: Sequence[str]) -> str | None:
    """The command named on the command line when it is a known one (else None: the full parser reports it)."""
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb is None or any(a in ("-h", "--help", "--version") for a in argv[:list(argv).index(verb)]):
        return None
    names = {info.name for info in pkgutil.iter_modules(importlib.import_module("evomerge.commands").__path__)}
    return verb if verb.replace("-", "_") in names and not verb.startswith("_") else None


def _dispatch(argv: Sequence[str] | None) -> tuple[int, bool]:
    """(exit code, whether the process may skip the interpreter's teardown)."""
    parser = build_parser(_verb(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        return int(args._run(args) or 0), args._fast_exit
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2, False
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130, False


def main(argv: Sequence[str] | None = None) -> int:
    return _dispatch(argv)[0]


def entry() -> None:
    """The console script. A command that sets ``FAST_EXIT`` (it has closed and renamed everything it wrote
    before returning) ends the process at once: tearing down torch's modules takes about 0.5 s, a fifth of a
    small merge's wall time."""
    code, fast = _dispatch(None)
    if fast:
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
