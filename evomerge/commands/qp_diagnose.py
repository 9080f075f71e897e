"""`evomerge qp-diagnose SPACE.yaml --basis ...`: the QP merge's residual-energy diagnostic, without evaluating.

rho = 1 - J(alpha*)/J(0): the fraction of the task vectors' calibration-output residual that the chosen basis
captures (seed d, reconstructed). Printed per linear tensor (``--per-tensor``) and overall, for each basis.
"""

from __future__ import annotations

import argparse
import os
import re

import torch

from evomerge.atomic import write_json_atomic
from evomerge.commands.mergeability import add_input_arguments, build_lab
from evomerge.merge.kernels.qp import BASES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("--basis", nargs="+", choices=BASES, default=list(BASES), help="bases to diagnose")
    parser.add_argument("--ridge", type=float, default=0.01, help="Gram ridge (relative to mean diagonal)")
    parser.add_argument("--sequential", action="store_true", help="calibrate through the already-merged layers")
    parser.add_argument("--mask", default="ties", help="mask of the masked basis (magnitude, ties, dare)")
    parser.add_argument("--density", type=float, default=0.5, help="density of the masked basis")
    parser.add_argument("--calibration-tokens", type=int, default=512)
    parser.add_argument("--per-tensor", action="store_true", help="print rho of every linear tensor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT.json", help="also write every report as JSON (atomically)")


def run(args: argparse.Namespace) -> int:
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    lab = build_lab(args)
    reports = {}
    for basis in args.basis:
        recipe = lab.recipe("qp", lab.keys, {"ridge": args.ridge, "density": args.density},
                            {"basis": basis, "sequential": bool(args.sequential), "mask": args.mask,
                             "calibration_tokens": args.calibration_tokens}, seed=args.seed)
        _, report = lab.merge(recipe)
        reports[basis] = report
    names = sorted(next(iter(reports.values())).records, key=_tensor_order)
    if args.per_tensor:
        print("| tensor | " + " | ".join(f"rho {b}" for b in args.basis) + " |")
        print("|---|" + "---|" * len(args.basis))
        for n in names:
            print(f"| {n} | " + " | ".join(f"{reports[b].rho(n):.4f}" for b in args.basis) + " |")
        print()
    print(f"rho = 1 - J(alpha*)/J(0) over {len(names)} linear tensors"
          f"{' (sequential)' if args.sequential else ''}, ridge {args.ridge:g}")
    for b in args.basis:
        fb = len(reports[b].fallback)
        print(f"  {b:9s} overall rho {reports[b].overall():.4f}   ({fb} non-linear tensors merged by the fallback)")
    if args.json:
        write_json_atomic(args.json, {b: r.to_dict() for b, r in reports.items()})
    return 0


def _tensor_order(name: str) -> tuple[int, str]:
    m = re.search(r"\.(\d+)\.", name)
    return (int(m.group(1)) if m else 10**6, name)
