"""Mergeability (seed c, "Will it Merge?", Rahamim et al.): measuring it, predicting it, merging with it.

- Mergeability of a fine-tune: its own-task score after merging it with ``M`` randomly chosen other models,
  averaged over ``N`` trials (paper: M = 50, N = 5; it depends on the merge method, a parameter here).
- Base-knowledge predictor: the base model's score on that fine-tune's task (the paper's dominant predictor).
- Method ``mergeability_weighted``: ``w_t = softmax_t((1 - s_t)/tau)`` with ``s_t`` the base score on task t,
  ``theta = theta_0 + sum_t w_t tau_t``; ``tau`` was not reported in the paper, so it is a parameter (a gene).
  Base scores come from the per-model parameter ``base_score`` or, when a model has none, from the
  ``prepare`` hook (the caller's cached ``ctx.base_scores``, else measured with the evaluator on the fitness
  spec named by option ``fitness``, task matched to the model key's last path component).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------ method


def base_score_weights(scores: Sequence[float], tau: float) -> Tensor:
    """``softmax_t((1 - s_t)/tau)`` in float64 (the skill the base knows least gets the most weight)."""
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a positive finite number, got {tau}")
    s = torch.tensor([float(v) for v in scores], dtype=torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"non-finite base scores {list(scores)}")
    return torch.softmax((1.0 - s) / tau, dim=0)


def mergeability_weighted(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """``base + sum_t softmax((1 - base_score_t)/tau)_t * tau_t``; base scores per model or from ``prepare``."""
    if base is None:
        raise ValueError("mergeability_weighted needs a base tensor")
    from evomerge.merge.methods import work_dtype

    given = [float(m.get("base_score", -1.0)) for m in model_params]
    measured = options.get("base_scores")
    scores = []
    for i, g in enumerate(given):
        if g >= 0:
            scores.append(g)
        elif measured is not None and i < len(measured):
            scores.append(float(measured[i]))
        else:
            raise ValueError(f"model {i} has no base_score (set it per model, or let prepare measure it)")
    w = base_score_weights(scores, float(params.get("tau", 0.1)))
    wd = work_dtype(base, options)
    b = base.to(torch.float64)
    out = b.clone()
    deltas = bool(options.get("inputs_are_deltas", False))
    for wi, t in zip(w.tolist(), tensors):
        out.add_(t.to(torch.float64) if deltas else t.to(torch.float64) - b, alpha=wi)
    return out.to(wd)


def task_of(key: str, tasks: Sequence[str]) -> str:
    """The fitness task a model key stands for: the key itself or its last path component."""
    from evomerge.errors import ConfigError
    from evomerge.merge.calibration import _key_candidates

    for cand in _key_candidates(key):
        if cand in tasks:
            return cand
    raise ConfigError(f"model {key!r} matches no fitness task (tasks: {', '.join(tasks)}); name models after tasks")


def measure_base_scores(
    base_path: str,
    keys: Sequence[str],
    spec: Any,
    tokenizer: Any = None,
    split: str = "search",
    device: str = "cpu",
    task_of_model: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """The base model's score on each model's task (one evaluation of the base on the whole spec)."""
    from evomerge.errors import ConfigError
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.merge import calibration as C

    evaluator = Evaluator(spec, tokenizer if tokenizer is not None else C.load_tokenizer(base_path), device,
                          splits=(split,))
    res = evaluator.score(C.load_model(base_path, device), split)
    if not res.ok:
        raise ConfigError(f"scoring the base model {base_path} failed: {res.error}")
    values = res.task_values()
    mapping = dict(task_of_model or {})
    return {k: float(values[mapping.get(k) or task_of(k, list(values))]) for k in keys}


def prepare_mergeability(ctx: Any) -> dict[str, dict[str, Any]]:
    """Fill in base scores for models without a ``base_score`` parameter (cached in ``ctx.cache``)."""
    from evomerge.errors import ConfigError
    from evomerge.merge.registry import get_method, plan_inputs, resolve_options

    recipe = ctx.recipe
    method = get_method(recipe.method)
    plan = plan_inputs(recipe, method)
    missing = [k for k, i in zip(plan.models, plan.indices)
               if i is None or "base_score" not in recipe.models[i].parameters]
    if not missing or "base_score" in recipe.parameters:
        return {}
    known = dict(ctx.base_scores or {})
    need = [k for k in plan.models if k not in known]
    if need:
        opts = resolve_options(recipe, method)
        source = str(opts.get("fitness") or "")
        if not source:
            raise ConfigError(
                f"mergeability_weighted: no base_score for {', '.join(need)}; set base_score per model, "
                "or options.fitness to a fitness spec whose tasks are named after the models"
            )
        from evomerge.fitness.spec import FitnessSpec
        from evomerge.merge.calibration import _resolve

        ck = ("base_scores", source, str(ctx.model_paths[plan.base]))
        if ck not in ctx.cache:
            spec = FitnessSpec.from_yaml(_resolve(source))
            names = [str(t.name) for t in spec.tasks]
            ctx.cache[ck] = measure_base_scores(str(ctx.model_paths[plan.base]),
                                                [k for k in plan.models], spec, device=ctx.device,
                                                task_of_model={k: task_of(k, names) for k in plan.models})
        known.update(ctx.cache[ck])
    return {"*": {"base_scores": [known[k] for k in plan.models]}}


# ------------------------------------------------------------------------------------------ estimation


@dataclass
class MergeabilityRow:
    model: str
    task: str
    alone: float  # the fine-tune's own-task score, unmerged
    base_score: float  # the base-knowledge predictor
    mergeability: float  # mean own-task score after merging with M others
    trials: list[float] = field(default_factory=list)
    partners: list[list[str]] = field(default_factory=list)


@dataclass
class MergeabilityReport:
    rows: list[MergeabilityRow]
    method: str
    m: int
    n: int
    seed: int
    split: str

    def correlation(self, kind: str = "pearson") -> float:
        """Correlation across models between the base score and the mergeability (NaN with < 3 models)."""
        xs = [r.base_score for r in self.rows]
        ys = [r.mergeability for r in self.rows]
        return correlation(xs, ys, kind)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "m": self.m, "n": self.n, "seed": self.seed, "split": self.split,
                "pearson": self.correlation("pearson"), "spearman": self.correlation("spearman"),
                "rows": [r.__dict__ for r in self.rows]}

    def table(self) -> str:
        lines = [f"mergeability: own-task score after merging with M={self.m} random others, mean of N={self.n} "
                 f"trials (method {self.method}, split {self.split}, seed {self.seed})", "",
                 "| model | task | alone | base score (predictor) | mergeability | trials |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.model} | {r.task} | {r.alone:.3f} | {r.base_score:.3f} | {r.mergeability:.3f} | "
                         + " ".join(f"{v:.3f}" for v in r.trials) + " |")
        lines += ["", f"correlation(base score, mergeability): Pearson {self.correlation('pearson'):.3f}, "
                      f"Spearman {self.correlation('spearman'):.3f}"]
        return "\n".join(lines)


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def correlation(xs: Sequence[float], ys: Sequence[float], kind: str = "pearson") -> float:
    """Pearson or Spearman (average ranks for ties); NaN when undefined (fewer than 2 points, constant input)."""
    if kind not in ("pearson", "spearman"):
        raise ValueError(f"unknown correlation {kind!r}")
    if len(xs) != len(ys):
        raise ValueError("correlation needs equal-length inputs")
    if len(xs) < 2:
        return float("nan")
    if kind == "spearman":
        xs, ys = _ranks(xs), _ranks(ys)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


class ZooLab:
    """Loaded base + fine-tunes, an evaluator and a probe model: merge in memory and score, many times.

    Shared by ``evomerge mergeability``, ``evomerge qp-diagnose`` and ``evomerge bench methods``.
    """

    def __init__(self, base: str, models: Mapping[str, str], spec: Any, device: str = "cpu",
                 task_of_model: Mapping[str, str] | None = None, splits: tuple[str, ...] = ("search",)) -> None:
        from evomerge.fitness.evaluator import Evaluator
        from evomerge.merge import calibration as C

        self.base_key = "__base__"
        self.paths: dict[str, str] = {self.base_key: str(C._resolve(base)),
                                      **{k: str(C._resolve(v)) for k, v in models.items()}}
        self.keys = list(models)
        self.spec = spec
        self.device = device
        self.tokenizer = C.load_tokenizer(self.paths[self.base_key])
        self.evaluator = Evaluator(spec, self.tokenizer, device, splits=splits)
        self.cache: dict[str, Any] = {}
        self.probe = C.load_model(self.paths[self.base_key], device)
        self.cache["probe_model"] = C.load_model(self.paths[self.base_key])
        self.states = {k: C.cached_state(self.cache, p) for k, p in self.paths.items()}
        names = [str(t.name) for t in spec.tasks]
        mapping = dict(task_of_model or {})
        self.task = {k: mapping.get(k) or task_of(k, names) for k in self.keys}
        self.calibration = C.calibration_from_spec(spec, self.tokenizer, "search",
                                                   task_of_model=self.task)
        self._scores: dict[tuple[str, str], Any] = {}

    def score_state(self, state: Mapping[str, Tensor], split: str = "search") -> Any:
        self.probe.load_state_dict(dict(state), strict=False)
        return self.evaluator.score(self.probe, split)

    def score_model(self, key: str, split: str = "search") -> Any:
        ck = (key, split)
        if ck not in self._scores:
            self._scores[ck] = self.score_state(self.states[key], split)
        return self._scores[ck]

    def base_scores(self, split: str = "search") -> dict[str, float]:
        values = self.score_model(self.base_key, split).task_values()
        return {k: float(values[self.task[k]]) for k in self.keys}

    def merge(self, recipe: Any, report: bool = False) -> tuple[dict[str, Tensor], Any]:
        """Merged state dict (running the method's prepare hook) and, for qp, the QPReport."""
        from evomerge.merge import calibration as C
        from evomerge.merge.registry import MethodContext, get_method

        method = get_method(recipe.method)
        prepared = None
        qp_report = None
        if method.prepare is not None:
            self.cache.pop("qp_report", None)
            ctx = MethodContext(recipe, self.paths, self.device, self.calibration, None, self.cache)
            prepared = method.prepare(ctx)
            qp_report = self.cache.get("qp_report")
        state = C.merge_in_memory(recipe, self.states, self.probe.config, prepared)
        return state, qp_report

    def recipe(self, method: str, keys: Sequence[str], parameters: Mapping[str, Any] | None = None,
               options: Mapping[str, Any] | None = None, model_parameters: Mapping[str, Mapping[str, Any]] | None = None,
               seed: int = 0) -> Any:
        from evomerge.merge.recipe import Recipe

        return Recipe.from_dict({
            "method": method, "base_model": self.base_key,
            "models": [{"model": k, "parameters": dict((model_parameters or {}).get(k, {}))} for k in keys],
            "parameters": dict(parameters or {}), "options": dict(options or {}), "seed": seed,
        })


def estimate_mergeability(
    lab: ZooLab,
    m: int = 2,
    n: int = 3,
    method: str = "linear",
    seed: int = 0,
    split: str = "search",
    parameters: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> MergeabilityReport:
    """Each model's own-task score merged with ``m`` random others (``n`` seeded trials) and its base score."""
    import sys
    import time

    from evomerge.errors import ConfigError

    keys = lab.keys
    if m < 1 or m > len(keys) - 1:
        raise ConfigError(f"mergeability: M = {m} must be between 1 and the number of other models ({len(keys) - 1})")
    if n < 1:
        raise ConfigError(f"mergeability: N = {n} must be at least 1")
    base = lab.base_scores(split)
    rows = []
    total = len(keys) * n
    done = 0
    t0 = time.perf_counter()
    for i, k in enumerate(keys):
        rng = random.Random(f"{seed}:{k}")
        others = [o for o in keys if o != k]
        trials, partners = [], []
        for trial in range(n):
            chosen = sorted(rng.sample(others, m))
            recipe = lab.recipe(method, [k, *chosen], parameters, options, seed=seed * 1000 + i * 100 + trial)
            state, _ = lab.merge(recipe)
            res = lab.score_state(state, split)
            trials.append(float(res.task_values()[lab.task[k]]) if res.ok else float("nan"))
            partners.append(chosen)
            done += 1
            if progress:
                el = time.perf_counter() - t0
                print(f"[mergeability] {done}/{total} merges ({done / el:.2f}/s, eta {(total - done) * el / done:.0f}s)",
                      file=sys.stderr, flush=True)
        alone = float(lab.score_model(k, split).task_values()[lab.task[k]])
        finite = [v for v in trials if math.isfinite(v)]
        rows.append(MergeabilityRow(k, lab.task[k], alone, base[k],
                                    sum(finite) / len(finite) if finite else float("nan"), trials, partners))
    return MergeabilityReport(rows, method, m, n, seed, split)


def _register() -> None:
    from evomerge.merge.qp import _prepare_kw
    from evomerge.merge.registry import REGISTRY, MergeMethod, OptionSpec, ParamSpec

    if "mergeability_weighted" in REGISTRY:
        return
    REGISTRY.register(MergeMethod(
        "mergeability_weighted", mergeability_weighted,
        (
            ParamSpec("base_score", -1.0, 0.0, 1.0, True,
                      "the base model's score on this model's task (unset: measured by prepare)"),
            ParamSpec("tau", 0.1, 1e-6, None, False,
                      "softmax temperature over (1 - base score); large tau -> uniform mean of task vectors"),
        ),
        (
            OptionSpec("fitness", "", None,
                       "fitness spec used to measure missing base scores (tasks named after the models)"),
        ),
        needs_base=True, min_models=1,
        doc="Will-it-Merge weighting: base + sum_t softmax((1 - base_score_t)/tau) tau_t",
        **_prepare_kw(prepare_mergeability),
    ))


_register()
