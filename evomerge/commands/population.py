"""`evomerge population RUN_DIR ...`: Top-k greedy merging with kinship over generations (run or resume)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "population"
HELP = "run (or resume) a kinship-guided population search: Top-k greedy merging over generations"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (created; run again with the same settings to resume)")
    src = parser.add_argument_group("models")
    src.add_argument("--zoo", choices=("micro", "demo"), default=None,
                     help="use the built-in zoo (its base, specialists and fitness spec)")
    src.add_argument("--base", default=None, help="common base model folder")
    src.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="a starting model (repeat)")
    src.add_argument("--fitness", type=Path, default=None, help="FitnessSpec YAML (default: the zoo's)")
    src.add_argument("--metric-override", default=None,
                     help="use this metric for every task (e.g. token_acc for the demo zoo)")
    pop = parser.add_argument_group("population")
    pop.add_argument("--config", type=Path, default=None,
                     help="YAML with a `population:` section (keys of PopulationConfig); flags below override it")
    pop.add_argument("--budget", type=int, default=100, help="evaluations in all (default 100)")
    pop.add_argument("--seed", type=int, default=0)
    pop.add_argument("--k", type=int, default=None)
    pop.add_argument("--kinship", dest="kin_metric", choices=("pcc", "cos", "abs_cos", "ed"), default=None)
    pop.add_argument("--pair-budget", type=int, default=None, help="evaluations per parent pair (0 = fixed recipe)")
    pop.add_argument("--no-explore", action="store_true", help="plain Top-k greedy (no kinship exploration merge)")
    pop.add_argument("--no-revival", action="store_true")
    pop.add_argument("--device", default="cpu")
    pop.add_argument("--test", action="store_true", help="score the best model on the test split at the end")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from evomerge.errors import ConfigError
    from evomerge.fitness.spec import FitnessSpec
    from evomerge.search.population import PopulationConfig
    from evomerge.search.population_backend import run_population

    if args.zoo:
        from evomerge.fitness.zoo import SPECIALISTS, ensure_zoo

        zoo = ensure_zoo(args.zoo)
        base = str(zoo / "base")
        originals = {s: str(zoo / s) for s in SPECIALISTS}
        fitness = args.fitness or zoo / "fitness.yaml"
    else:
        if not args.base or not args.model or not args.fitness:
            raise ConfigError("population: give --zoo, or --base, --model NAME=PATH (two or more) and --fitness")
        base, fitness, originals = args.base, args.fitness, {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {item!r}: expected NAME=PATH")
        originals[name] = path
    spec = FitnessSpec.from_yaml(fitness)
    if args.metric_override:
        spec = FitnessSpec.from_dict({**spec.model_dump(exclude_none=True), "tasks": [
            {**t.model_dump(exclude_none=True), "metric": args.metric_override, "direction": None}
            for t in spec.tasks]})
    section = {}
    if args.config is not None:
        raw = yaml.safe_load(args.config.read_text()) or {}
        section = raw.get("population", raw) if isinstance(raw, dict) else raw
    cfg = PopulationConfig.from_dict(section, where=f"{args.config or 'population'}")
    overrides = {"k": args.k, "metric": args.kin_metric, "pair_budget": args.pair_budget}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_explore:
        cfg = dataclasses.replace(cfg, explore=False)
    if args.no_revival:
        cfg = dataclasses.replace(cfg, max_revivals=0)
    outcome, backend = run_population(args.run_dir, base=base, originals=originals, spec=spec, cfg=cfg,
                                      budget=args.budget, seed=args.seed, device=args.device, log=print)
    best = outcome.best
    print(f"\nbest: {best.key} fitness {best.score:.4f} (generation {best.generation}, parents "
          f"{' + '.join(best.parents) or '-'}); stop: {outcome.stop_reason}; {outcome.evaluations} evaluations")
    if args.test and best.candidate_id is not None:
        from evomerge.executors.base import EvalJob
        from evomerge.search.population_backend import PopulationWorker

        recipe = backend.recipe_of(best.key)
        extra = {m.model: backend.model_path(m.model) for m in recipe.models if m.model not in originals}
        worker = PopulationWorker(base, originals, spec, args.device, splits=("test",))
        res = worker.evaluate(EvalJob(0, recipe, split="test", extra_models=extra)).result
        backend.store.add_test_score(best.candidate_id, res)
        print(f"held-out test: {res.aggregate:.4f} " + ", ".join(f"{k} {v:.3f}" for k, v in res.task_values().items()))
    print(f"report: evomerge report {args.run_dir}")
    return 0
