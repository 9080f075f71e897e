"""`evomerge bench search`: the rows' population sections and the pair flags become the spaces they run."""

from __future__ import annotations

import argparse

import pytest

from evomerge.bench.search import add_arguments, manager_rows, pair_params
from evomerge.errors import ConfigError
from evomerge.search.population.rules import PopulationConfig


def test_pair_params_are_numbers_and_bad_ones_are_named() -> None:
    assert pair_params(None) == {}
    assert pair_params(["ridge=1e-4", "density = 0.5"]) == {"ridge": 1e-4, "density": 0.5}
    with pytest.raises(ConfigError, match="--pair-param ridge=big: a number"):
        pair_params(["ridge=big"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        pair_params(["ridge"])


def test_only_the_joint_and_default_rows_make_the_joint_merge() -> None:
    rows = manager_rows(1.0)
    joint = {row: PopulationConfig.from_dict(section).joint for row, section in rows.items()}
    assert joint == {"greedy": False, "kinship": False, "attraction": False, "niche": False, "joint": True,
                     "breeding": True, "breeding_niche": True, "breeding_ancestors": True, "breeding_refine": True,
                     "breeding_no_leader": True, "breeding_leader_first": True, "breeding_no_screen": True}
    assert PopulationConfig.from_dict(rows["joint"]) == PopulationConfig.from_dict({**rows["kinship"], "joint": True})
    # the rows "as before" calibrate merged parents on all their ancestors' tasks; the default splits them
    cfg = {row: PopulationConfig.from_dict(section) for row, section in rows.items()}
    assert {row: c.pair_rows for row, c in cfg.items() if c.pair_rows == "competence"} == {
        "breeding": "competence", "breeding_niche": "competence", "breeding_refine": "competence",
        "breeding_no_leader": "competence", "breeding_leader_first": "competence", "breeding_no_screen": "competence"}
    assert [row for row, c in cfg.items() if c.refine] == ["breeding_refine"]
    # the leader refine is the default's; the rows "as before" and the ablation row go without it
    assert {row for row, c in cfg.items() if c.refine_leader == 0} == {
        "greedy", "kinship", "attraction", "niche", "joint", "breeding_no_leader"}
    assert cfg["breeding"].refine_leader == PopulationConfig().refine_leader > 0
    # the screen is the default's; the rows "as before" and the ablation go without; leader first is a row
    assert [row for row, c in cfg.items() if c.leader_first] == ["breeding_leader_first"]
    assert {row for row, c in cfg.items() if c.screen == 0} == {
        "greedy", "kinship", "attraction", "niche", "joint", "breeding_no_screen"}
    assert cfg["breeding"].screen == PopulationConfig().screen > 0 and not cfg["breeding"].leader_first


def test_the_pair_flags_reach_the_population_space() -> None:
    from helpers.spaces import MICRO_FITNESS

    from evomerge.bench.search import _population_space
    from evomerge.fitness.spec import FitnessSpec
    from evomerge.search.population.session import population_config
    from evomerge.search.space import space_from_dict
    from evomerge.zoo.build import ensure_zoo

    ensure_zoo("micro")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--pair-param", "ridge=1e-4", "--joint-budget", "7"])
    spec = FitnessSpec.model_validate(MICRO_FITNESS)
    skills = ["add", "rev", "sort", "enc"]
    data = _population_space(None, skills, spec, args, 0, "joint", manager_rows(1.0)["joint"], "zoo:micro")
    cfg, pair = population_config(space_from_dict(data))
    assert cfg.joint and cfg.joint_budget == 7 and not cfg.uses_attraction
    assert pair.method == "qp" and dict(pair.parameters) == {"ridge": 1e-4} and dict(pair.options) == {"sequential": True}
    assert pair.recipe(("add", "rev"), pair.x0(0.0)).parameters["ridge"].to_yaml() == 1e-4
