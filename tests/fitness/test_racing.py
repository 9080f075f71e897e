"""Racing statistics: hand cases of the paired statistic, stage orders, and the configuration's errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.fitness.items import ItemList, ItemScores
from evomerge.fitness.racing import (
    Comparison,
    NotRaceable,
    RaceBar,
    RacePlan,
    RacingConfig,
    compare,
    item_order,
    plan_race,
    run_race,
    stage_items,
)
from evomerge.fitness.result import EvalResult, TaskScore


def _items(task: str, index: list[int], scores: list[float], total: int, weights: list[float] | None = None
           ) -> ItemScores:
    return ItemScores.of(task, index, scores, weights or [1.0] * len(index), total, "h")


def test_paired_difference_hand_case() -> None:
    # 4 of 8 items seen; candidate - bar = [1, 0, 0, -1] + 0.5 shift on item 2: d = [1, 0, 0.5, -1]
    bar = _items("t", list(range(8)), [0, 1, 0, 1, 1, 0, 1, 0], 8)
    cand = _items("t", [0, 1, 2, 3], [1, 1, 0.5, 0], 8)
    c = compare({"t": cand}, {"t": bar}, bar_aggregate=0.5, task_weights={"t": (1.0, True)})
    d = np.array([1, 0, 0.5, -1])
    mean = d.mean()
    var = (1 - 4 / 8) / 4 * ((d - mean) ** 2).sum() / 3
    assert c.difference == pytest.approx(mean)
    assert c.stderr == pytest.approx(math.sqrt(var))
    assert c.chance == pytest.approx(0.5 * (1 + math.erf(mean / math.sqrt(2 * var))))
    assert c.estimate == pytest.approx(0.5 + mean) and c.items == 4


def test_weights_directions_and_task_weights() -> None:
    # token-weighted items: D_t = sum w d / sum w; a minimized task enters negated; task weights 3:1
    bar = {"a": _items("a", [0, 1, 2], [0.5, 0.5, 0.5], 3), "b": _items("b", [0, 1], [2.0, 2.0], 2)}
    cand = {"a": _items("a", [0, 1, 2], [1.0, 0.0, 0.5], 3, weights=[3, 1, 1]),
            "b": _items("b", [0, 1], [1.0, 1.0], 2)}
    c = compare(cand, bar, 0.0, {"a": (3.0, True), "b": (1.0, False)})
    d_a = (3 * 0.5 + 1 * -0.5 + 0) / 5
    d_b = +1.0  # lower is better: 1 < 2 is a gain of 1
    assert c.difference == pytest.approx(0.75 * d_a + 0.25 * d_b)
    assert c.stderr == 0.0  # every item seen: no sampling error left
    assert c.chance == 1.0


def test_no_spread_gives_the_sign_and_errors_name_the_task() -> None:
    bar = _items("t", list(range(10)), [1.0] * 10, 10)
    worse = _items("t", [0, 1, 2], [0.0, 0.0, 0.0], 10)
    assert compare({"t": worse}, {"t": bar}, 1.0, {"t": (1.0, True)}).chance == 0.0
    same = _items("t", [0, 1, 2], [1.0, 1.0, 1.0], 10)
    assert compare({"t": same}, {"t": bar}, 1.0, {"t": (1.0, True)}).chance == 0.5
    one = compare({"t": _items("t", [4], [0.0], 10)}, {"t": bar}, 1.0, {"t": (1.0, True)})
    assert one.chance == 0.5 and one.stderr == math.inf and one.difference == -1.0  # one item: no spread known
    other = ItemScores.of("t", [0], [1.0], [1.0], 10, "other")
    with pytest.raises(ValueError, match="different item lists"):
        compare({"t": other}, {"t": bar}, 1.0, {"t": (1.0, True)})
    partial_bar = _items("t", [0], [1.0], 10)
    with pytest.raises(ValueError, match="no result on some"):
        compare({"t": worse}, {"t": partial_bar}, 1.0, {"t": (1.0, True)})


def test_a_clearly_worse_candidate_stops_and_a_better_one_never_does() -> None:
    rng = np.random.default_rng(0)
    n = 400
    bar_s = (rng.random(n) < 0.6).astype(float)
    bar = {"t": _items("t", list(range(n)), bar_s.tolist(), n)}
    order = item_order({"t": ItemList(n, tuple(range(n)), "h", True)}, seed=3)
    stages = [stage_items(order, f) for f in (0.125, 0.25, 0.5, 1.0)]
    plan = RacePlan(tuple(stages), bar, float(bar_s.mean()), {"t": (1.0, True)}, level=0.05, min_items=32)
    worse = np.where(rng.random(n) < 0.5, 0.0, bar_s)  # loses half of the bar's solved items
    better = np.maximum(bar_s, (rng.random(n) < 0.3).astype(float))
    for scores, stops in ((worse, True), (better, False)):
        first = stages[0]["t"]
        cand = {"t": _items("t", first, scores[first].tolist(), n)}
        c = compare(cand, bar, plan.bar_aggregate, plan.task_weights)
        assert plan.should_stop(c, 0) is stops
    # never at the last stage, never on too few items
    tiny = compare({"t": _items("t", [0, 1], [0.0, 0.0], n)}, bar, plan.bar_aggregate, plan.task_weights)
    assert not plan.should_stop(tiny, 0)
    assert not plan.should_stop(compare({"t": _items("t", list(range(n)), worse.tolist(), n)}, bar,
                                        plan.bar_aggregate, plan.task_weights), 3)


def test_stage_orders_are_seeded_stratified_and_nested() -> None:
    lists = {"a": ItemList(40, tuple(range(40)), "x", True), "b": ItemList(8, (0, 2, 4, 6), "y", True)}
    o1, o2, o3 = item_order(lists, 1), item_order(lists, 1), item_order(lists, 2)
    assert all((o1[t] == o2[t]).all() for t in lists) and not (o1["a"] == o3["a"]).all()
    assert sorted(o1["b"].tolist()) == [0, 2, 4, 6]  # only scorable items
    s1, s2 = stage_items(o1, 0.125), stage_items(o1, 0.5)
    assert len(s1["a"]) == 5 and len(s1["b"]) == 1 and len(s2["a"]) == 20
    assert set(s1["a"]) <= set(s2["a"])
    assert stage_items(o1, 1.0)["a"] == list(range(40))


@pytest.mark.parametrize("value, message", [
    ({"level": 1.0}, r"racing\.level: must lie in \(0, 1\)"),
    ({"level": 0}, r"racing\.level"),
    ({"stages": [0.5, 0.25, 1.0]}, "must increase"),
    ({"stages": [0.25, 0.5]}, "last stage must be the full split"),
    ({"stages": [0, 1.0]}, r"fractions in \(0, 1\]"),
    ({"speed": 3}, r"unknown key\(s\) \['speed'\]"),
    ({"margin": -0.01}, r"racing\.margin: must lie in \[0, 1\)"),
    ({"margin": "0.01"}, r"racing\.margin: expected float, got '0.01'"),
    ({"min_items": 2.5}, r"racing\.min_items: expected int, got 2.5"),
    ({"enabled": 1}, r"racing\.enabled: expected bool, got 1"),
    ("fast", "expected false, true or a mapping"),
])
def test_bad_racing_sections_are_named(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RacingConfig.from_value(value, where="racing")


def test_racing_values() -> None:
    assert not RacingConfig.from_value(False).enabled
    cfg = RacingConfig.from_value({"stages": [0.2, 1], "level": 0.1}, seed=7)
    assert cfg.enabled and cfg.stages == (0.2, 1.0) and cfg.level == 0.1 and cfg.seed == 7
    assert RacingConfig.from_value(True).stages == (0.0625, 0.125, 0.25, 0.5, 1.0)
    assert RacingConfig.from_value(True).margin == 0.0  # the strict rule unless the space sets one
    assert RacingConfig.from_value({"margin": 0.01}).margin == 0.01


def test_margin_stops_a_close_candidate_below_the_bar_and_never_one_above_it() -> None:
    # hand case: D = -0.01, sd = 0.02 -> chance to beat the bar Phi(-0.5) = 0.309 (runs on at level 0.05);
    # chance to beat it by more than 0.03: Phi(-2) = 0.0228 < 0.05 (stops)
    c = Comparison(difference=-0.01, stderr=0.02, chance=0.5 * (1 + math.erf(-0.5 / math.sqrt(2))), items=100,
                   estimate=0.49)
    assert c.chance_by(0.03) == pytest.approx(0.5 * (1 + math.erf(-2 / math.sqrt(2))))
    assert c.chance_by(0.0) == c.chance
    stages = ({"t": [0]}, {"t": [0, 1]})
    plain = RacePlan(stages, {}, 0.5, {"t": (1.0, True)}, level=0.05, min_items=32)
    zoned = dataclasses.replace(plain, margin=0.03)
    assert not plain.should_stop(c, 0) and zoned.should_stop(c, 0)
    assert not dataclasses.replace(plain, margin=0.02).should_stop(c, 0)  # Phi(-1.5) = 0.067 >= 0.05
    above = Comparison(0.001, 0.01, 0.54, 100, 0.501)  # estimated above the bar: always runs on
    assert above.chance_by(0.03) < 0.05 and not zoned.should_stop(above, 0)
    # no spread left: the sign of D - margin; no spread known (one item of several): 0.5, never a stop
    exact = Comparison(-0.01, 0.0, 0.0, 100, 0.49)
    assert exact.chance_by(0.03) == 0.0 and Comparison(0.05, 0.0, 1.0, 100, 0.55).chance_by(0.03) == 1.0
    assert Comparison(-1.0, math.inf, 0.5, 1, 0.0).chance_by(0.03) == 0.5


# ------------------------------------------------------------------------------------------------ in a search


def _scorer(values: dict[str, np.ndarray], calls: list[dict[str, list[int]]]):
    """A score function over fixed per-item values that records which items each call was given."""

    def score(items):
        calls.append({t: list(v) for t, v in items.items()})
        tasks, per_item = [], {}
        for t, idx in items.items():
            if not idx:
                continue
            per_item[t] = ItemScores.of(t, idx, values[t][idx].tolist(), [1.0] * len(idx), len(values[t]), "h")
            tasks.append(TaskScore(t, "exact_match", per_item[t].value()))
        return EvalResult(aggregate=EvalResult.weighted_aggregate(tuple(tasks)), tasks=tuple(tasks), items=per_item,
                          settings={"split": "search"}, seconds=0.5)

    return score


def _bar(values: dict[str, np.ndarray], config: RacingConfig) -> RaceBar:
    items = {t: ItemScores.of(t, range(len(v)), v.tolist(), [1.0] * len(v), len(v), "h") for t, v in values.items()}
    agg = float(np.mean([it.value() for it in items.values()]))
    return RaceBar(config, 7, items, agg, {t: (1.0, True) for t in values})


def test_run_race_scores_each_stage_once_and_stops_a_loser_with_its_estimate() -> None:
    rng = np.random.default_rng(1)
    bar_v = {"a": (rng.random(160) < 0.6).astype(float), "b": (rng.random(80) < 0.5).astype(float)}
    cfg = RacingConfig(stages=(0.125, 0.5, 1.0), level=0.05, min_items=16, seed=4)
    lists = {t: ItemList(len(v), tuple(range(len(v))), "h", True) for t, v in bar_v.items()}
    plan = plan_race(_bar(bar_v, cfg), lists)
    assert plan.bar_id == 7 and [len(s["a"]) for s in plan.stages] == [20, 80, 160]
    # a loser (solves only a third of what the bar solves): one call, the first stage's items only
    worse = {t: v * (rng.random(len(v)) < 0.33) for t, v in bar_v.items()}
    calls: list[dict[str, list[int]]] = []
    res = run_race(plan, _scorer(worse, calls))
    assert res.ok and res.partial and len(calls) == 1 and calls[0] == {t: list(plan.stages[0][t]) for t in bar_v}
    c = compare(res.items, plan.bar, plan.bar_aggregate, plan.task_weights)
    assert res.aggregate == pytest.approx(c.estimate) and res.settings["race"]["stage"] == 1
    assert res.settings["race"]["chance"] == pytest.approx(c.chance) and c.chance < 0.05
    assert res.settings["split"] == "search" and res.seconds == pytest.approx(0.5)
    for t in res.tasks:  # the task values of a stopped candidate are those of the items it saw
        assert t.value == pytest.approx(res.items[t.task].value())
    # a winner: every stage, each item scored exactly once, the result that of every item
    better = {t: np.maximum(v, rng.random(len(v)) < 0.3) for t, v in bar_v.items()}
    calls = []
    res = run_race(plan, _scorer(better, calls))
    assert not res.partial and res.complete and len(calls) == 3
    for t in bar_v:
        got = [i for call in calls for i in call[t]]
        assert sorted(got) == list(range(len(bar_v[t])))  # no item twice
    want = np.mean([better[t].mean() for t in bar_v])
    assert res.aggregate == pytest.approx(want) and res.seconds == pytest.approx(1.5)
    assert res.settings["race"] == {**res.settings["race"], "stage": 3, "stopped": False, "items": 240}


def test_run_race_skips_stages_without_new_items_and_never_stops_a_complete_candidate() -> None:
    # 2 items in one task: every stage has them all after the first; a worse candidate is complete, not partial
    bar_v = {"tiny": np.array([1.0, 1.0])}
    cfg = RacingConfig(stages=(0.125, 0.5, 1.0), level=0.5, min_items=1)
    plan = plan_race(_bar(bar_v, cfg), {"tiny": ItemList(2, (0, 1), "h", True)})
    calls: list[dict[str, list[int]]] = []
    res = run_race(plan, _scorer({"tiny": np.array([0.0, 0.0])}, calls))
    assert len(calls) == 2 and calls[0] == {"tiny": [plan.stages[0]["tiny"][0]]}
    assert not res.partial and res.aggregate == 0.0
    # a level above one half never stops a candidate whose estimate is above the bar
    c = Comparison(difference=0.01, stderr=0.1, chance=0.54, items=100, estimate=0.5)
    assert not RacePlan((), {}, 0.0, {}, level=0.9, min_items=1).should_stop(c, -5)


def test_plan_race_refuses_what_cannot_be_raced_naming_the_task() -> None:
    bar_v = {"a": np.ones(10), "b": np.ones(10)}
    bar = _bar(bar_v, RacingConfig())
    good = {t: ItemList(10, tuple(range(10)), "h", True) for t in bar_v}
    plan_race(bar, good)
    for lists, message in (
            ({**good, "b": ItemList(10, tuple(range(10)), "h", False)}, "task b: its value is not a mean"),
            ({**good, "b": ItemList(10, tuple(range(10)), "other", True)}, "task b: the bar .* another item list"),
            ({"a": good["a"]}, "differ from the bar's"),
            ({**good, "a": ItemList(12, tuple(range(12)), "h", True)}, "task a: the bar .* another item list")):
        with pytest.raises(NotRaceable, match=message):
            plan_race(bar, lists)
    partial = RaceBar(bar.config, 7, {**bar.items, "a": ItemScores.of("a", [0, 1], [1, 1], [1, 1], 10, "h")},
                      bar.aggregate, bar.task_weights)
    with pytest.raises(NotRaceable, match="task a: the bar .* lacks some of its items"):
        plan_race(partial, good)
