"""Optimizer construction: names, seeding, bounds, num_workers, the checkpointed optimizer's small archive."""

from __future__ import annotations

from pathlib import Path

import nevergrad as ng
import numpy as np
import pytest
from helpers.spaces import micro_space

from evomerge.errors import ConfigError
from evomerge.search.genome import Genome
from evomerge.search.loop import new_optimizer
from evomerge.search.optimizer import array_parametrization, build_optimizer, optimizer_class
from evomerge.search.population.pair_search import PairSpace, pair_optimizer
from evomerge.search.space import space_from_dict


def _asks(opt: ng.optimizers.base.Optimizer, n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        cand = opt.ask()
        out.append(np.asarray(cand.value, float))
        opt.tell(cand, float(np.sum(out[-1] ** 2)))
    return out


def test_names_resolve_through_the_registry_and_unknown_ones_name_the_field() -> None:
    assert optimizer_class("CMA") is ng.optimizers.registry["CMA"]
    with pytest.raises(ConfigError, match=r"^space.yaml: optimizer.name: unknown nevergrad optimizer 'CMAX'; "
                                          r"did you mean .*CMA"):
        optimizer_class("CMAX", "space.yaml: optimizer.name")
    with pytest.raises(ConfigError, match=r"'zzqqxx' \(e.g. CMA, TwoPointsDE"):
        optimizer_class("zzqqxx")


@pytest.mark.parametrize("name", ["CMA", "TwoPointsDE", "OnePlusOne"])
def test_the_same_seed_asks_the_same_points_within_bounds(name: str) -> None:
    x0 = np.array([0.2, 0.9, 1.4])

    def build(seed: int) -> ng.optimizers.base.Optimizer:
        return build_optimizer(name, array_parametrization(x0, 0.0, 1.5, 0.25, seed), budget=20)

    a, b, c = _asks(build(7), 12), _asks(build(7), 12), _asks(build(8), 12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert all(v.shape == (3,) and v.min() >= 0.0 and v.max() <= 1.5 for v in a + c)


def test_budget_and_num_workers_are_passed_and_clamped() -> None:
    param = array_parametrization([0.5, 0.5], 0.0, 1.0, 0.1, 0)
    assert build_optimizer("CMA", param, budget=17, num_workers=3).num_workers == 3
    opt = build_optimizer("CMA", array_parametrization([0.5, 0.5], 0.0, 1.0, 0.1, 0), budget=17, num_workers=0)
    assert opt.num_workers == 1 and opt.budget == 17 and opt.pruning.max_len == 1000  # nevergrad's default
    bounded = build_optimizer("CMA", array_parametrization([0.5], 0.0, 1.0, 0.1, 0), budget=5, num_workers=20,
                              bounded=True)
    assert bounded.pruning.min_len == 80 and bounded.pruning.max_len == 160  # 4 x num_workers kept


def test_pair_optimizer_starts_at_x0_and_keeps_the_pair_bounds() -> None:
    ps = PairSpace(points=2, lower=0.1, upper=1.2, sigma=0.3, optimizer="CMA")
    x0 = ps.x0(0.0)
    opt = pair_optimizer(ps, x0, budget=10, seed=3, num_workers=2)
    opt.suggest(x0)
    first = np.asarray(opt.ask().value, float)
    assert np.allclose(first, x0) and opt.num_workers == 2
    assert all(v.min() >= 0.1 and v.max() <= 1.2 for v in _asks(opt, 9))
    bad = PairSpace(optimizer="NoSuchOpt")
    with pytest.raises(ConfigError, match="population.pair.optimizer: unknown nevergrad optimizer 'NoSuchOpt'"):
        pair_optimizer(bad, bad.x0(0.0), budget=4, seed=0)


def test_the_whole_genome_optimizer_is_seeded_by_the_space_and_keeps_a_small_archive(micro_zoo: Path) -> None:
    space = space_from_dict(micro_space(optimizer={"name": "TwoPointsDE", "budget": 30}, seed=4))
    genome = Genome(space)
    a, b = new_optimizer(space, genome, 3), new_optimizer(space, genome, 3)
    assert a.num_workers == 3 and a.budget == 30 and a.pruning.max_len == 64  # max(32, 4 x 3) kept, twice that max
    asks_a = [genome.decode(a.ask().value).content_hash() for _ in range(5)]
    asks_b = [genome.decode(b.ask().value).content_hash() for _ in range(5)]
    assert asks_a == asks_b
    other = new_optimizer(space_from_dict(micro_space(optimizer={"name": "TwoPointsDE", "budget": 30}, seed=5)),
                          genome, 3)
    assert [genome.decode(other.ask().value).content_hash() for _ in range(5)] != asks_a
