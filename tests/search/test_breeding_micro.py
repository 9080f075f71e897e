"""Behaviour-aware breeding on real models: a tiny zoo built in the test (the micro add specialist, an exact
copy of it, the micro enc specialist), where the complementary model of `add` is known to be `enc`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from evomerge.paths import resolve_path
from evomerge.search.driver import start_run
from evomerge.search.events import EventKind
from evomerge.search.population.status import waste
from evomerge.search.run import RunDir
from evomerge.search.space import space_from_dict
from evomerge.search.status import status_json


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("twin-zoo")
    out = {"base": str(resolve_path("zoo:micro/base")), "enc": str(resolve_path("zoo:micro/enc"))}
    shutil.copytree(resolve_path("zoo:micro/add"), root / "add")
    shutil.copytree(resolve_path("zoo:micro/add"), root / "twin")  # behaves exactly as add
    out.update(add=str(root / "add"), twin=str(root / "twin"))
    return out


def _space(zoo: dict[str, str], **population: Any) -> dict[str, Any]:
    return {
        "name": "twins", "seed": 0,
        "models": {"base": zoo["base"], "fine_tunes": {k: zoo[k] for k in ("add", "twin", "enc")}},
        "fitness": {"batch_size": 64, "seed": 0, "limit": 24, "tasks": [
            # add weighs more, so the plain top-2 is {add, twin}: identical, saturated at once
            {"name": "add", "metric": "token_acc", "weight": 3.0, "jsonl": "zoo:micro/data/add/search.jsonl"},
            {"name": "enc", "metric": "token_acc", "weight": 1.0, "jsonl": "zoo:micro/data/enc/search.jsonl"}]},
        "methods": {"task_arithmetic": {"weight": [0.0, 1.0]}},
        "optimizer": {"name": "CMA", "budget": 12},
        "progress_interval": 0, "test_top": 0, "racing": False,
        "population": {"k": 2, "pair_budget": 0, "seed_models": ["add", "twin"], "max_revivals": 0,
                       "max_generations": 3, **population},
    }


def _run(tmp_path: Path, data: dict[str, Any], name: str) -> RunDir:
    space = space_from_dict(data, where=name, base_dir=tmp_path)
    start_run(space, tmp_path / name, progress=False)
    return RunDir.open(tmp_path / name)


@pytest.mark.slow
def test_identical_twins_are_skipped_and_the_complement_is_picked(zoo: dict[str, str], tmp_path: Path) -> None:
    # today's manager: it merges the twins (an evaluation whose child equals its parents), then stops saturated
    before = _run(tmp_path, _space(zoo, niche_alpha=0.0, partner="kinship", identical_tol=None, max_escapes=0),
                  "kinship")
    with before.archive(readonly=True) as a:
        done = [e["data"] for e in a.events(EventKind.PAIR_DONE)]
        assert [(p["a"], p["b"]) for p in done] == [("add", "twin")]
        assert done[0]["behaviour_distance"] == 0.0
        assert waste(a)["identical_pairs"] == 1 and waste(a)["pairs_skipped"] == 0
        assert a.events(EventKind.STOP)[-1]["data"]["reason"].startswith("saturated")
    # behaviour-aware: the twins are skipped; the saturated top-k escapes with add's complement, enc
    after = _run(tmp_path, _space(zoo, niche_alpha=0.0, partner="attraction"), "attraction")
    with after.archive(readonly=True) as a:
        skipped = [e["data"] for e in a.events(EventKind.PAIR_SKIPPED)]
        assert [(p["a"], p["b"], p["distance"]) for p in skipped] == [("add", "twin", 0.0)]
        plans = [e["data"] for e in a.events(EventKind.GENERATION_PLAN)]
        escape = [p for plan in plans for p in plan["plans"] if p["reason"] == "escape"]
        assert escape and escape[0]["a"] == "add" and escape[0]["b"] == "enc" and escape[0]["attraction"] > 0
        done = [e["data"] for e in a.events(EventKind.PAIR_DONE)]
        assert ("add", "enc") in [(p["a"], p["b"]) for p in done] or ("enc", "add") in [(p["a"], p["b"])
                                                                                         for p in done]
        assert all({p["a"], p["b"]} != {"add", "twin"} for p in done)
    data = status_json(after.path)
    assert data["waste"]["pairs_skipped"] == 1 and data["waste"]["identical_pairs"] == 0
    assert data["waste"]["since_improvement"] >= 0
