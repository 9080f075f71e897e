"""`evomerge zoo build DIR [--size micro|demo] [--seed N] [--force]`: train the built-in demo zoo."""

from __future__ import annotations

import argparse

from evomerge.zoo.build import build_zoo, ensure_zoo
from evomerge.zoo.lora import build_lora, ensure_lora


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="zoo_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser("build", help="train and write a zoo into DIR (prints the merge table)")
    build.add_argument("dir", metavar="DIR", help="output folder (refused if it exists, unless --force)")
    build.add_argument("--size", choices=("micro", "demo", "hard"), default="demo",
                       help="micro: seconds, for tests; demo: a few minutes, for the demo search (default); hard: "
                            "smaller, the base never sees sort, which naive merges lose (under 5 minutes)")
    build.add_argument("--seed", type=int, default=0, help="seed for data, initialization and training")
    build.add_argument("--force", action="store_true", help="replace DIR if it exists (only once complete)")
    build.add_argument("--lora", action="store_true",
                       help="also train the skills as LoRA adapters of the base (PEFT) into DIR/lora")
    build.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads for training (default: $EVOMERGE_ZOO_THREADS or 1; one is fastest "
                            "on a shared machine)")
    path = sub.add_parser("path", help="print the cached zoo folder for SIZE/SEED, building it if needed")
    path.add_argument("--size", choices=("micro", "demo", "hard"), default="demo")
    path.add_argument("--seed", type=int, default=0)
    lora = sub.add_parser("lora", help="print the cached zoo's LoRA adapter folder (zoo:SIZE/lora), training it if needed")
    lora.add_argument("--size", choices=("micro", "demo", "hard"), default="demo")
    lora.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.zoo_command == "build":
        build_zoo(args.dir, size=args.size, seed=args.seed, force=args.force, threads=args.threads)
        if args.lora:
            build_lora(args.dir, threads=args.threads)
        return 0
    if args.zoo_command == "lora":
        print(ensure_lora(args.size, args.seed))
        return 0
    print(ensure_zoo(args.size, args.seed))
    return 0
