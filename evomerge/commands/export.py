"""`evomerge export runs/<name> OUT`: write the chosen merge as a Hugging Face folder with card and recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.search.export import export_candidate, verify_export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run directory (runs/<name>)")
    parser.add_argument("out", type=Path, help="output model folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--candidate", type=int, default=None, help="candidate id (default: the best)")
    parser.add_argument("--rank-by", choices=("search", "test"), default="search",
                        help="'best' by search score or by held-out test re-score (default search)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--device", default="cpu", help="merge on this device (cpu, cuda, cuda:N)")
    parser.add_argument("--dtype", default=None, help="output dtype (default: the models' own)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--verify", action="store_true",
                        help="load the exported folder with transformers and re-score it on the search split")


def run(args: argparse.Namespace) -> int:
    summary = export_candidate(args.run_dir, args.out, candidate_id=args.candidate, rank_by=args.rank_by,
                               overwrite=args.overwrite, device=args.device, dtype=args.dtype,
                               max_shard_size=args.max_shard_size)
    test = "-" if summary.test_score is None else f"{summary.test_score:.4f}"
    print(f"exported candidate {summary.candidate_id} to {summary.out_dir} in {summary.seconds:.1f}s "
          f"(search {summary.search_score:.4f}, test {test}; mergekit config: "
          f"{'yes' if summary.mergekit else 'not expressible'})")
    if args.verify:
        got, want = verify_export(args.run_dir, summary.out_dir, summary.candidate_id, device=args.device)
        print(f"verify: re-scored {got:.6f} on the search split, archive says {want:.6f} "
              f"(difference {abs(got - want):.2e})")
        if abs(got - want) > 1e-3:
            print("verify: FAILED (scores differ)")
            return 1
    return 0
