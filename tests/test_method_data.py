"""The one provider of a data-aware method's inputs: a merged model's calibration rows follow the tasks it stands
for, also when a worker reused across runs sees the same member key stand for other tasks."""

from __future__ import annotations

import pytest
from helpers.spaces import MICRO_FITNESS

from evomerge.errors import ConfigError
from evomerge.fitness.spec import FitnessSpec
from evomerge.merge.calibration.rows import interleave_rows
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe, format_model_rows, parse_model_rows
from evomerge.method_data import MethodDataProvider, calibration_file_data, with_model_rows
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


def test_the_rows_option_names_a_merged_models_tasks_and_refuses_bad_names() -> None:
    zoo = ensure_zoo("micro")
    provider = MethodDataProvider(FitnessSpec.model_validate(MICRO_FITNESS), str(zoo / "base"))
    rows = provider.task_rows()
    recipe = with_model_rows(Recipe("qp", (ModelEntry("g2.1"), ModelEntry("add")), base_model=BASE_KEY),
                             {"g2.1": ("sort",)})
    assert recipe.options["rows"] == "g2.1=sort"
    # the option wins over the tasks the member stands for; the original keeps its own
    calib = provider.calibration(recipe, {"g2.1": ("rev", "sort")})
    assert calib.rows["g2.1"] == rows["sort"] and calib.rows["add"] == rows["add"]
    assert recipe.content_hash() != Recipe("qp", recipe.models, base_model=BASE_KEY).content_hash()

    def refused(options: dict[str, str], words: tuple[str, ...]) -> None:
        bad = Recipe("qp", recipe.models, base_model=BASE_KEY, options=options)
        with pytest.raises(ConfigError) as err:
            provider.calibration(bad, {"g2.1": ("rev",)})
        assert all(w in str(err.value) for w in words), str(err.value)

    refused({"rows": "g9=add"}, ("g9", "not models of the recipe"))
    refused({"rows": "g2.1=chess"}, ("chess", "no jsonl tasks"))
    refused({"rows": "add=rev"}, ("'add'", "own task"))
    refused({"rows": "g2.1"}, ("'g2.1'", "model=task"))
    with pytest.raises(ConfigError, match="rows"):  # a method that calibrates on nothing has no such option
        with_model_rows(Recipe("linear", recipe.models), {"g2.1": ("add",)})


def test_model_rows_text_round_trips_in_key_order() -> None:
    text = format_model_rows({"joint": ("sort",), "g2.1": ("add", "rev")})
    assert text == "g2.1=add,rev;joint=sort"
    assert parse_model_rows(text) == {"g2.1": ("add", "rev"), "joint": ("sort",)}
    assert parse_model_rows("") == {}
    with pytest.raises(ConfigError, match="'a;b'"):
        format_model_rows({"a;b": ("add",)})


def test_a_calibration_files_rows_serve_the_rows_option_without_being_changed(tmp_path) -> None:
    import yaml

    zoo = ensure_zoo("micro")
    spec = FitnessSpec.model_validate(MICRO_FITNESS)
    provider = MethodDataProvider(spec, str(zoo / "base"))
    rows = provider.task_rows()
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump(calibration_file_data(spec, {"g2.1": ("add", "rev")})))
    models = (ModelEntry("g2.1"), ModelEntry("add"))
    named = Recipe("qp", models, base_model=BASE_KEY, options={"calibration": str(path), "rows": "g2.1=sort"})
    plain = Recipe("qp", models, base_model=BASE_KEY, options={"calibration": str(path)})
    assert provider.calibration(named).rows["g2.1"] == rows["sort"]
    assert provider.calibration(plain).rows["g2.1"] == interleave_rows([rows["add"], rows["rev"]])
