"""Racing through the real search path: the dispatcher sends the bar with each job, the worker races it, the
archive keeps what it saw; a clearly worse candidate stops at the first stage, a better one always finishes;
best, leaderboard and re-scores use complete candidates only; the population races the k-th best member (or
its pair's best so far, when higher)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.spaces import micro_space
from helpers.workers import ItemScoreWorker

from evomerge.errors import ConfigError
from evomerge.executors.base import InProcessExecutor
from evomerge.fitness.items import ItemList
from evomerge.fitness.racing import RacingConfig
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.search.archive import Archive
from evomerge.search.dispatch import Dispatcher, Job
from evomerge.search.items import session_racing
from evomerge.search.loop import rescore_best, run_search
from evomerge.search.population.session import run_population_session
from evomerge.search.run import RunDir
from evomerge.search.space import space_from_dict
from evomerge.search.status import status_json, status_text
from evomerge.search.stopping import StopFlag

RACING = RacingConfig(stages=(0.125, 0.25, 0.5, 1.0), level=0.05, min_items=16, seed=3)


pytestmark = pytest.mark.usefixtures("micro_zoo")  # the spaces name zoo:micro paths


def _job(cid: int, p: float) -> Job:
    r = Recipe("linear", (ModelEntry("a", {"weight": ParamValue.constant(p)}), ModelEntry("b")))
    return Job(cid, r, r.content_hash(), {"x": [p]})


def test_a_clearly_worse_candidate_stops_at_the_first_stage_and_a_better_one_finishes(tmp_path: Path) -> None:
    worker = ItemScoreWorker()
    with Archive.create(tmp_path / "archive.sqlite") as archive:
        d = Dispatcher(archive, InProcessExecutor(lambda: worker), penalty=-1.0, max_retries=0, racing=RACING)
        done = {}
        for cid, p in ((1, 0.6), (2, 0.1), (3, 0.9), (4, 0.58)):
            d.add(_job(cid, p), parents=["a", "b"])
            (f,) = d.drain()
            done[cid] = f
        first = {t: math.ceil(0.125 * n) for t, n in ItemScoreWorker.TASKS.items()}
        # 1: nothing to race yet, every item; 2: 0.1 against 0.6, stopped after the first stage's items
        assert worker.scored[0] == ItemScoreWorker.TASKS and not done[1].record.partial
        assert worker.scored[1] == first
        r2 = archive.get(2)
        assert r2 is not None and r2.partial and r2.ok and not r2.complete
        race = r2.settings["race"]
        assert race["stopped"] and race["stage"] == 1 and race["bar"] == 1 and race["items"] == sum(first.values())
        assert r2.aggregate == pytest.approx(race["estimate"]) and race["chance"] < RACING.level
        seen = archive.items(2)
        assert {t: len(v.index) for t, v in seen.items()} == first
        # the estimate is the bar's aggregate plus the paired difference on those items
        bar = archive.items(1)
        diff = np.mean([seen[t].value() - float(np.mean(bar[t].dense()[0][seen[t].index])) for t in seen])
        assert r2.aggregate == pytest.approx(done[1].record.aggregate + diff, abs=1e-6)
        # 3: better than the bar: runs every stage to the end and becomes the incumbent
        r3 = archive.get(3)
        assert r3 is not None and r3.complete and r3.settings["race"]["stage"] == 4 and done[3].new_best
        assert sum(len(v.index) for v in archive.items(3).values()) == sum(ItemScoreWorker.TASKS.values())
        assert r3.aggregate == pytest.approx(worker.score(0.9).aggregate, abs=1e-6)
        # 4 races the new incumbent (3); the best and the leaderboard skip stopped candidates
        assert archive.get(4).settings["race"]["bar"] == 3
        assert [r.id for r in archive.best(4)] == [3, 1] + ([4] if archive.get(4).complete else [])
        # a partial candidate is never evaluated again: the archive answers its recipe
        assert d.archived(_job(9, 0.1).recipe_hash).id == 2
        counts = archive.item_counts()
        assert counts["full"] == 4 * 400 and counts["evaluated"] < counts["full"]


def test_plain_search_races_the_incumbent_and_rescores_complete_candidates_only(tmp_path: Path) -> None:
    data = micro_space(optimizer={"name": "CMA", "budget": 30}, test_top=3,
                       racing={"stages": [0.125, 0.25, 0.5, 1.0], "level": 0.05, "min_items": 16})
    space = space_from_dict(data)
    run = RunDir.create(tmp_path / "r", space)
    worker = ItemScoreWorker()
    executor = InProcessExecutor(lambda: worker, penalty=space.penalty)
    summary = run_search(run, space, executor, progress=False)
    rescored = rescore_best(run, space, executor, 3)
    with run.archive(readonly=True) as a:
        rows = a.results()
        partial = [r for r in rows if r.partial]
        assert summary.evaluations == 30 and partial and len(partial) < 30
        best = a.best(1)[0]
        assert best.complete and best.id == summary.best_id
        assert max(r.aggregate for r in rows if r.complete) == best.aggregate
        # every stopped candidate's estimate is below the bar it raced, which was complete when sent
        by_id = {r.id: r for r in rows}
        for r in partial:
            bar = by_id[r.settings["race"]["bar"]]
            assert bar.complete and bar.id < r.id and r.aggregate < bar.aggregate
        assert rescored and all(by_id[c].complete for c in rescored)
        assert {x.candidate_id for x in a.rescores()} == set(rescored)
        assert all(a.items(c, "test") for c in rescored)  # re-scores keep their per-item results too
    status = status_json(run.path)
    assert status["evaluations"] == 30 and status["partial"] == len(partial) and status["failed"] == 0
    assert status["best"]["id"] == best.id and status["best"]["test"] is not None
    assert status["items"]["search"]["full"] == 30 * 400
    assert status["items_evaluated"] < status["items_full"] == 33 * 400
    assert json.loads(json.dumps(status)) == status
    assert f"{len(partial)} candidate(s) stopped early by racing" in status_text(run.path)


def test_the_population_races_the_kth_best_member(tmp_path: Path) -> None:
    data = micro_space(optimizer={"name": "CMA", "budget": 24}, test_top=1,
                       population={"k": 3, "pair_budget": 3, "saturation": None, "max_generations": 3},
                       racing={"stages": [0.125, 0.5, 1.0], "level": 0.05, "min_items": 16})
    space = space_from_dict(data)
    run = RunDir.create(tmp_path / "p", space)
    worker = ItemScoreWorker()
    run_population_session(run, space, InProcessExecutor(lambda: worker, penalty=space.penalty), stop=StopFlag(),
                           log=lambda m: None, progress=False)
    with run.archive(readonly=True) as a:
        rows = a.results()
        members = {e["data"]["candidate_id"]: e["data"]["score"] for e in a.events("member")}
        for kind in ("pair_done", "joint_done"):
            members.update({e["data"]["candidate_id"]: e["data"]["score"] for e in a.events(kind)})
        assert all("race" not in r.settings for r in rows[:4])  # the originals: no k-th best member yet
        raced = [r for r in rows[4:] if "race" in r.settings]
        assert raced and any(r.partial for r in raced)
        for r in raced:  # the bar: a member (the k-th best then) or an earlier complete candidate of its pair
            bar = a.get(r.settings["race"]["bar"])
            same_pair = bar.generation == r.generation and sorted(bar.parents) == sorted(r.parents)
            assert bar.complete and bar.id < r.id and (bar.id in members or same_pair)
            if same_pair and bar.id not in members:
                assert bar.aggregate > min(a.get(m).aggregate for m in members if m < r.id)
        # members keep the estimate of a stopped child: always below the bar it raced
        for r in raced:
            if r.partial:
                assert r.aggregate < a.get(r.settings["race"]["bar"]).aggregate
        (res,) = a.rescores()
        assert a.get(res.candidate_id).complete


def test_racing_sections_are_checked_where_the_space_is_read(tmp_path: Path) -> None:
    def space(racing: Any, metric: str = "token_acc") -> Any:
        data = micro_space(racing=racing)
        for t in data["fitness"]["tasks"]:
            t["metric"] = metric
        return space_from_dict(data, where="s.yaml")

    assert space(None).racing.enabled and space(None).racing.seed == 0  # on by default for mean metrics
    assert space(None, "loglik").racing.enabled
    assert not space(None, "perplexity").racing.enabled  # not a mean of items: off by default
    assert not space(False).racing.enabled
    cfg = space({"stages": [0.2, 1.0], "level": 0.1}).racing
    assert cfg.stages == (0.2, 1.0) and cfg.level == 0.1 and cfg.min_items == 32
    for bad, message in (({"level": 1.5}, r"s\.yaml: racing\.level: must lie in \(0, 1\), got 1\.5"),
                         ({"stages": [0.5, 0.25, 1.0]}, r"s\.yaml: racing\.stages: must increase"),
                         ({"stages": [0.25, 0.5]}, r"s\.yaml: racing\.stages: the last stage must be the full"),
                         ({"levle": 0.1}, r"s\.yaml: racing: unknown key\(s\) \['levle'\]")):
        with pytest.raises(ConfigError, match=message):
            space(bad)
    with pytest.raises(ConfigError, match=r"s\.yaml: racing: task\(s\) add \(perplexity\), rev \(perplexity\)"):
        space(True, "perplexity")
    # once the tasks are loaded (an lm-eval metric not aggregated by the mean, or a group without items): the
    # default turns off, saying so; an explicit section is refused naming the task
    lists = {"search": {t: ItemList(24, tuple(range(24)), "h", t != "rev") for t in ("add", "rev", "sort")}}
    said: list[str] = []
    assert not session_racing(space(None), lists, said.append).enabled
    assert said == ["racing off: the value of task(s) enc, rev is not a mean of their items"]
    with pytest.raises(ConfigError, match=r"racing: the value of task\(s\) enc, rev is not a mean"):
        session_racing(space({"level": 0.1}), lists, said.append)
    full = {"search": {t: ItemList(24, tuple(range(24)), "h", True) for t in ("add", "rev", "sort", "enc")}}
    assert session_racing(space({"level": 0.1}), full, said.append).level == 0.1


def test_a_margin_stops_a_close_loser_sooner_and_never_a_candidate_above_the_bar(tmp_path: Path) -> None:
    # p = 0.57 solves a subset of what the incumbent p = 0.6 solves: a few items apart, so at margin 0 the
    # paired test cannot rule it out early; at margin 0.05 it is unlikely to beat the bar by that much
    stages = {}
    for margin in (0.0, 0.05):
        worker = ItemScoreWorker()
        racing = RacingConfig(stages=RACING.stages, level=RACING.level, min_items=RACING.min_items, margin=margin,
                              seed=RACING.seed)
        with Archive.create(tmp_path / f"archive-{margin}.sqlite") as archive:
            d = Dispatcher(archive, InProcessExecutor(lambda w=worker: w), penalty=-1.0, max_retries=0, racing=racing)
            for cid, p in ((1, 0.6), (2, 0.57), (3, 0.61)):
                d.add(_job(cid, p), parents=["a", "b"])
                d.drain()
            close, above = archive.get(2), archive.get(3)
            assert close is not None and above is not None
            stages[margin] = close.settings["race"]["stage"]
            # a superset of the incumbent's items: its estimate is never below the bar, so it always finishes
            assert above.complete and above.settings["race"]["stage"] == len(RACING.stages)
            if margin:
                assert close.partial and close.aggregate < archive.get(1).aggregate
    assert stages[0.05] == 1 < stages[0.0]
