"""`evomerge bench search`: held-out scores of merge baselines, plain CMA-ES and the population manager.

On the demo zoo (a base and four skill specialists), each search row gets the same evaluation budget on the
search split (scoring the originals counts), is repeated for several seeds, and its best model (by search
fitness) is scored once on the disjoint held-out test split. Rows:

1. uniform average (linear soup of the specialists)
2. task arithmetic at the best λ of a small grid (λ chosen on the search split)
3. TIES with the registry defaults
4. plain per-layer CMA-ES over all specialists at once (task-arithmetic weights per layer: the mergekit-evolve
   setting); ``cmaes_qp``: the same search over the per-layer weights of one sequential QP merge of all
   specialists (the population's pair method, on every original at once), run as `evomerge run` runs a plain
   search (racing included)
5. Top-k greedy merging without kinship (no exploration merge, no revival)
6. ``kinship``: the kinship population manager as before behaviour-aware breeding (kinship exploration merge,
   saturation stop, revival; plain aggregate)
7. ``attraction``: the same with partners chosen by attraction (who solves what the best fails)
8. ``niche``: niche fitness (alpha = ``--alpha``) for parents and the top-k, attraction partners, identical
   pairs skipped
9. ``joint``: the kinship manager with the joint merge of the originals (generation 0: one merge of all of them
   by the pair method, a member that starts generation 1 beside them)
10. ``breeding``: the default manager (the joint merge, the screen of each generation's pairs, the leader
   refine, niche_alpha default 0, ``partner: both``, identical pairs skipped, escape moves with larger pair
   budgets and split-point crossover once the top-k saturates)
11. ``breeding_niche``: the default manager with niche fitness (alpha = ``--alpha``) for parents and the top-k
12. ``breeding_ancestors``: the default manager with merged parents calibrated on all their ancestors' tasks (the
   default before competence rows, ``population.pair_rows``)
13. ``breeding_refine``: the default manager with the refine escape (``population.refine``)
14. ``breeding_no_leader``: the default manager without the leader refine (``population.refine_leader: 0``)
15. ``breeding_leader_first``: the default manager with the leader refine before escape moves on a saturated
   top-k (``population.leader_first: true``)
16. ``breeding_no_screen``: the default manager without the screen (``population.screen: 0``: every pair
   gets the pair budget)

``--pair-param`` sets constant parameters of the pair method (e.g. ``ridge=1e-4`` for qp) for every row that
merges with it: the population rows, their joint merge, and ``cmaes_qp``.

Rows 1-3 are deterministic (one evaluation each); the search rows report the mean and spread over the seeds.
Every row's best model (by search fitness, plain aggregate) is scored on the held-out test split.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from evomerge.atomic import write_json_atomic
from evomerge.bench.harness import zoo_fitness
from evomerge.bench.options import add_zoo_arguments
from evomerge.errors import ConfigError
from evomerge.executors.base import EvalJob, InProcessExecutor
from evomerge.executors.worker import MergeEvalWorker, WorkerSpec
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.search.archive import Archive, CandidateRecord
from evomerge.search.driver import run_session
from evomerge.search.events import EventKind
from evomerge.search.optimizer import array_parametrization, build_optimizer
from evomerge.search.population.pair_search import PairSpace
from evomerge.search.population.session import run_population_session
from evomerge.search.population.status import waste
from evomerge.search.run import RunDir
from evomerge.search.space import space_from_dict
from evomerge.search.stopping import StopFlag
from evomerge.zoo.build import SPECIALISTS

NAME = "search"
HELP = "held-out scores: uniform, TA (λ grid), TIES, per-layer CMA-ES, Top-k greedy, population manager"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=int, default=200, help="evaluations per search row and seed (default 200)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (default 0 1 2)")
    parser.add_argument("--small", action="store_true", help="quick run: budget 30, seed 0 only")
    add_zoo_arguments(parser)
    parser.add_argument("--k", type=int, default=3, help="population top-k (default 3)")
    parser.add_argument("--pair-budget", type=int, default=6, help="evaluations per parent pair (default 6)")
    parser.add_argument("--pair-init", default="kinship",
                        help="starting weight of both parents of a pair merge: a number or 'kinship' (default)")
    parser.add_argument("--pair-method", default="qp",
                        help="how a parent pair is merged (qp, task_arithmetic, ties, dare_ties, ...; default qp); "
                             "the same for the greedy and the population rows")
    parser.add_argument("--pair-option", action="append", default=None, metavar="KEY=VALUE",
                        help="an option of the pair method, repeatable (default for qp: sequential=true)")
    parser.add_argument("--pair-param", action="append", default=None, metavar="KEY=VALUE",
                        help="a constant parameter of the pair method, repeatable (e.g. ridge=1e-4 for qp); the "
                             "joint merge and the cmaes_qp row use it too (default: the method's defaults)")
    parser.add_argument("--joint-budget", type=int, default=None,
                        help="evaluations of the joint merge's weight search in the rows that make one (default: "
                             "population.joint_budget's default, 0 = its fixed recipe)")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="subset of rows: " + " ".join(ROWS) + " (population = kinship)")
    parser.add_argument("--alpha", type=float, default=1.0, help="niche alpha of the niche row (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep run folders here (default: a temp dir)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON (atomically)")


ROWS = ("uniform", "ta", "ties", "cmaes", "cmaes_qp", "greedy", "kinship", "attraction", "niche", "joint",
        "breeding", "breeding_niche", "breeding_ancestors", "breeding_refine", "breeding_no_leader",
        "breeding_leader_first", "breeding_no_screen")
ALIASES = {"population": "kinship"}
LABELS = {
    "uniform": "uniform average",
    "ta": "task arithmetic (best λ of grid)",
    "ties": "TIES (defaults)",
    "cmaes": "per-layer CMA-ES, all models",
    "cmaes_qp": "per-layer CMA-ES of one sequential QP merge, all models",
    "greedy": "Top-k greedy, no kinship",
    "kinship": "kinship manager (before breeding)",
    "attraction": "attraction manager",
    "niche": "niche + attraction manager",
    "joint": "kinship manager + the joint merge of the originals",
    "breeding": "default manager (joint merge, screen, leader refine, both, skips, escapes + crossover)",
    "breeding_niche": "default manager with niche fitness (niche_alpha = --alpha)",
    "breeding_ancestors": "default manager, parents calibrated on all their ancestors' tasks",
    "breeding_refine": "default manager + the refine escape (the best merged member's merge searched again)",
    "breeding_no_leader": "default manager without the leader refine (the best's merge searched again on a stall)",
    "breeding_leader_first": "default manager, the leader refine before escape moves on a saturated top-k",
    "breeding_no_screen": "default manager without the screen (every pair its pair budget)",
}
# the manager as it was before behaviour-aware breeding (and before the joint merge of the originals)
_KINSHIP = {"niche_alpha": 0.0, "partner": "kinship", "identical_tol": None, "max_escapes": 0, "joint": False,
            "pair_rows": "ancestors", "refine_leader": 0, "leader_first": False, "screen": 0.0}


def manager_rows(alpha: float) -> dict[str, dict[str, Any]]:
    """The population section of each manager row (over the pair settings); ``breeding`` = the defaults."""
    return {
        "greedy": {**_KINSHIP, "explore": False, "saturation": None, "max_revivals": 0},
        "kinship": dict(_KINSHIP),
        "attraction": {**_KINSHIP, "partner": "attraction"},
        "niche": {**_KINSHIP, "partner": "attraction", "niche_alpha": alpha, "identical_tol": 0.002},
        "joint": {**_KINSHIP, "joint": True},
        "breeding": {},
        "breeding_niche": {"niche_alpha": alpha},
        "breeding_ancestors": {"pair_rows": "ancestors"},
        "breeding_refine": {"refine": True},
        "breeding_no_leader": {"refine_leader": 0},
        "breeding_leader_first": {"leader_first": True},
        "breeding_no_screen": {"screen": 0.0},
    }
TA_GRID = (0.2, 0.4, 0.6, 0.8, 1.0)


def _log(msg: str) -> None:
    print(f"[bench search] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.small:
        args.budget, args.seeds = min(args.budget, 30), args.seeds[:1]
    rows = [ALIASES.get(r, r) for r in (args.rows or ROWS)]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ConfigError(f"--rows: unknown {bad} (known: {', '.join(ROWS)})")
    managers = manager_rows(args.alpha)
    if set(managers) & set(rows):  # a bad pair method fails now, not after the baselines

        PairSpace(method=args.pair_method, options=pair_options(args.pair_option, args.pair_method),
                  parameters=pair_params(args.pair_param))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    zoo, spec = zoo_fitness(args.zoo_size, args.zoo_seed, args.metric)
    skills = list(SPECIALISTS)
    originals = {s: str(zoo / s) for s in skills}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="evomerge-bench-search-"))
    work.mkdir(parents=True, exist_ok=True)
    lab = _Lab(str(zoo / "base"), originals, spec, args.device, threads=args.threads if args.threads > 0 else None)
    results: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    t_all = time.perf_counter()
    try:
        if "uniform" in rows:
            results["uniform"].append(lab.fixed("uniform", _uniform(skills)))
        if "ta" in rows:
            grid = [(lam, lab.search_score(_ta(skills, lam))) for lam in TA_GRID]
            lam = max(grid, key=lambda g: g[1])[0]
            _log("task arithmetic grid (search split): " + ", ".join(f"λ={g[0]}: {g[1]:.4f}" for g in grid))
            results["ta"].append(lab.fixed(f"ta λ={lam}", _ta(skills, lam), evaluations=len(TA_GRID)))
        if "ties" in rows:
            results["ties"].append(lab.fixed("ties", _ties(skills)))
        # row by row in the order given (all seeds of a row, then the next), so a run cut short still has
        # complete rows; every finished row-seed is logged with its figures and written to --json at once
        for row in [r for r in rows if r in ("cmaes", "cmaes_qp") or r in managers]:
            for seed in args.seeds:
                t0 = time.perf_counter()
                try:
                    if row == "cmaes":
                        entry = _cmaes(lab, skills, args.budget, seed)
                    elif row == "cmaes_qp":
                        entry = _cmaes_qp(zoo, skills, spec, args, seed, work / f"{row}-seed{seed}")
                    else:
                        entry = _population(lab, zoo, originals, spec, args, seed, row, managers[row],
                                            work / f"{row}-seed{seed}")
                except Exception as exc:  # one failing row must not lose the others' figures
                    _log(f"{row} seed {seed}: FAILED: {type(exc).__name__}: {exc}")
                    continue
                entry["seconds"] = time.perf_counter() - t0
                results[row].append(entry)
                _log(f"RESULT {row} seed {seed}: held-out {entry['test']:.4f} ("
                     + ", ".join(f"{k} {v:.3f}" for k, v in entry["tasks"].items())
                     + f"), search {entry['search']:.4f}, {entry['seconds']:.0f}s")
                if args.json:
                    write_json_atomic(args.json, {"zoo": str(zoo), "metric": args.metric, "budget": args.budget,
                                                  "seeds": args.seeds, "rows": results, "partial": True})
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    table = _table(results, skills, args)
    print(table)
    total = time.perf_counter() - t_all
    print(f"\n{args.zoo_size} zoo (seed {args.zoo_seed}), metric {args.metric}, budget {args.budget} evaluations per "
          f"search row and seed, seeds {args.seeds}; held-out = mean over the {len(skills)} tasks of the test split; "
          f"{total / 60:.1f} min")
    if set(managers) & set(rows):
        opts = pair_options(args.pair_option, args.pair_method)
        params = pair_params(args.pair_param)
        print(f"pair merges: {args.pair_method}" + (f" {opts}" if opts else "") + (f" {params}" if params else "")
              + f", {args.pair_budget} evaluations "
              f"per pair, top-k {args.k}")
    if args.json:
        write_json_atomic(args.json, {"zoo": str(zoo), "metric": args.metric, "budget": args.budget,
                                      "seeds": args.seeds, "rows": results, "seconds": total})
    return 0


# ------------------------------------------------------------------------------------------------- lab


class _Lab:
    """One resident worker for all rows: score recipes on the search or the held-out test split."""

    def __init__(self, base: str, originals: Mapping[str, str], spec: Any, device: str,
                 threads: int | None = None) -> None:
        self.base, self.originals, self.spec, self.device = base, dict(originals), spec, device
        # the worker sets torch's thread count (None: every CPU this process may use), so --threads goes here
        self.worker = MergeEvalWorker(WorkerSpec(base=base, models=dict(originals), fitness=spec, device=device,
                                                 splits=("search", "test"), max_extra=4, threads=threads))
        self._ids = 0

    def score(self, recipe: Any, split: str, extra: Mapping[str, str] | None = None) -> Any:
        self._ids += 1
        return self.worker.evaluate(EvalJob(self._ids, recipe, split=split, extra_models=dict(extra or {}))).result

    def search_score(self, recipe: Any) -> float:
        return float(self.score(recipe, "search").aggregate)

    def test_scores(self, recipe: Any, extra: Mapping[str, str] | None = None) -> dict[str, float]:
        res = self.score(recipe, "test", extra)
        if not res.ok:
            raise RuntimeError(f"held-out evaluation failed: {res.error}")
        return {k: float(v) for k, v in res.task_values().items()}

    def fixed(self, label: str, recipe: Any, evaluations: int = 0) -> dict[str, Any]:
        tasks = self.test_scores(recipe)
        mean = sum(tasks.values()) / len(tasks)
        _log(f"{label}: held-out {mean:.4f}")
        return {"label": label, "test": mean, "tasks": tasks, "evaluations": evaluations,
                "recipe": recipe.to_dict()}


def _uniform(skills: Sequence[str]) -> Any:
    return Recipe("linear", tuple(ModelEntry(s) for s in skills))


def _ta(skills: Sequence[str], lam: float) -> Any:
    return Recipe("task_arithmetic", tuple(ModelEntry(s) for s in skills), base_model="base",
                  parameters={"lambda": ParamValue.constant(lam)})


def _ties(skills: Sequence[str]) -> Any:
    return Recipe("ties", tuple(ModelEntry(s) for s in skills), base_model="base")


# ------------------------------------------------------------------------------------------------- rows


def _progress(label: str, budget: int) -> Callable[[int, float], None]:
    t0 = time.perf_counter()

    def report(done: int, best: float) -> None:
        if done % 10 == 0 or done == budget:
            rate = done / max(1e-9, time.perf_counter() - t0)
            eta = (budget - done) / rate if rate > 0 else 0.0
            _log(f"{label}: {done}/{budget} evaluations, best {best:.4f}, {rate:.2f}/s, ETA {eta:.0f}s")

    return report


def _cmaes(lab: _Lab, skills: Sequence[str], budget: int, seed: int) -> dict[str, Any]:
    """Per-layer task-arithmetic weights of every specialist, one CMA-ES over all of them."""

    layers = lab.worker.merger.layer_map.num_layers
    space = PairSpace()
    x0 = np.full(len(skills) * layers, 0.5)
    opt = build_optimizer("CMA", array_parametrization(x0, space.lower, space.upper, space.sigma, seed), budget=budget)

    def recipe(x: np.ndarray) -> Recipe:
        return Recipe("task_arithmetic", tuple(
            ModelEntry(s, {"weight": ParamValue.per_layer([float(v) for v in x[i * layers:(i + 1) * layers]])})
            for i, s in enumerate(skills)), base_model="base", seed=seed)

    best: tuple[float, Any] = (-np.inf, None)
    report = _progress(f"cmaes seed {seed}", budget)
    for i in range(budget):
        cand = opt.ask()
        r = recipe(np.asarray(cand.value, float))
        score = lab.search_score(r)
        opt.tell(cand, -score)
        if score > best[0]:
            best = (score, r)
        report(i + 1, best[0])
    tasks = lab.test_scores(best[1])
    mean = sum(tasks.values()) / len(tasks)
    _log(f"cmaes seed {seed}: search {best[0]:.4f}, held-out {mean:.4f}")
    return {"label": f"cmaes seed {seed}", "seed": seed, "search": best[0], "test": mean, "tasks": tasks,
            "evaluations": budget, "recipe": best[1].to_dict()}


def _zoo_ref(args: argparse.Namespace) -> str:
    return f"zoo:{args.zoo_size}@{args.zoo_seed}" if args.zoo_seed else f"zoo:{args.zoo_size}"


def _cmaes_qp(zoo: Path, skills: Sequence[str], spec: Any, args: argparse.Namespace, seed: int,
              run_dir: Path) -> dict[str, Any]:
    """Per-layer QP objective weights of every specialist in one sequential QP merge, one CMA-ES over them, as
    `evomerge run` runs a plain search (its own in-process worker; the best re-scored on the test split)."""
    label = f"cmaes_qp seed {seed}"
    data = {
        **_space_common(_zoo_ref(args), skills, spec, args, f"bench-cmaes_qp-{seed}", seed),
        "methods": {"qp": {"weight": [0.0, 1.5], **pair_params(args.pair_param), "options": pair_options(None, "qp")}},
        "granularity": "per_layer",
        "executor": {"threads_per_worker": args.threads if args.threads > 0 else None},
    }
    space = space_from_dict(data, where=label, base_dir=run_dir.parent)
    shutil.rmtree(run_dir, ignore_errors=True)
    run = RunDir.create(run_dir, space, argv=["bench", "search"])
    run_session(run, space, progress=False, log=lambda m: None)
    with run.archive(readonly=True) as archive:
        best, tasks = _best_held_out(archive, label)
        evaluations = archive.count()
    mean = sum(tasks.values()) / len(tasks)
    _log(f"{label}: best #{best.id} search {best.aggregate:.4f}, held-out {mean:.4f}")
    return {"label": label, "seed": seed, "search": best.aggregate, "test": mean, "tasks": tasks,
            "evaluations": evaluations, "best": best.id, "recipe": best.recipe}


def _best_held_out(archive: Archive, label: str) -> tuple[CandidateRecord, dict[str, float]]:
    """A finished run's best candidate and its held-out test score per task (re-scored by the run)."""
    best = archive.best(1)[0]
    res = archive.rescore(best.id, "test")
    if res is None or res.status != "ok":
        raise RuntimeError(f"{label}: held-out evaluation of #{best.id} failed: {res.error if res else '-'}")
    return best, {k: float(v["value"]) for k, v in res.scores.items()}


def _population_space(zoo: Path, skills: Sequence[str], spec: Any, args: argparse.Namespace, seed: int,
                      row: str, section: Mapping[str, Any], zoo_ref: str) -> dict[str, Any]:
    """The search space of one population row (what `evomerge run` would be given)."""
    pop: dict[str, Any] = {"k": args.k, "pair_budget": args.pair_budget, **section}
    if args.joint_budget is not None:
        pop["joint_budget"] = args.joint_budget
    pop["pair"] = {"init": args.pair_init if args.pair_init == "kinship" else float(args.pair_init),
                   "method": args.pair_method, "options": pair_options(args.pair_option, args.pair_method),
                   "parameters": pair_params(args.pair_param)}
    return {
        **_space_common(zoo_ref, skills, spec, args, f"bench-{row}-{seed}", seed),
        "methods": {"task_arithmetic": {"weight": [0.0, 1.5]}},
        "population": pop,
    }


def _space_common(zoo_ref: str, skills: Sequence[str], spec: Any, args: argparse.Namespace, name: str,
                  seed: int) -> dict[str, Any]:
    """What every run-directory row's search space shares: the zoo's models, the fitness, a CMA-ES budget."""
    return {
        "name": name, "seed": seed,
        "models": {"base": f"{zoo_ref}/base", "fine_tunes": {s: f"{zoo_ref}/{s}" for s in skills}},
        "fitness": spec.model_dump(mode="json", exclude_none=True),
        "optimizer": {"name": "CMA", "budget": args.budget},
        "device": args.device, "progress_interval": 0, "test_top": 1,
    }


def pair_options(items: Sequence[str] | None, method: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings as method options (YAML scalars: true, 0.5, full); None: the bench's defaults."""
    if items is None:
        return {"sequential": True} if method == "qp" else {}
    return _key_values(items, "--pair-option")


def pair_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings as constant pair parameters (numbers, e.g. ``ridge=1e-4``); None: none (the method's
    defaults)."""
    out: dict[str, Any] = {}
    for key, value in _key_values(items or (), "--pair-param").items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--pair-param {key}={value}: a number expected") from None
    return out


def _key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _population(lab: _Lab, zoo: Path, originals: Mapping[str, str], spec: Any, args: argparse.Namespace, seed: int,
                row: str, section: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """A population row as a run directory driven like `evomerge run` (archive, events, test re-score)."""

    label = f"{row} seed {seed}"
    zoo_ref = _zoo_ref(args)
    data = _population_space(zoo, list(originals), spec, args, seed, row, section, zoo_ref)
    space = space_from_dict(data, where=label, base_dir=run_dir.parent)
    shutil.rmtree(run_dir, ignore_errors=True)
    run = RunDir.create(run_dir, space, argv=["bench", "search"])
    executor = InProcessExecutor(lambda: lab.worker, penalty=spec.effective_penalty)
    t0 = time.perf_counter()
    summary = run_population_session(run, space, executor, stop=StopFlag(), log=lambda m: _log(f"{label}: {m}"),
                                     progress=False)
    with run.archive(readonly=True) as archive:
        best, tasks = _best_held_out(archive, label)
        gens = [e["data"] for e in archive.events(EventKind.GENERATION_END)]
        wasted = waste(archive)
    mean = sum(tasks.values()) / len(tasks)
    _log(f"{label}: best #{best.id} ({' x '.join(map(str, best.parents))}) search {best.aggregate:.4f}, held-out "
         f"{mean:.4f}, {len(gens)} generations, stop: {summary.stop_reason} ({time.perf_counter() - t0:.0f}s); "
         f"waste: {wasted['since_improvement']} since the last improvement, {wasted['identical_pairs']} on identical "
         f"parents, {wasted['pairs_skipped']} pairs skipped")
    return {"label": label, "seed": seed, "search": best.aggregate, "test": mean, "tasks": tasks,
            "evaluations": summary.evaluations, "best": best.id, "parents": list(best.parents),
            "generations": len(gens), "stop": summary.stop_reason, "recipe": best.recipe, "waste": wasted}


def _table(results: Mapping[str, list[dict[str, Any]]], skills: Sequence[str], args: argparse.Namespace) -> str:
    head = "| row | held-out mean | ± sd | per seed | " + " | ".join(skills) + " | evaluations |"
    lines = [head, "|---|---|---|---|" + "---|" * len(skills) + "---|"]
    for row, entries in results.items():
        if not entries:
            continue
        tests = [e["test"] for e in entries]
        mean = statistics.fmean(tests)
        sd = statistics.stdev(tests) if len(tests) > 1 else 0.0
        per_task = {s: statistics.fmean(e["tasks"][s] for e in entries) for s in skills}
        per_seed = " / ".join(f"{t:.3f}" for t in tests) if len(tests) > 1 else ""
        evals = statistics.fmean(e["evaluations"] for e in entries)
        label = LABELS[row] + (f" ({entries[0]['label'].split(' ', 1)[1]})" if row == "ta" else "")
        lines.append(f"| {label} | {mean:.4f} | {sd:.4f} | {per_seed} | "
                     + " | ".join(f"{per_task[s]:.3f}" for s in skills) + f" | {evals:.0f} |")
    return "\n".join(lines)
