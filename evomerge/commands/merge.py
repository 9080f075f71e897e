"""`evomerge merge RECIPE.yaml OUT`: merge models on disk from an evomerge recipe or a mergekit config."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.atomic import refuse_replacing_inputs, write_text_atomic
from evomerge.merge.formats.recipe_yaml import load_recipe_with_form, mergekit_yaml
from evomerge.merge.recipe import Recipe
from evomerge.method_data import merge_recipe_to_disk
from evomerge.paths import resolve_path

FAST_EXIT = True  # the output folder is complete and renamed when run() returns (see evomerge.cli.entry)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="recipe YAML (evomerge form, or mergekit's; auto-detected)")
    parser.add_argument("out", type=Path, help="output model folder (written atomically)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="output dtype (default: the recipe's, else each tensor's stored dtype)")
    parser.add_argument("--seed", type=int, default=None, help="seed for random methods (overrides the recipe's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--vocab-policy", choices=("refuse", "slice_to_base"), default="refuse",
                        help="models with larger vocabularies: refuse (default) or slice to the base's")
    parser.add_argument("--write-mergekit-yaml", action="store_true",
                        help="also write OUT/mergekit_config.yml (fails before merging if not expressible)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--memory-budget", default=None, metavar="SIZE",
                        help="temporaries a streaming kernel (TIES, DARE, Breadcrumbs, task arithmetic) may hold per "
                             "tensor and worker, e.g. 256MB (default 256MiB)")


def recipe_inputs(recipe: Recipe) -> list[str]:
    """Every folder or file the recipe reads: its models, base, tokenizer source and option files."""
    refs = [recipe.base_model, recipe.tokenizer_source, *(m.model for m in recipe.models)]
    refs += [v for k, v in recipe.options.items() if k in ("calibration", "fitness") and isinstance(v, str)]
    return [str(resolve_path(r)) for r in refs if r]


def run(args: argparse.Namespace) -> int:
    recipe, form = load_recipe_with_form(args.recipe)
    mk_text = mergekit_yaml(recipe) if args.write_mergekit_yaml else None
    if args.overwrite:
        refuse_replacing_inputs(args.out, recipe_inputs(recipe), "recipe's input")
    summary = merge_recipe_to_disk(
        recipe, args.out, device=args.device, dtype=args.dtype, seed=args.seed,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite, vocab_policy=args.vocab_policy,
        progress=not args.no_progress, where=str(args.recipe), memory_budget=args.memory_budget,
    )
    if mk_text is not None:
        write_text_atomic(summary.out_dir / "mergekit_config.yml", mk_text)
    print(f"{summary.line()} ({form} recipe, method {summary.method})")
    return 0
