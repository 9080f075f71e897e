"""Command-line entry point: parses arguments and dispatches to ``evomerge.commands.*``; no logic here.

Each verb is one module of ``evomerge/commands/`` with ``add_arguments(parser)`` and ``run(args) -> int``
(optionally ``FAST_EXIT``). The table below names them with their one-line help, so ``evomerge --help``
imports no command module (and no torch); only the chosen verb's module is imported. A test checks that the
table and the modules agree.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from evomerge import __version__
from evomerge.errors import EvomergeError

# verb -> (module under evomerge.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "start a search from a search-space YAML (writes runs/<name>/; `evomerge resume` continues it)"),
    "resume": ("resume", "continue a run after an interruption (Ctrl-C, kill, crash, reboot); no finished "
                         "evaluation is repeated"),
    "status": ("status", "show a run's progress: evaluations, rate, ETA, leaderboard, where the time went "
                         "(and population state)"),
    "export": ("export", "materialize a run's best (or chosen) candidate as a Hugging Face model folder with "
                         "recipe and lineage"),
    "report": ("report", "write PNG plots and a self-contained HTML report of a run (fitness, tasks, family "
                         "tree, kinship, gains)"),
    "merge": ("merge", "merge models from a recipe (evomerge or mergekit YAML) into a new model folder"),
    "methods": ("methods", "list merge methods, their parameters (ranges, defaults) and options"),
    "plan": ("plan", "the memory plan of a search space per worker: live model, resident store per tier, "
                     "calibration data, device memory, the tier auto picks and why, merge time per candidate"),
    "kinship": ("kinship", "pairwise model kinship (Pearson, cosine, |cosine|, Euclidean distance of task "
                           "vectors) against a base"),
    "eval": ("eval", "score a model folder on a search space's fitness tasks (or a FitnessSpec file given "
                     "with --tasks)"),
    "mergeability": ("mergeability", "estimate each fine-tune's mergeability (own-task score merged with M "
                                     "random others) vs base knowledge"),
    "qp-diagnose": ("qp_diagnose", "print the QP merge's residual-energy diagnostic rho per layer and overall "
                                   "for each basis"),
    "zoo": ("zoo", "build the built-in demo zoo (a small base model and skill specialists, trained on CPU)"),
    "bench": ("bench", "run a benchmark (merge, eval, search, racing, workers, scheduler, methods) and print ratios "
                       "against peers"),
}


def _chosen(argv: Sequence[str]) -> str | None:
    """The verb named on the command line (the first word that is one), if any."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the verb named in ``argv`` gets its arguments (its module is imported then)."""
    parser = argparse.ArgumentParser(
        prog="evomerge", description="Evolutionary model-merge optimizer (kinship-guided, per-layer, resumable)."
    )
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = _chosen(sys.argv[1:] if argv is None else argv)
    for verb, (module_name, text) in COMMANDS.items():
        cmd = sub.add_parser(verb, help=text, description=text)
        if verb == chosen:
            module = importlib.import_module(f"evomerge.commands.{module_name}")
            module.add_arguments(cmd)
            cmd.set_defaults(_run=module.run, _fast_exit=bool(getattr(module, "FAST_EXIT", False)))
    return parser


def _dispatch(argv: Sequence[str] | None) -> tuple[int, bool]:
    """(exit code, whether the process may skip the interpreter's teardown)."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that went away (`| head`) is a BrokenPipeError here
        return code, args._fast_exit
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE, False
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2, False
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130, False


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail again on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    return _dispatch(argv)[0]


def entry() -> None:
    """The console script. A command that sets ``FAST_EXIT`` (it has closed and renamed everything it wrote
    before returning) ends the process at once: tearing down torch's modules takes about 0.5 s, a fifth of a
    small merge's wall time."""
    code, fast = _dispatch(None)
    if fast:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
            sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
