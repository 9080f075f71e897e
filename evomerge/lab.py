"""A lab for studies over a zoo of fine-tunes: merge in memory and score, many times (mergeability, QP diagnostics).

- Mergeability of a fine-tune (seed c, "Will it Merge?"): its own-task score after merging it with ``M``
  randomly chosen other models, averaged over ``N`` trials (paper: M = 50, N = 5; it depends on the merge
  method, a parameter here), next to its base-knowledge predictor (the base model's score on its task).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.spec import FitnessSpec
from evomerge.merge.calibration.cache import cached_state
from evomerge.merge.engines.memory import merge_in_memory
from evomerge.merge.methods.registry import plan_recipe
from evomerge.merge.recipe import Recipe
from evomerge.method_data import MethodDataProvider, task_of
from evomerge.models.adapter import model_ref, resolve_ref
from evomerge.models.hf import load_causal_lm, load_tokenizer
from evomerge.models.layers import LayerMap
from evomerge.paths import resolve_path

Tensor = torch.Tensor


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

    def __init__(self, base: str, models: Mapping[str, str], spec: FitnessSpec, device: str = "cpu",
                 task_of_model: Mapping[str, str] | None = None, splits: tuple[str, ...] = ("search",)) -> None:
        self.base_key = "__base__"
        base_path = str(resolve_path(base))
        # a LoRA adapter fine-tune is named BASE+ADAPTER, so loading it needs no other context
        self.paths: dict[str, str] = {self.base_key: base_path,
                                      **{k: model_ref(resolve_ref(v), base_path) for k, v in models.items()}}
        self.keys = list(models)
        self.spec = spec
        self.device = device
        self.tokenizer = load_tokenizer(self.paths[self.base_key])
        self.evaluator = Evaluator(spec, self.tokenizer, device, splits=splits)
        self.cache: dict[str, Any] = {}
        self.probe = load_causal_lm(self.paths[self.base_key], device)
        self.states = {k: cached_state(self.cache, p) for k, p in self.paths.items()}
        self.config = self.probe.config
        names = [str(t.name) for t in spec.tasks]
        mapping = dict(task_of_model or {})
        self.task = {k: mapping.get(k) or task_of(k, names) for k in self.keys}
        self.data = MethodDataProvider(spec, self.paths[self.base_key], tokenizer=self.tokenizer, device=device,
                                       base_scorer=lambda: self.score_model(self.base_key).task_values())
        self._model_tasks = {k: (t,) for k, t in self.task.items()}
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

    def merge(self, recipe: Recipe) -> tuple[dict[str, Tensor], Any]:
        """Merged state dict (the method's data from this lab's fitness) and, for qp, the QPReport."""
        plan = plan_recipe(recipe, LayerMap.from_config(self.config.to_dict()))
        data = self.data.for_recipe(recipe, self._model_tasks)
        self.cache.pop("qp_report", None)
        plan = plan.prepare(self.paths, self.device, cache=self.cache, calibration=data.calibration,
                            base_scores=data.base_scores)
        return merge_in_memory(plan, self.states), self.cache.get("qp_report")

    def recipe(self, method: str, keys: Sequence[str], parameters: Mapping[str, Any] | None = None,
               options: Mapping[str, Any] | None = None, model_parameters: Mapping[str, Mapping[str, Any]] | None = None,
               seed: int = 0) -> Recipe:
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
