"""Per-item results: every task value is the weighted mean of its items, subsets score the same items the same
way, item lists are content-hashed, and the packed storage round-trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.items import ItemScores, items_hash
from evomerge.fitness.result import EvalResult
from evomerge.fitness.spec import FitnessSpec
from evomerge.models.hf import load_causal_lm


def _spec(zoo: Path, metric: str, limit: int = 40) -> FitnessSpec:
    return FitnessSpec.from_dict({"limit": limit, "batch_size": 16, "tasks": [
        {"name": s, "jsonl": {"search": str(zoo / "data" / s / "search.jsonl"),
                              "test": str(zoo / "data" / s / "test.jsonl")}, "metric": metric}
        for s in ("add", "rev")]})


@pytest.mark.parametrize("metric", ["exact_match", "token_acc", "loglik"])
def test_builtin_task_value_is_the_weighted_mean_of_its_items(micro_zoo: Path, metric: str) -> None:
    model = load_causal_lm(micro_zoo / "add")
    res = Evaluator(_spec(micro_zoo, metric), micro_zoo / "base").score(model)
    assert res.ok and res.complete
    for t in res.tasks:
        items = res.items[t.task]
        assert items.total == 40 and len(items.index) == 40
        assert items.value() == pytest.approx(t.value, rel=1e-6, abs=1e-7)
        if metric == "exact_match":
            assert set(np.unique(items.scores)) <= {0.0, 1.0} and (items.weights == 1).all()
        else:
            assert (items.weights >= 1).all()  # scored tokens per row
    # the aggregate is the weighted mean of the task values, so of the items too
    assert res.aggregate == pytest.approx(np.mean([res.items[t.task].value() for t in res.tasks]), rel=1e-6)


def test_a_subset_scores_its_items_as_the_full_run_does(micro_zoo: Path) -> None:
    ev = Evaluator(_spec(micro_zoo, "token_acc"), micro_zoo / "base")
    model = load_causal_lm(micro_zoo / "rev")
    full = ev.score(model)
    part = ev.score(model, items={"add": [3, 0, 17, 9], "rev": list(range(10))})
    assert part.ok and not part.complete
    assert part.items["add"].index.tolist() == [0, 3, 9, 17]  # sorted, file rows
    for task in ("add", "rev"):
        s_full, _ = full.items[task].dense()
        got = part.items[task]
        np.testing.assert_allclose(got.scores, s_full[got.index], rtol=1e-6, atol=1e-7)
        assert part.task_values()[task] == pytest.approx(got.value(), rel=1e-6)
    merged = part.items["rev"].merged(ev.score(model, items={"add": [1], "rev": list(range(10, 40))}).items["rev"])
    assert merged.complete
    np.testing.assert_allclose(merged.scores, full.items["rev"].scores, rtol=1e-6, atol=1e-7)
    bad = ev.score(model, items={"add": [40]})
    assert not bad.ok and "not scorable rows" in (bad.error or "")
    # an empty list skips the task (a racing stage with no new item of it); nothing at all is an error
    skip = ev.score(model, items={"add": [], "rev": [0, 1]})
    assert skip.ok and [t.task for t in skip.tasks] == ["rev"] and set(skip.items) == {"rev"}
    assert skip.aggregate == pytest.approx(skip.items["rev"].value(), rel=1e-6)
    none = ev.score(model, items={"add": [], "rev": []})
    assert not none.ok and "no item to score" in (none.error or "")


def test_item_lists_are_content_hashed(micro_zoo: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (micro_zoo / "data" / "add" / "search.jsonl").read_text().splitlines()[:12]]
    path = tmp_path / "add.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = FitnessSpec.from_dict({"tasks": [{"name": "add", "jsonl": str(path), "metric": "exact_match"}]})
    first = Evaluator(spec, micro_zoo / "base").item_lists()["add"]
    assert first.total == 12 and first.scorable == tuple(range(12)) and first.mean
    assert first.content == items_hash(rows)
    rows[5] = {**rows[5], "answer": rows[5]["answer"] + "0"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert Evaluator(spec, micro_zoo / "base").item_lists()["add"].content != first.content


def test_lm_eval_documents_are_items(micro_zoo: Path) -> None:
    spec = FitnessSpec.from_dict({"batch_size": 16, "max_gen_toks": 10, "limit": 16, "tasks": [
        {"name": s, "lm_eval_yaml": {"search": str(micro_zoo / "tasks" / f"evozoo_{s}_search.yaml"),
                                     "test": str(micro_zoo / "tasks" / f"evozoo_{s}_test.yaml")},
         "metric": "exact_match"} for s in ("sort", "enc")]})
    ev = Evaluator(spec, micro_zoo / "base", splits=("test",))
    lists = ev.item_lists("test")
    assert lists["enc"].total == 16 and lists["enc"].mean
    model = load_causal_lm(micro_zoo / "enc")
    full = ev.score(model, "test")
    assert full.ok, full.error
    assert full.items["enc"].index.tolist() == list(range(16))
    assert full.items["enc"].value() == pytest.approx(full.task_values()["enc"])
    assert full.items["enc"].scores.sum() > 0  # the enc specialist solves some documents
    part = ev.score(model, "test", items={"enc": [2, 5, 11], "sort": [0]})
    assert part.ok, part.error
    assert part.items["enc"].index.tolist() == [2, 5, 11]
    s_full, _ = full.items["enc"].dense()
    assert part.items["enc"].scores.tolist() == s_full[[2, 5, 11]].tolist()
    again = ev.score(model, "test")  # a full run after a subset still sees every document
    assert again.task_values() == full.task_values() and again.items["enc"] == full.items["enc"]
    # an empty list skips that task (lm-eval itself reads an empty list as "every document")
    skip = ev.score(model, "test", items={"enc": [5, 11], "sort": []})
    assert skip.ok, skip.error
    assert [t.task for t in skip.tasks] == ["enc"] and skip.items["enc"].index.tolist() == [5, 11]
    assert skip.items["enc"].scores.tolist() == s_full[[5, 11]].tolist()


def test_storage_round_trip_and_dense_views() -> None:
    a = ItemScores.of("t", [0, 2, 5], [1.0, 0.5, 0.0], [1.0, 3.0, 2.0], total=6, content="abc")
    assert not a.complete and a.value() == pytest.approx((1 + 1.5) / 6)
    assert ItemScores.from_record(a.to_record()) == a
    assert ItemScores.from_json(json.loads(json.dumps(a.to_json()))) == a
    s, w = a.dense()
    assert np.isnan(s[1]) and w.tolist() == [1.0, 0.0, 3.0, 0.0, 0.0, 2.0]
    full = ItemScores.of("t", range(6), [1, 0, 1, 0, 1, 0], [1] * 6, total=6, content="abc")
    assert full.to_record()["index"] is None  # a complete, ordered list stores no index
    assert ItemScores.from_record(full.to_record()) == full
    res = EvalResult(aggregate=0.5, items={"t": a})
    assert EvalResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res
    with pytest.raises(ValueError, match="different item lists"):
        a.merged(ItemScores.of("t", [1], [1.0], [1.0], total=6, content="other"))
    assert math.isclose(a.merged(ItemScores.of("t", [1], [1.0], [1.0], 6, "abc")).value(), (1 + 1 + 1.5) / 7)
    with pytest.raises(ValueError, match="indices"):
        ItemScores.of("t", [0, 1], [1.0], [1.0], 2, "x")
    assert torch.tensor(a.scores).dtype == torch.float32
