"""Building blocks of the population manager's pair searches: the pair genome, its optimizer, the parent cache.

- :class:`PairSpace`: the genome of one parent pair's merge: per-layer weights of the two parents (``points``
  values each, interpolated across layers as mergekit gradients), merged by task arithmetic against the common
  base: θ = θ0 + w_A(l) τ_A + w_B(l) τ_B.
- :func:`make_optimizer`: a seeded nevergrad optimizer over that genome (a resumed pair replays into a fresh one).
- :class:`ParentCache`: merged parents materialized on disk on demand (LRU, bounded in bytes); workers load
  them into their resident merger through ``EvalJob.extra_models``.

The driver that uses them over the run's archive is :mod:`evomerge.search.population_driver`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.executors.worker import MergeEvalWorker, WorkerSpec
from evomerge.merge.engines.disk import merge_to_disk
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.method_data import MethodData

# ------------------------------------------------------------------------------------------------- worker


def PopulationWorker(base: str | os.PathLike[str], models: Mapping[str, str | os.PathLike[str]], spec: Any,  # noqa: N802
                     device: str = "cpu", max_extra: int = 4,
                     splits: tuple[str, ...] = ("search",)) -> MergeEvalWorker:
    """A :class:`~evomerge.executors.worker.MergeEvalWorker` over base + originals (keyword shortcut)."""
    return MergeEvalWorker(WorkerSpec(base=str(base), models={k: str(v) for k, v in models.items()}, fitness=spec,
                                      device=device, splits=splits, max_extra=max_extra))


# ------------------------------------------------------------------------------------------------- parents


class ParentCache:
    """Merged parents materialized on disk under ``root`` on demand; least recently used evicted beyond
    ``max_bytes`` (never the ones needed now). A recipe is deterministic, so an evicted parent is rebuilt."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._used: OrderedDict[str, int] = OrderedDict()
        for d in sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime):
            if d.is_dir() and (d / "config.json").is_file():
                self._used[d.name] = _dir_bytes(d)
        self.materialized = 0

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str, recipe_of: Callable[[str], Recipe], path_of: Callable[[str], str],
            keep: Sequence[str] = (),
            data_of: Callable[[Recipe, Mapping[str, str]], MethodData] | None = None) -> Path:
        """The folder of merged model ``key`` (built from ``recipe_of(key)`` whose inputs ``path_of`` resolves;
        ``data_of(recipe, model key -> folder)`` gives data-aware methods their task rows or base scores)."""
        target = self.path(key)
        if key in self._used and (target / "config.json").is_file():
            self._used.move_to_end(key)
            return target
        recipe = recipe_of(key)
        concrete = dataclasses.replace(
            recipe, base_model=path_of(recipe.base_model) if recipe.base_model else None,
            models=tuple(ModelEntry(path_of(m.model), m.parameters) for m in recipe.models), dtype="float32")
        data = data_of(recipe, {m.model: path_of(m.model) for m in recipe.models}) if data_of else MethodData()
        merge_to_disk(concrete, target, overwrite=True, progress=False, calibration=data.calibration,
                      base_scores=data.base_scores)
        self.materialized += 1
        self._used[key] = _dir_bytes(target)
        self._evict(set(keep) | {key})
        return target

    def _evict(self, keep: set[str]) -> None:
        total = sum(self._used.values())
        for key in list(self._used):
            if total <= self.max_bytes:
                break
            if key in keep:
                continue
            total -= self._used.pop(key)
            shutil.rmtree(self.path(key), ignore_errors=True)

    @property
    def bytes(self) -> int:
        return sum(self._used.values())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------- lineage


def ancestor_tasks(key: str, recipe_of: Callable[[str], Recipe | None], task_names: Sequence[str]
                   ) -> tuple[str, ...]:
    """The fitness tasks a model stands for in data-aware merges: an original's own task (the task of the
    same name), a merged member's the ordered union of its parents' (``recipe_of`` gives a member's recipe,
    None for an original)."""
    names = set(task_names)
    out: list[str] = []
    seen: set[str] = set()

    def visit(k: str) -> None:
        if k == BASE_KEY or k in seen:
            return
        seen.add(k)
        recipe = recipe_of(k)
        if recipe is None:
            if k in names and k not in out:
                out.append(k)
            return
        for m in recipe.models:
            visit(m.model)

    visit(key)
    return tuple(out)


# ------------------------------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class PairSpace:
    """The genome of one pair merge: ``points`` per-layer weights per parent in [lower, upper]."""

    points: int = 2
    lower: float = 0.0
    upper: float = 1.5
    # The fixed recipe (budget 0) and the search's starting point: a number (the same weight for both parents) or
    # "kinship": w = 1 / (1 + max(0, cos(τ_A, τ_B))) for both, i.e. the sum of unrelated task vectors
    # (cos 0 -> w = 1) and the mean of identical ones (cos 1 -> w = 0.5), smoothly in between.
    init: float | str = "kinship"
    optimizer: str = "CMA"
    # how the two parents are merged: any registry method with a base and per-model weights (task_arithmetic,
    # ties, dare_ties, qp, ...); ``parameters`` are further constant per-model parameters (e.g. density),
    # ``options`` the method's options (e.g. qp's basis and sequential)
    method: str = "task_arithmetic"
    sigma: float = 0.25
    parameters: Mapping[str, float] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dims(self) -> int:
        return 2 * self.points

    def __post_init__(self) -> None:
        from evomerge.merge.methods.registry import get_method, validate_recipe

        if isinstance(self.init, str) and self.init != "kinship":
            raise ConfigError(f"pair init: a weight or 'kinship', got {self.init!r}")
        if self.points < 1 or not self.lower < self.upper:
            raise ConfigError(f"pair space: points >= 1 and lower < upper (got {self.points}, {self.lower}, "
                              f"{self.upper})")
        if not isinstance(self.parameters, Mapping) or not isinstance(self.options, Mapping):
            raise ConfigError("pair space: parameters and options must be mappings")
        method = get_method(self.method)  # unknown names: a ConfigError listing the methods
        names = {p.name for p in method.params}
        if not method.needs_base or "weight" not in names:
            raise ConfigError(f"pair method {self.method!r}: a pair merge needs a method with a base model and "
                              "per-model weights (task_arithmetic, ties, dare_ties, breadcrumbs, qp, ...)")
        bad = {k: v for k, v in self.parameters.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise ConfigError(f"pair parameters: numbers expected, got {bad}")
        if "weight" in self.parameters:
            raise ConfigError("pair parameters: 'weight' is the pair genome's; set lower/upper/init instead")
        validate_recipe(self.recipe("a", "b", self.x0(0.0)), where=f"pair method {self.method}")

    def x0(self, cos: float | None = None) -> np.ndarray:
        """The starting genome; with ``init: kinship`` it needs the parents' cosine kinship."""
        if self.init == "kinship":
            c = 0.0 if cos is None or not math.isfinite(cos) else max(0.0, min(1.0, cos))
            w = 1.0 / (1.0 + c)
        else:
            w = float(self.init)
        return np.clip(np.full(self.dims, w), self.lower, self.upper)

    def recipe(self, a: str, b: str, x: Sequence[float], seed: int = 0) -> Recipe:
        p = self.points
        wa = ParamValue.per_layer([float(v) for v in x[:p]]) if p > 1 else ParamValue.constant(float(x[0]))
        wb = ParamValue.per_layer([float(v) for v in x[p:]]) if p > 1 else ParamValue.constant(float(x[p]))
        fixed = {k: ParamValue.constant(float(v)) for k, v in self.parameters.items()}
        return Recipe(self.method, (ModelEntry(a, {"weight": wa, **fixed}), ModelEntry(b, {"weight": wb, **fixed})),
                      base_model=BASE_KEY, seed=seed, options=dict(self.options))


def make_optimizer(name: str, x0: np.ndarray, lower: float, upper: float, sigma: float, budget: int,
                   seed: int, num_workers: int = 1) -> Any:
    """A seeded nevergrad optimizer over a bounded array starting at ``x0`` (no global RNG involved)."""
    import warnings

    import nevergrad as ng

    if name not in ng.optimizers.registry:
        raise ConfigError(f"unknown nevergrad optimizer {name!r} (e.g. CMA, NGOpt, DE, TwoPointsDE, OnePlusOne)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "bounds are k sigma away": intended for small per-pair budgets
        param = ng.p.Array(init=np.asarray(x0, float)).set_bounds(lower, upper)
        param.set_mutation(sigma=sigma)
    param.random_state = np.random.RandomState(seed)
    return ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=max(1, num_workers))


def seed_of(*parts: object) -> int:
    """A stable 32-bit seed from ``parts`` (the same pair always starts its optimizer the same way)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")
