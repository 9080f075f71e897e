"""The one provider of a data-aware method's inputs: a merged model's calibration rows follow the tasks it stands
for, also when a worker reused across runs sees the same member key stand for other tasks."""

from __future__ import annotations

from helpers.spaces import MICRO_FITNESS

from evomerge.fitness.spec import FitnessSpec
from evomerge.merge.calibration.rows import interleave_rows
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.method_data import MethodDataProvider
from evomerge.zoo.build import ensure_zoo


def test_a_member_keys_rows_follow_the_tasks_it_stands_for() -> None:
    zoo = ensure_zoo("micro")
    provider = MethodDataProvider(FitnessSpec.model_validate(MICRO_FITNESS), str(zoo / "base"))
    recipe = Recipe("qp", (ModelEntry("g2.1"), ModelEntry("add")), base_model=BASE_KEY)
    rows = provider.task_rows()

    calib = provider.calibration(recipe, {"g2.1": ("rev", "sort")})
    assert calib.rows["g2.1"] == interleave_rows([rows["rev"], rows["sort"]])
    assert calib.rows["add"] == rows["add"]  # an original: its own task's rows
    first = calib.rows["g2.1"]
    assert provider.calibration(recipe, {"g2.1": ("rev", "sort")}).rows["g2.1"] is first  # built once
    # the next run of the same worker: g2.1 is another model now, of other tasks
    again = provider.calibration(recipe, {"g2.1": ("enc",)})
    assert again.rows["g2.1"] == rows["enc"] and again.rows["add"] == rows["add"]
