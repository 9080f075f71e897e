"""Pair genome (method, parameters, options), the tasks a merged member stands for."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.search.population.members import ancestor_tasks, competence_rows
from evomerge.search.population.pair_search import PairSpace


def _pair(a: str, b: str) -> Recipe:
    return Recipe("qp", (ModelEntry(a), ModelEntry(b)), base_model=BASE_KEY)


def test_ancestor_tasks_is_the_ordered_union_over_the_lineage() -> None:
    members = {"g1.1": _pair("rev", "add"), "g1.2": _pair("enc", "add"), "g2.1": _pair("g1.2", "g1.1"),
               "g2.2": _pair("g2.1", "sort")}
    names = ["add", "rev", "sort", "enc"]
    assert ancestor_tasks("add", members.get, names) == ("add",)
    assert ancestor_tasks("g1.1", members.get, names) == ("rev", "add")
    assert ancestor_tasks("g2.1", members.get, names) == ("enc", "add", "rev")
    assert ancestor_tasks("g2.2", members.get, names) == ("enc", "add", "rev", "sort")
    # an original without a task of its name stands for nothing; the base never does
    assert ancestor_tasks("chat", members.get, names) == ()
    assert ancestor_tasks(BASE_KEY, members.get, names) == ()


def test_competence_rows_give_each_task_to_the_parents_not_beaten_on_it() -> None:
    tasks_of = {"joint": ("add", "rev", "sort", "enc"), "g2.1": ("add", "rev", "enc"), "sort": ("sort",)}
    scores = {"joint": {"add": 0.50, "rev": 0.40, "sort": 0.43, "enc": 0.80},
              "g2.1": {"add": 0.75, "rev": 0.405, "sort": 0.27, "enc": 0.90},
              "sort": {"add": 0.10, "rev": 0.10, "sort": 0.95, "enc": 0.10}}
    # joint keeps rev (within the 0.01 tie of g2.1), loses add and enc to g2.1 and sort to the specialist;
    # g2.1 is beaten on nothing it stands for; the original is never split
    assert competence_rows(tasks_of, scores) == {"joint": ("rev",)}
    # without the specialist, sort is joint's alone (g2.1 does not stand for it)
    two = {k: tasks_of[k] for k in ("joint", "g2.1")}
    assert competence_rows(two, scores) == {"joint": ("rev", "sort")}
    # a parent beaten everywhere keeps every task (a merge that matches it nowhere would drop it)
    same = {"joint": ("add", "rev", "enc"), "g2.1": ("add", "rev", "enc")}
    worse = {**scores, "joint": {t: v - 0.3 for t, v in scores["joint"].items()}}
    assert competence_rows(same, worse) == {}
    assert competence_rows(same, scores) == {"joint": ("rev",)}
    # where less is better, the lower value wins
    assert competence_rows(two, scores, lower=["add", "enc"]) == {"g2.1": ("rev",)}
    assert competence_rows(two, scores, tie=0.5) == {}


def test_pair_space_method_parameters_and_options_go_into_the_recipe() -> None:
    ps = PairSpace(points=2, method="ties", parameters={"density": 0.4}, options={"sign_rule": "majority_count"})
    r = ps.recipe(("rev", "add"), [0.5, 1.0, 0.7, 0.9], seed=3)
    assert r.method == "ties" and r.options == {"sign_rule": "majority_count"} and r.seed == 3
    assert [m.model for m in r.models] == ["rev", "add"]
    assert r.models[0].parameters["weight"].to_yaml() == [0.5, 1.0]
    assert r.models[1].parameters["density"].to_yaml() == 0.4
    qp = PairSpace(method="qp", options={"basis": "full", "sequential": True}).recipe(("a", "b"), [1, 1, 1, 1])
    assert qp.options == {"basis": "full", "sequential": True}


def test_pair_space_global_parameters_go_to_the_recipe_not_the_models() -> None:
    """qp's ridge is one value per merge: it goes to the recipe's parameters (a per-model one would be refused)."""
    r = PairSpace(method="qp", parameters={"ridge": 1e-4, "density": 0.5}).recipe(("a", "b"), [1, 1, 1, 1])
    assert r.parameters["ridge"].to_yaml() == 1e-4
    assert all("ridge" not in m.parameters and m.parameters["density"].to_yaml() == 0.5 for m in r.models)


def test_pair_space_genome_over_n_parents_and_its_kinship_start() -> None:
    ps = PairSpace(points=2, init="kinship")
    r = ps.recipe(("add", "rev", "sort"), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert [m.model for m in r.models] == ["add", "rev", "sort"]
    assert [m.parameters["weight"].to_yaml() for m in r.models] == [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
    with pytest.raises(ValueError, match="5 genes for 3 parents"):
        ps.recipe(("add", "rev", "sort"), [0.1] * 5)
    # w = 1 / (1 + (n - 1) c): unrelated parents are summed, n identical ones averaged; n = 2 is the pair rule
    assert ps.x0(0.0, 4).tolist() == [1.0] * 8
    assert ps.x0(1.0, 4).tolist() == pytest.approx([0.25] * 8)
    assert ps.x0(0.5, 3).tolist() == pytest.approx([0.5] * 6)
    assert ps.x0(0.6).tolist() == pytest.approx([1 / 1.6] * 4)


@pytest.mark.parametrize(("kw", "match"), [
    ({"method": "nope"}, "unknown merge method 'nope'"),
    ({"method": "linear"}, "needs a method with a base model and per-model weights"),
    ({"method": "qp", "options": {"basis": "huge"}}, "basis = 'huge' is not one of"),
    ({"method": "ties", "parameters": {"density": 1.5}}, "density = 1.5 outside"),
    ({"method": "ties", "parameters": {"density": "high"}}, "numbers expected"),
    ({"method": "ties", "parameters": {"weight": 1.0}}, "'weight' is the pair genome's"),
    ({"method": "ties", "options": {"colour": 1}}, "colour"),
])
def test_pair_space_errors_name_the_field(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PairSpace(**kw)
