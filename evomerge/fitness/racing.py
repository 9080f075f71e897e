"""Racing: evaluate a candidate in stages over item subsets and stop it once it cannot beat the bar.

Stages run over a fixed, seeded order of each task's items (the same order for every candidate of a run, so
any two candidates are compared on exactly the same items): stage fractions such as 1/8, 1/4, 1/2, 1 take the
first ``ceil(f * n)`` items of every task (stratified by task, so every task is represented in its weight).

After each stage the candidate is compared with the bar (the incumbent, or the k-th best a population keeps)
on the items both have, with a paired statistic on item-level differences weighted like the aggregate:

- per task t, on the stage's items S_t: the ratio estimate of the task's difference
  ``D_t = sum_j w_j d_j / sum_j w_j`` with ``d_j = sign_t * (candidate_j - bar_j)`` and ``w_j`` the item's
  weight in the task value (1 per row for exact match, scored tokens for token accuracy);
- its variance under sampling without replacement from the task's N_t items:
  ``Var(D_t) = (1 - n/N) / (n * mean(w)^2) * sum_j (w_j (d_j - D_t))^2 / (n - 1)``;
- the aggregate difference ``D = sum_t a_t D_t`` (``a_t`` = task weight / total weight), ``Var(D) =
  sum_t a_t^2 Var(D_t)``; the chance that the candidate beats the bar on every item is ``Phi(D / sd(D))``
  (normal approximation; with no spread left, 1, 0.5 or 0 by the sign of D; a task sampled at a single item
  of several has no spread estimate, so the chance is then 0.5 and the sd infinite: never a reason to stop).

The candidate stops when the chance that it beats the bar by more than the ``margin`` (an indifference zone,
in aggregate units), ``Phi((D - margin) / sd(D))``, falls below the level and D < 0 (so a stopped candidate's
estimate is always below the bar); its estimate on all items is the bar's aggregate plus D (a paired estimate,
much tighter than the candidate's own subset mean). With margin 0 a candidate that beats the bar finishes with
probability at least 1 - level at each stage; with a margin that holds for one that beats it by more than the
margin, and a candidate estimated just below the bar stops instead of running to the end only because the
test cannot tell two close models apart. A candidate estimated at or above the bar always goes on. A stage with
fewer than ``min_items`` items in all is never a reason to stop, nor is the last stage.

Where it runs: the search's dispatcher sends a :class:`RaceBar` with each search job (the settings, the bar's
per-item results from the archive); the worker builds the :class:`RacePlan` over its own item lists
(:func:`plan_race`) and runs every stage on its resident merged model (:func:`run_race`), so a race costs one
job, one merge and no round trip per stage, in-process and on Ray workers alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.fitness.items import ItemList, ItemScores
from evomerge.fitness.result import EvalResult, TaskScore
from evomerge.killpoints import kill_point

# a first stage of 1/16: on the demo zoo (800 items, margin 0, 2026-12-03) it saved 3.2x items at the same
# held-out score, where starting at 1/8 saved 2.4x (`evomerge bench racing`); min_items keeps small splits from
# stopping on too few
# the margin is in the aggregate's units, which only the search space knows: 0 (the strict rule) unless it sets
# one; the demo spaces set 0.02 (`evomerge bench racing`: 3.1x fewer items for the population, 7.3x for the plain
# search, against 1.8x and 2.5x at 0), which on an exact-match score near 0.03 would stop nearly everything
DEFAULT_MARGIN = 0.0
DEFAULT_STAGES: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class RacingConfig:
    """The ``racing:`` section of a search space (``false`` turns racing off)."""

    enabled: bool = True
    stages: tuple[float, ...] = DEFAULT_STAGES
    level: float = 0.05
    min_items: int = 32
    margin: float = DEFAULT_MARGIN
    seed: int = 0

    def check(self, where: str = "racing") -> None:
        """ConfigError naming ``where`` for a level outside (0, 1) or stages not increasing to 1."""
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"{where}.level: must lie in (0, 1), got {self.level}")
        st = list(self.stages)
        if not st or any(not 0.0 < f <= 1.0 for f in st):
            raise ConfigError(f"{where}.stages: fractions in (0, 1], got {st}")
        if any(b <= a for a, b in zip(st, st[1:])):
            raise ConfigError(f"{where}.stages: must increase, got {st}")
        if st[-1] != 1.0:
            raise ConfigError(f"{where}.stages: the last stage must be the full split (1.0), got {st[-1]}")
        if self.min_items < 1:
            raise ConfigError(f"{where}.min_items: must be at least 1, got {self.min_items}")
        if not (math.isfinite(self.margin) and 0.0 <= self.margin < 1.0):
            raise ConfigError(f"{where}.margin: must lie in [0, 1), got {self.margin}")

    @staticmethod
    def from_value(value: Any, seed: int = 0, where: str = "racing") -> RacingConfig:
        """``false`` / ``true`` / a mapping with ``stages``, ``level``, ``min_items``, ``margin``."""
        if value is False or value is None:
            return RacingConfig(enabled=False, seed=seed)
        if value is True:
            return RacingConfig(seed=seed)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected false, true or a mapping (stages, level, min_items, margin), got "
                              f"{value!r}")
        known = {"stages", "level", "min_items", "margin", "enabled"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {', '.join(sorted(known))})")
        kwargs: dict[str, Any] = {"seed": seed}
        if "stages" in value:
            stages = value["stages"]
            if not isinstance(stages, (list, tuple)) or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) for s in stages):
                raise ConfigError(f"{where}.stages: a list of fractions, got {stages!r}")
            kwargs["stages"] = tuple(float(s) for s in stages)
        for key, kind in (("level", float), ("min_items", int), ("margin", float), ("enabled", bool)):
            if key in value:
                got = value[key]
                if not _of_kind(got, kind):
                    raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {got!r}")
                kwargs[key] = kind(got)
        cfg = RacingConfig(**kwargs)
        cfg.check(where)
        return cfg


def _of_kind(value: Any, kind: type) -> bool:
    """A YAML scalar usable as ``kind``: a real bool for bool; for numbers any int or float but a bool (an int
    only when whole)."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return kind is not int or float(value).is_integer()


def item_order(lists: Mapping[str, ItemList], seed: int) -> dict[str, np.ndarray]:
    """A fixed, seeded order of each task's scorable items (the same for every candidate of a run)."""
    out: dict[str, np.ndarray] = {}
    for task in sorted(lists):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _stable(task)])
        items = np.asarray(lists[task].scorable, dtype=np.int64)
        out[task] = items[rng.permutation(len(items))]
    return out


def _stable(text: str) -> int:
    h = 0
    for ch in text.encode():
        h = (h * 131 + ch) & 0xFFFFFFFF
    return h


def stage_items(order: Mapping[str, np.ndarray], fraction: float) -> dict[str, list[int]]:
    """The first ``ceil(fraction * n)`` items of each task's order (at least one per task)."""
    return {t: sorted(int(i) for i in o[: max(1, math.ceil(fraction * len(o)))]) for t, o in order.items()}


@dataclass(frozen=True)
class Comparison:
    """A candidate against the bar on the items it has: the paired difference, its spread, the chance."""

    difference: float  # estimated aggregate difference (candidate - bar) over every item
    stderr: float
    chance: float  # estimated probability that the candidate beats the bar on every item
    items: int  # items compared
    estimate: float  # the candidate's estimated aggregate on every item: bar aggregate + difference

    def chance_by(self, margin: float) -> float:
        """Estimated probability that the candidate beats the bar by more than ``margin`` on every item."""
        if margin == 0.0:
            return self.chance
        if not math.isfinite(self.stderr):
            return 0.5
        if self.stderr > 0:
            return 0.5 * (1.0 + math.erf((self.difference - margin) / (self.stderr * math.sqrt(2.0))))
        gap = self.difference - margin
        return 1.0 if gap > 0 else (0.5 if gap == 0 else 0.0)


def compare(candidate: Mapping[str, ItemScores], bar: Mapping[str, ItemScores], bar_aggregate: float,
            task_weights: Mapping[str, tuple[float, bool]]) -> Comparison:
    """The paired statistic of the module docstring. ``task_weights``: task -> (weight, higher is better)."""
    total_w = sum(w for w, _ in task_weights.values())
    if total_w <= 0:
        raise ValueError("task weights must sum to a positive number")
    diff = 0.0
    var = 0.0
    n_items = 0
    unknown = False  # a task with one sampled item of several: its spread cannot be estimated
    for task, (weight, higher) in task_weights.items():
        cand, ref = candidate.get(task), bar.get(task)
        if cand is None or ref is None:
            raise ValueError(f"task {task}: no item results to compare")
        if (cand.total, cand.content) != (ref.total, ref.content):
            raise ValueError(f"task {task}: the candidate and the bar were scored on different item lists")
        ref_s, _ = ref.dense()
        b = ref_s[cand.index].astype(np.float64)
        if np.isnan(b).any():
            raise ValueError(f"task {task}: the bar has no result on some of the candidate's items")
        w = cand.weights.astype(np.float64)
        d = (cand.scores.astype(np.float64) - b) * (1.0 if higher else -1.0)
        n = len(d)
        n_items += n
        a = weight / total_w
        d_t = float((w * d).sum() / w.sum())
        diff += a * d_t
        if n > 1 and n < cand.total:
            z = w * (d - d_t)
            s2 = float((z * z).sum() / (n - 1))
            var += a * a * (1.0 - n / cand.total) / (n * float(w.mean()) ** 2) * s2
        elif n == 1 < cand.total:
            unknown = True
    sd = math.sqrt(var)
    if unknown:
        sd, chance = math.inf, 0.5
    elif sd > 0:
        chance = 0.5 * (1.0 + math.erf(diff / (sd * math.sqrt(2.0))))
    else:
        chance = 1.0 if diff > 0 else (0.5 if diff == 0 else 0.0)
    return Comparison(diff, sd, chance, n_items, bar_aggregate + diff)


@dataclass(frozen=True)
class RacePlan:
    """What a worker needs to race one candidate without a round trip per stage: the stages' items, the bar's
    per-item results and aggregate, the task weights and the stopping rule."""

    stages: tuple[Mapping[str, Sequence[int]], ...]
    bar: Mapping[str, ItemScores]
    bar_aggregate: float
    task_weights: Mapping[str, tuple[float, bool]]
    level: float
    min_items: int
    bar_id: int | None = None  # the bar's candidate id (recorded with the result)
    margin: float = 0.0

    def should_stop(self, comparison: Comparison, stage: int) -> bool:
        """Stop before the last stage when the chance to beat the bar by more than the margin is below the level
        and the estimate is below the bar (enough items seen)."""
        return (stage < len(self.stages) - 1 and comparison.items >= self.min_items
                and comparison.difference < 0 and comparison.chance_by(self.margin) < self.level)


# ------------------------------------------------------------------------------------------------ in a search


@dataclass(frozen=True)
class RaceBar:
    """What a search job carries to race against: the settings and the bar (the incumbent, or the k-th best a
    population keeps) as archived: its per-item results on the search split, its aggregate, and each task's
    (weight, higher is better) it was scored with."""

    config: RacingConfig
    candidate_id: int
    items: Mapping[str, ItemScores]
    aggregate: float
    task_weights: Mapping[str, tuple[float, bool]]


class NotRaceable(ValueError):
    """Racing cannot apply to this job (the message says why); the candidate is evaluated on every item."""


def plan_race(bar: RaceBar, lists: Mapping[str, ItemList]) -> RacePlan:
    """The stages of ``bar.config`` over the worker's item lists, checked against the bar; NotRaceable naming
    the task when a task's value is not a mean of its items or the bar was scored on another item list."""
    if set(lists) != set(bar.task_weights):
        raise NotRaceable(f"the tasks {sorted(lists)} differ from the bar's {sorted(bar.task_weights)}")
    for task, il in lists.items():
        if not il.mean:
            raise NotRaceable(f"task {task}: its value is not a mean of its items")
        if not il.scorable:
            raise NotRaceable(f"task {task}: no item can be scored")
        ref = bar.items.get(task)
        if ref is None:
            raise NotRaceable(f"task {task}: the bar (candidate {bar.candidate_id}) has no per-item results")
        if (ref.total, ref.content) != (il.total, il.content):
            raise NotRaceable(f"task {task}: the bar (candidate {bar.candidate_id}) was scored on another item list")
        dense, _ = ref.dense()
        if np.isnan(dense[np.asarray(il.scorable, dtype=np.int64)]).any():
            raise NotRaceable(f"task {task}: the bar (candidate {bar.candidate_id}) lacks some of its items")
    order = item_order(lists, bar.config.seed)
    stages = tuple(stage_items(order, f) for f in bar.config.stages)
    return RacePlan(stages, dict(bar.items), float(bar.aggregate), dict(bar.task_weights), bar.config.level,
                    bar.config.min_items, bar.candidate_id, bar.config.margin)


def run_race(plan: RacePlan, score: Callable[[Mapping[str, Sequence[int]]], EvalResult]) -> EvalResult:
    """Score stage by stage (``score(items)`` scores only the items it is given: each stage's new ones) and stop
    as :meth:`RacePlan.should_stop` says. A stopped candidate's result is ``partial``: its items are those it saw,
    its task values their means, its aggregate the paired estimate; a finished one is the full evaluation (its
    task values the weighted means of all its items). ``settings["race"]`` records the stage reached, the last
    comparison and the bar."""
    last = len(plan.stages) - 1
    wanted = {t: set(int(i) for i in plan.stages[last].get(t, ())) for t in plan.task_weights}
    seen: dict[str, ItemScores] = {}
    done: dict[str, set[int]] = {t: set() for t in plan.task_weights}
    tasks: dict[str, TaskScore] = {}
    seconds = forward = 0.0
    res: EvalResult | None = None
    comparison: Comparison | None = None
    for k, stage in enumerate(plan.stages):
        new = {t: sorted(int(i) for i in stage.get(t, ()) if int(i) not in done[t]) for t in plan.task_weights}
        if not any(new.values()):
            continue
        res = score(new)
        seconds += res.seconds
        forward += res.forward_seconds
        if not res.ok:
            return dataclasses.replace(res, seconds=seconds, forward_seconds=forward)
        for t in res.tasks:
            tasks.setdefault(t.task, t)
        for task, got in res.items.items():
            seen[task] = seen[task].merged(got) if task in seen else got
            done[task].update(int(i) for i in got.index)
        if k == last or all(done[t] >= wanted[t] for t in wanted):
            break
        comparison = compare(seen, plan.bar, plan.bar_aggregate, plan.task_weights)
        kill_point("race_stage")
        if plan.should_stop(comparison, k):
            return _raced(plan, res, tasks, seen, seconds, forward, k, comparison, stopped=True)
    if res is None:
        raise ValueError("racing: the stages hold no item")
    return _raced(plan, res, tasks, seen, seconds, forward, k, comparison, stopped=False)


def _raced(plan: RacePlan, res: EvalResult, tasks: Mapping[str, TaskScore], seen: Mapping[str, ItemScores],
           seconds: float, forward: float, stage: int, comparison: Comparison | None, stopped: bool) -> EvalResult:
    ordered = tuple(dataclasses.replace(t, value=seen[t.task].value()) for t in tasks.values())
    race: dict[str, Any] = {"stage": stage + 1, "stages": len(plan.stages), "stopped": stopped, "bar": plan.bar_id,
                            "items": int(sum(len(s.index) for s in seen.values()))}
    if comparison is not None:
        race.update(chance=comparison.chance, difference=comparison.difference, estimate=comparison.estimate,
                    stderr=comparison.stderr if math.isfinite(comparison.stderr) else None)
    aggregate = comparison.estimate if stopped and comparison is not None else EvalResult.weighted_aggregate(ordered)
    return EvalResult(aggregate=aggregate, tasks=ordered, ok=True, split=res.split, seconds=seconds,
                      forward_seconds=forward, settings={**res.settings, "race": race}, items=dict(seen),
                      partial=stopped)
