"""`evomerge mergeability SPACE.yaml`: each fine-tune's mergeability and its base-knowledge predictor.

Mergeability (seed c): the fine-tune's own-task score after merging it with M randomly chosen other models,
averaged over N seeded trials, for a chosen merge method; predictor: the base model's score on that task.
Prints both per model and their correlation. Models are matched to fitness tasks by name (or ``--task``).
Until a search space names everything, ``--base/--models/--fitness`` give the same inputs explicitly.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from evomerge.atomic import write_json_atomic
from evomerge.errors import ConfigError
from evomerge.files import read_yaml_mapping
from evomerge.fitness.spec import FitnessSpec
from evomerge.lab import ZooLab, estimate_mergeability
from evomerge.merge.methods.registry import get_method
from evomerge.paths import resolve_path as _resolve
from evomerge.search.space import load_space


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """SPACE.yaml and the explicit alternatives (shared with qp-diagnose)."""
    parser.add_argument("space", nargs="?", metavar="SPACE.yaml",
                        help="search space (evomerge's, or a YAML with base_model, models, fitness); flags override it")
    parser.add_argument("--base", help="base model folder (or zoo:SIZE/base)")
    parser.add_argument("--models", nargs="+", metavar="[NAME=]PATH", help="fine-tuned model folders")
    parser.add_argument("--fitness", metavar="SPEC.yaml", help="fitness spec (jsonl tasks named after the models)")
    parser.add_argument("--task", action="append", default=[], metavar="MODEL=TASK",
                        help="the fitness task of a model whose name differs from it (repeatable)")
    parser.add_argument("--metric", default=None,
                        help="override every task's built-in metric (e.g. token_acc when exact match is all 0)")
    parser.add_argument("--device", default="cpu")


def _model_entries(raw: Any, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                items.append((None, item))
            elif isinstance(item, dict) and isinstance(item.get("path") or item.get("model"), str):
                items.append((item.get("name"), item.get("path") or item.get("model")))
            else:
                raise ConfigError(f"{where}.models[{i}]: expected a path or {{name, path}}, got {item!r}")
    else:
        raise ConfigError(f"{where}.models: expected a list or mapping of model folders")
    for name, path in items:
        key = str(name) if name else str(path).rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        if key in out:
            raise ConfigError(f"{where}.models: two models named {key!r}; name them (NAME=PATH)")
        out[key] = str(path)
    return out


def resolve_inputs(args: argparse.Namespace) -> tuple[str, dict[str, str], Any, dict[str, str]]:
    """(base path, {name: path}, FitnessSpec, {model: task}) from SPACE.yaml and/or the flags."""
    base = args.base
    models: dict[str, str] = {}
    spec = None
    space_dir: Path | None = None
    if args.space:
        p = Path(args.space)
        data = read_yaml_mapping(p, "search space")
        space_dir = p.parent
        if isinstance(data.get("models"), dict) and "base" in data["models"]:
            # an evomerge search space (models: {base, fine_tunes}): validated and resolved like `evomerge run`
            space = load_space(p)
            base = base or str(space.base_path)
            if not args.models:
                models = {k: str(v) for k, v in space.models.items()}
            if not args.fitness:
                spec = space.fitness
            data = {}
        base = base or data.get("base_model") or data.get("base")
        if data.get("models") is not None and not args.models:
            models = _model_entries(data["models"], str(p))
        fit = data.get("fitness")
        if isinstance(fit, str) and not args.fitness:
            spec = FitnessSpec.from_yaml(fit if fit.startswith("zoo:") else space_dir / fit)
        elif isinstance(fit, dict) and not args.fitness:
            spec = FitnessSpec.from_dict(fit, where=f"{p}: fitness", base_dir=space_dir)
    if args.models:
        models = _model_entries([m.split("=", 1)[1] if "=" in m else m for m in args.models], "--models")
        named = {m.split("=", 1)[0]: m.split("=", 1)[1] for m in args.models if "=" in m}
        models = {**{k: v for k, v in models.items() if v not in named.values()}, **named}
    if args.fitness:
        spec = FitnessSpec.from_yaml(_resolve(args.fitness))
    if not base:
        raise ConfigError("no base model: give SPACE.yaml with base_model, or --base")
    if len(models) < 2:
        raise ConfigError(f"need at least 2 fine-tuned models, got {list(models)}")
    if spec is None:
        raise ConfigError("no fitness: give SPACE.yaml with a fitness section, or --fitness")
    if space_dir is not None:
        def fix(v: str) -> str:
            return v if v.startswith("zoo:") or os.path.isabs(v) else str(space_dir / v)

        base = fix(base)
        models = {k: fix(v) for k, v in models.items()}
    if args.metric:
        spec = spec.with_metric(args.metric)
    tasks = {}
    for item in args.task:
        if "=" not in item:
            raise ConfigError(f"--task {item!r}: expected MODEL=TASK")
        k, v = item.split("=", 1)
        tasks[k] = v
    return str(base), models, spec, tasks


def build_lab(args: argparse.Namespace, splits: tuple[str, ...] = ("search",)) -> Any:
    base, models, spec, tasks = resolve_inputs(args)
    return ZooLab(base, models, spec, args.device, task_of_model=tasks, splits=splits)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("-m", "--m", dest="m", type=int, default=2, help="other models merged in each trial (M)")
    parser.add_argument("-n", "--n", dest="n", type=int, default=3, help="trials per model (N)")
    parser.add_argument("--method", default="linear", help="merge method (registry name, default settings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="search", choices=("search", "test"))
    parser.add_argument("--json", metavar="OUT.json", help="also write the report as JSON (atomically)")


def run(args: argparse.Namespace) -> int:
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    get_method(args.method)
    lab = build_lab(args, (args.split,))
    report = estimate_mergeability(lab, m=args.m, n=args.n, method=args.method, seed=args.seed, split=args.split)
    print(report.table())
    if args.json:
        write_json_atomic(args.json, report.to_dict())
    return 0
