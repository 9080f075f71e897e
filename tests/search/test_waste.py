"""Waste figures of a run, from a hand-written archive: evaluations since the last improvement, evaluations on
pairs of behaviourally identical parents, skipped pairs."""

from __future__ import annotations

from pathlib import Path

from evomerge.search.archive import Archive
from evomerge.search.events import EventKind
from evomerge.search.population.status import waste, waste_line


def _add(a: Archive, cid: int, score: float) -> None:
    a.add_candidate(id=cid, recipe_hash=f"h{cid}", recipe={"method": "linear"}, parents=[], generation=1,
                    method="linear", genome=None, ok=True, scores={}, aggregate=score, split="search", settings={},
                    merge_seconds=0.0, eval_seconds=0.0, worker=None, error=None, session=1)


def test_waste_by_hand(tmp_path: Path) -> None:
    with Archive.create(tmp_path / "a.sqlite") as a:
        for cid, score in enumerate([0.1, 0.5, 0.7, 0.6, 0.7, 0.2], 1):
            _add(a, cid, score)
        # a plain search: the best is #3 (the first 0.7), three evaluations came after it
        assert waste(a) == {"since_improvement": 3, "identical_pairs": None, "identical_pair_merges": None,
                            "pairs_skipped": None}
        a.add_event(EventKind.POPULATION_START, {"k": 2, "identical_tol": 0.01})
        a.add_event(EventKind.PAIR_DONE, {"a": "x", "b": "y", "evaluations": 4, "behaviour_distance": 0.005})
        a.add_event(EventKind.PAIR_DONE, {"a": "x", "b": "z", "evaluations": 6, "behaviour_distance": 0.2})
        a.add_event(EventKind.PAIR_DONE, {"a": "y", "b": "z", "evaluations": 2, "behaviour_distance": 0.01})
        a.add_event(EventKind.PAIR_SKIPPED, {"a": "x", "b": "w", "distance": 0.0})
        w = waste(a)
        assert w == {"since_improvement": 3, "identical_pairs": 6, "identical_pair_merges": 2, "pairs_skipped": 1}
        assert waste_line(w) == ("  waste: 3 evaluation(s) since the last improvement, 6 on 2 pair(s) of "
                                 "behaviourally identical parents, 1 such pair(s) skipped")
