"""`evomerge eval MODEL_DIR --space SPACE.yaml [--split search|test] [--json]`: score one model folder."""

from __future__ import annotations

import argparse
import json

from evomerge.errors import ConfigError
from evomerge.fitness.evaluator import Evaluator, set_offline_env
from evomerge.fitness.spec import FitnessSpec
from evomerge.models.adapter import folder_kind, open_weights, split_ref
from evomerge.models.hf import load_causal_lm
from evomerge.paths import resolve_path
from evomerge.search.space import load_space


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR",
                        help="model folder (or zoo:SIZE/NAME), or a PEFT LoRA adapter folder (over the space's base, "
                             "or written BASE+ADAPTER)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--space", metavar="SPACE.yaml", help="search space whose 'fitness:' section is used")
    src.add_argument("--tasks", metavar="FILE.yaml", help="a FitnessSpec file (tasks and settings)")
    parser.add_argument("--split", choices=("search", "test"), default="search",
                        help="search split (what a search optimizes) or the held-out test split")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--json", action="store_true", help="print the full EvalResult as JSON")


def load_spec(path: str) -> FitnessSpec:
    """A FitnessSpec from a search space (its ``fitness:`` section) or a bare spec file."""
    return FitnessSpec.from_yaml(path)


def run(args: argparse.Namespace) -> int:
    set_offline_env()
    spec = load_spec(args.space or args.tasks)
    explicit, model_part = split_ref(args.model)
    path = resolve_path(model_part)
    kind = folder_kind(path)
    if kind == "missing":
        raise ConfigError(f"model folder {path} has no config.json (nor adapter_config.json: not a PEFT adapter)")
    base = resolve_path(explicit) if explicit is not None else None
    if kind == "adapter" and base is None and args.space:
        base = load_space(args.space, check_models=False).base_path  # an adapter fine-tune of this space
    model = load_causal_lm(path, args.device, dtype=args.dtype, base=base)
    tokenizer_from = path if kind == "model" else (base or _adapter_base(path))
    evaluator = Evaluator(spec, str(tokenizer_from), device=args.device, splits=(args.split,))
    result = evaluator.score(model, split=args.split)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str))
    else:
        status = "ok" if result.ok else f"FAILED ({result.error})"
        print(f"{path} on {args.split} split: aggregate {result.aggregate:.4f} [{status}] "
              f"in {result.seconds:.2f}s ({result.forward_seconds:.2f}s in forward passes)")
        for t in result.tasks:
            arrow = "max" if t.higher_is_better else "min"
            print(f"  {t.task:<20} {t.metric:<18} {t.value:.4f}  ({arrow}, weight {t.weight:g})")
    return 0 if result.ok else 1


def _adapter_base(path: object) -> object:
    """The local base an adapter's config names (the loader already refused it when there is none)."""

    with open_weights(str(path)) as source:
        return getattr(source, "base_path", path)
