"""Search-space validation: every bad input names the file, the field and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.spaces import micro_space, write_space

from evomerge.errors import ConfigError, ModelError
from evomerge.search.genome import Genome
from evomerge.search.space import load_space, parse_duration, space_from_dict


def test_valid_space_resolves_models_layers_and_genome(micro_zoo: Path, tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path / "s.yaml", micro_space()))
    assert sorted(space.models) == ["add", "enc", "rev", "sort"]
    assert space.num_layers == 2
    g = Genome(space)
    # method choice (2 options) + TA weight 4x2 + TIES weight 4x2 + TIES density 4x2
    assert g.slots == 2
    assert g.dimension() == 2 + 8 + 8 + 8


@pytest.mark.parametrize(("granularity", "slots"), [
    ("per_layer", 2), ("per_model", 1), ({"layer_groups": 1}, 1), ("tensor_kind", 3),
    ({"tensor_kind": ["attention"]}, 2),
])
def test_granularity_sets_values_per_gene(micro_zoo: Path, granularity: object, slots: int) -> None:
    space = space_from_dict(micro_space(granularity=granularity, methods={"linear": {"weight": [0, 1]}}))
    assert Genome(space).slots == slots


def _error(data: dict, tmp_path: Path, exc: type[Exception] = ConfigError) -> str:
    with pytest.raises(exc) as info:
        load_space(write_space(tmp_path / "bad.yaml", data))
    assert "bad.yaml" in str(info.value)
    return str(info.value)


def test_missing_model_is_named(micro_zoo: Path, tmp_path: Path) -> None:
    data = micro_space()
    data["models"]["fine_tunes"]["rev"] = str(tmp_path / "nowhere")
    msg = _error(data, tmp_path, ModelError)
    assert "fine_tunes.rev" in msg and "nowhere" in msg and "does not exist" in msg


def test_incompatible_models_are_refused(micro_zoo: Path, tmp_path: Path) -> None:
    demo_like = tmp_path / "other"
    # a model of another shape: the micro base with one tensor widened
    import json

    import torch
    from safetensors.torch import load_file, save_file

    src = micro_zoo / "base"
    demo_like.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (demo_like / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    name = sorted(k for k in tensors if k.endswith("mlp.up_proj.weight"))[0]
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(demo_like / "model.safetensors"), metadata={"format": "pt"})
    json.loads((demo_like / "config.json").read_text())
    data = micro_space()
    data["models"]["fine_tunes"]["add"] = str(demo_like)
    msg = _error(data, tmp_path, ModelError)
    assert "incompatible" in msg and name in msg


@pytest.mark.parametrize(("patch", "needle"), [
    ({"methods": {"no_such_method": {"weight": [0, 1]}}}, "methods.no_such_method"),
    ({"optimizer": {"name": "CMAX", "budget": 5}}, "unknown nevergrad optimizer 'CMAX'"),
    ({"methods": {"ties": {"weight": [0, 1], "density": [0.9, 0.1]}}}, "methods.ties.density: bounds inverted"),
    ({"methods": {"ties": {"weight": [0, 1], "density": [0.2, 1.5]}}}, "methods.ties.density"),
    ({"methods": {"linear": {"wieght": [0, 1]}}}, "methods.linear.wieght: unknown parameter"),
    ({"methods": {"linear": {"weight": 0.5}}}, "no gene to search"),
    ({"fitness": {"tasks": []}}, "tasks"),
    ({"optimizer": {"name": "CMA", "budget": 0}}, "optimizer.budget"),
    ({"granularity": "per_head"}, "granularity: unknown granularity 'per_head'"),
    ({"granularity": {"layer_groups": 9}}, "9 groups for a model of 2 layers"),
    ({"workers": 0}, "workers"),
    ({"stopping": {"wall_time": "soon"}}, "stopping.wall_time"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_fields_are_named(micro_zoo: Path, tmp_path: Path, patch: dict, needle: str) -> None:
    assert needle in _error(micro_space(**patch), tmp_path)


def test_unreadable_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML \(line"):
        load_space(bad)


def test_durations() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration(2.5) == 2.5
    with pytest.raises(ValueError):
        parse_duration("-3m")


SHIPPED = Path(__file__).resolve().parents[2] / "search_spaces"


def test_shipped_realistic_space_validates_without_its_models() -> None:
    space = load_space(SHIPPED / "mistral7b_leaderboard.yaml", check_models=False)
    assert sorted(space.models) == ["openhermes", "wizardmath", "zephyr"]
    assert space.granularity.groups == 8 and space.raw.executor.kind == "ray" and space.raw.workers == 4
    assert [t.name for t in space.fitness.tasks][:2] == ["arc_challenge", "hellaswag"]


def test_shipped_demo_space_validates_on_the_micro_zoo(micro_zoo: Path, tmp_path: Path) -> None:
    """The demo space with its zoo swapped for the micro zoo (same skills), so the test builds nothing big."""
    text = (SHIPPED / "demo.yaml").read_text().replace("zoo:demo/", "zoo:micro/")
    (tmp_path / "demo.yaml").write_text(text)
    space = load_space(tmp_path / "demo.yaml")
    assert sorted(space.models) == ["add", "enc", "rev", "sort"]
    assert [m.name for m in space.methods] == ["task_arithmetic", "ties"] and space.budget == 150
