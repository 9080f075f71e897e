"""`evomerge kinship MODEL... --base BASE`: pairwise model kinship (task-vector similarity) against one base."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evomerge.atomic import write_json_atomic
from evomerge.errors import ConfigError
from evomerge.kinship import METRICS, format_matrix, iter_pairs, kinship_matrix
from evomerge.models.adapter import resolve_ref
from evomerge.paths import resolve_path
from evomerge.report.plots import kinship_heatmap


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+",
                        help="model folders (or zoo:SIZE/NAME paths) or PEFT LoRA adapter folders, at least two")
    parser.add_argument("--base", required=True, help="the common base model folder the task vectors start from")
    parser.add_argument("--metric", choices=("pcc", "cos", "abs_cos", "ed", "all"), default="pcc",
                        help="pcc (Pearson, default), cos (signed cosine), abs_cos (|cos|, the paper code's), "
                             "ed (Euclidean distance: larger = less related) or all")
    parser.add_argument("--heatmap", type=Path, default=None, help="save a heatmap PNG of the (first) metric")
    parser.add_argument("--per-layer", action="store_true", help="also print each pair's kinship per layer group")
    parser.add_argument("--vocab-policy", choices=("refuse", "slice_to_base"), default="refuse",
                        help="models with larger vocabularies: refuse (default) or compare the base's rows only")
    parser.add_argument("--json", type=Path, default=None, help="also write the matrices as JSON")
    parser.add_argument("--device", default="cpu", help="where to compute (cpu, cuda, cuda:N)")


def run(args: argparse.Namespace) -> int:
    if len(args.models) < 2:
        raise ConfigError("kinship: give at least two models")
    paths = [Path(resolve_ref(m)) for m in args.models]  # model folders, LoRA adapters (over --base) or B+A
    base = resolve_path(args.base)
    names = _unique_names(paths)
    metrics = list(METRICS) if args.metric == "all" else [args.metric]

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            print(f"\r[kinship] {done}/{total} tensors", end="\n" if done == total else "", file=sys.stderr)

    km = kinship_matrix(paths, base, names=names, per_layer=args.per_layer, vocab_policy=args.vocab_policy,
                        device=args.device, progress=progress)
    print(f"base: {base}  ({int(km.total.n):,} task-vector entries per model)")
    for metric in metrics:
        note = "  (distance: larger = less related)" if metric == "ed" else ""
        print(f"\n{metric}{note}")
        print(format_matrix(km.matrix(metric), names, metric))
    if args.per_layer:
        for a, b in iter_pairs(names):
            print(f"\nper layer: {a} vs {b}")
            for metric in metrics:
                vals = km.layer_values(a, b, metric)
                print(f"  {metric:<8}" + "  ".join(f"{lab}={v:.4f}" for lab, v in vals.items()))
    if args.heatmap is not None:
        kinship_heatmap(km.matrix(metrics[0]), names, metrics[0], args.heatmap)
        print(f"\nheatmap: {args.heatmap}")
    if args.json is not None:
        payload = {
            "base": str(base), "models": [str(p) for p in paths], "names": names, "entries": int(km.total.n),
            "global": {m: km.matrix(m).tolist() for m in metrics},
        }
        if args.per_layer:
            payload["per_layer"] = {
                f"{a}|{b}": {m: km.layer_values(a, b, m) for m in metrics} for a, b in iter_pairs(names)
            }
        write_json_atomic(args.json, payload)
    return 0


def _unique_names(paths: list[Path]) -> list[str]:
    """Folder names, made unique with parent names when two folders share a name."""
    names = [p.name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]

