"""The resident merger: same results as the disk engine for every method, in place, without reallocation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_models import build_llamas, load_state

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.engines.disk import merge_to_disk
from evomerge.merge.engines.resident import ResidentMerger
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe

KEYS = ("a", "b", "c")


@pytest.fixture(scope="module")
def merger(tiny_llamas: list[Path]) -> ResidentMerger:
    return ResidentMerger(tiny_llamas[0], dict(zip(KEYS, tiny_llamas[1:])))


def _recipe(method: str, keys: tuple[str, ...], base: str | None, per_model: dict, glob: dict | None = None,
            options: dict | None = None, seed: int = 5) -> Recipe:
    models = tuple(ModelEntry(k, {n: ParamValue.parse(v) for n, v in per_model.get(k, {}).items()}) for k in keys)
    return Recipe(method, models, base_model=base, parameters={n: ParamValue.parse(v) for n, v in (glob or {}).items()},
                  options=options or {}, seed=seed)


# (method, model keys, uses base, per-model params, global params, options); per-layer lists and filters
# throughout, since those are what the search tunes.
CASES = [
    ("linear", KEYS, False, {"a": {"weight": [0.2, 1.0]}, "b": {"weight": 0.5}, "c": {"weight": [1.0, 0.1]}}, {}, {}),
    ("linear", ("base", "a"), False, {"base": {"weight": 0.7}, "a": {"weight": 0.3}}, {}, {"normalize": False}),
    ("task_arithmetic", KEYS, True, {"a": {"weight": [0.0, 1.0]}, "b": {"weight": -0.5}, "c": {"weight": 0.3}},
     {"lambda": [{"filter": "mlp", "value": [0.5, 1.5]}, {"value": 1.0}]}, {}),
    ("task_arithmetic", ("c", "a"), True, {"a": {"weight": 1.0}, "c": {"weight": [2.0, 0.0]}}, {},
     {"normalize": True}),
    ("ties", KEYS, True, {"a": {"weight": 1.0, "density": [0.1, 0.9]}, "b": {"weight": 0.5, "density": 0.3},
                          "c": {"weight": 2.0, "density": 0.5}}, {"lambda": 1.2}, {}),
    ("ties", KEYS, True, {"a": {"density": 0.2}, "b": {"density": 0.4}, "c": {"density": 0.3}}, {},
     {"trim_scope": "global"}),
    ("dare_linear", KEYS, True, {"a": {"density": 0.5}, "b": {"density": [0.3, 0.9]}, "c": {"density": 0.7}}, {}, {}),
    ("dare_ties", KEYS, True, {"a": {"density": 0.5, "weight": 0.7}, "b": {"density": 0.4}, "c": {"density": 0.6}},
     {}, {}),
    ("breadcrumbs", KEYS, True, {"a": {"density": 0.8, "gamma": 0.05}, "b": {}, "c": {"density": 0.7}}, {}, {}),
    ("breadcrumbs_ties", KEYS, True, {"a": {"density": 0.8}, "b": {"density": 0.6}, "c": {}}, {}, {}),
    ("slerp", ("base", "b"), True, {}, {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]}, {}),
    ("model_stock", KEYS, True, {}, {}, {}),
    ("model_stock", ("a", "b"), True, {}, {}, {"filter_wise": True}),
    ("mergeability_weighted", KEYS, True, {"a": {"base_score": 0.2}, "b": {"base_score": 0.5},
                                           "c": {"base_score": 0.9}}, {"tau": 0.3}, {}),
    ("della", KEYS, True, {"a": {"density": [0.3, 0.8], "epsilon": 0.1}, "b": {"weight": 0.5}, "c": {}},
     {"lambda": 1.2}, {}),
    ("della_linear", KEYS, True, {"a": {"density": 0.4}, "b": {"density": 0.6}, "c": {}}, {},
     {"rescale": "l1_norm"}),
    ("sce", KEYS, True, {}, {"select_topk": [0.2, 0.9]}, {}),
    ("nuslerp", ("a", "b"), True, {"a": {"weight": 1.0}, "b": {"weight": [0.2, 0.8]}}, {}, {}),
    ("nuslerp", ("b", "c"), False, {"b": {"weight": 0.3}}, {}, {"nuslerp_flatten": False}),
    ("multislerp", KEYS, False, {"a": {"weight": [0.2, 1.0]}, "b": {"weight": 0.5}}, {}, {}),
    ("multislerp", KEYS, True, {"c": {"weight": 2.0}}, {}, {}),
    ("karcher", ("a", "b"), True, {"a": {"weight": [1.0, 3.0]}}, {}, {"max_iter": 5}),
    ("nearswap", ("a",), True, {}, {"t": [{"filter": "mlp", "value": [0.001, 0.01]}, {"value": 0.005}]}, {}),
    ("arcee_fusion", ("c",), True, {}, {}, {}),
    ("ram", KEYS, True, {}, {"epsilon": [0.002, 0.01]}, {}),
    ("ramplus_tl", KEYS, True, {}, {"epsilon": 0.004, "r": [0.2, 0.8], "alpha": 0.5}, {}),
    ("passthrough", ("b",), False, {"b": {"scale": [{"filter": "self_attn", "value": [0.5, 1.5]}]}}, {}, {}),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_resident_equals_disk_engine(case: tuple, merger: ResidentMerger, tiny_llamas: list[Path], tmp_path: Path) -> None:
    method, keys, uses_base, per_model, glob, options = case
    base = "base" if uses_base else None
    recipe = _recipe(method, keys, base, per_model, glob, options)
    paths = {"base": str(tiny_llamas[0]), **{k: str(p) for k, p in zip(KEYS, tiny_llamas[1:])}}
    on_disk = _recipe(method, tuple(paths[k] for k in keys), paths["base"] if base else None,
                      {paths[k]: v for k, v in per_model.items()}, glob, options)
    merge_to_disk(on_disk, tmp_path / "o", dtype="float32", progress=False)
    want = load_state(tmp_path / "o")
    got = merger.state_dict(recipe)
    assert set(got) == set(want)
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert worst <= 1e-6, f"{method}: max |resident - disk| = {worst}"
    # the merge did something: not the base everywhere
    base_state = load_state(tiny_llamas[0])
    assert any(not torch.equal(got[n], base_state[n]) for n in got)


def test_apply_writes_in_place_without_reallocating(merger: ResidentMerger, tiny_llamas: list[Path]) -> None:
    model = merger.new_model()
    params = dict(model.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    base_state = load_state(tiny_llamas[0])
    assert all(torch.equal(params[n].detach(), base_state[n]) for n in base_state)
    r1 = _recipe("task_arithmetic", KEYS, "base", {"a": {"weight": [0.1, 0.9]}, "b": {"weight": 0.2},
                                                   "c": {"weight": 0.3}})
    r2 = _recipe("ties", KEYS, "base", {k: {"density": 0.3} for k in KEYS})
    for recipe in (r1, r2, r1):
        stats = merger.apply(recipe, into=model)
        assert stats.tensors == len(base_state) and stats.seconds > 0
        assert stats.fused == (recipe.method == "task_arithmetic")
        want = merger.state_dict(recipe)
        assert all(torch.equal(params[n].detach(), want[n]) for n in want)
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    # logits follow the merged weights
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        merged_logits = model(ids).logits
        merger.apply(_recipe("linear", ("base",), None, {}), into=model)
        base_logits = model(ids).logits
    assert not torch.allclose(merged_logits, base_logits)


def test_task_arithmetic_by_hand(merger: ResidentMerger, tiny_llamas: list[Path]) -> None:
    states = [load_state(p) for p in tiny_llamas]
    recipe = _recipe("task_arithmetic", ("a", "c"), "base", {"a": {"weight": 0.5}, "c": {"weight": -1.0}},
                     {"lambda": 2.0})
    got = merger.state_dict(recipe)
    for n, b in states[0].items():
        want = b + 2.0 * (0.5 * (states[1][n] - b) - (states[3][n] - b))
        torch.testing.assert_close(got[n], want, rtol=0, atol=1e-6)


def test_add_and_remove_models(merger: ResidentMerger, tiny_llamas: list[Path], tmp_path: Path) -> None:
    child = tmp_path / "child"
    merge_to_disk(Recipe("linear", (ModelEntry(str(tiny_llamas[1])), ModelEntry(str(tiny_llamas[2])))), child,
                  dtype="float32", progress=False)
    m = ResidentMerger(tiny_llamas[0], {"a": tiny_llamas[1]})
    m.add_model("child", child)
    assert m.keys == ["a", "child"]
    got = m.state_dict(_recipe("linear", ("child",), None, {}))
    want = load_state(child)
    assert max(float((got[n] - want[n]).abs().max()) for n in want) <= 1e-6
    with pytest.raises(ConfigError, match="already used"):
        m.add_model("a", tiny_llamas[2])
    m.remove_model("a")
    assert m.keys == ["child"]
    with pytest.raises(ConfigError, match="not resident"):
        m.state_dict(_recipe("linear", ("a",), None, {}))
    got2 = m.state_dict(_recipe("linear", ("child",), None, {}))
    assert all(torch.equal(got[n], got2[n]) for n in got)


def test_tied_embeddings(tmp_path: Path) -> None:
    paths = build_llamas(tmp_path, 2, tied=True)
    m = ResidentMerger(paths[0], {"a": paths[1], "b": paths[2]})
    model = m.new_model()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    recipe = _recipe("ties", ("a", "b"), "base", {"a": {"density": 0.5}, "b": {"density": 0.5}})
    m.apply(recipe, into=model)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    disk = _recipe("ties", tuple(str(p) for p in paths[1:]), str(paths[0]),
                   {str(paths[1]): {"density": 0.5}, str(paths[2]): {"density": 0.5}})
    merge_to_disk(disk, tmp_path / "o", progress=False)
    want = load_state(tmp_path / "o")
    assert torch.equal(model.model.embed_tokens.weight.detach(), want["model.embed_tokens.weight"])


def test_bad_recipes_and_models(merger: ResidentMerger, tmp_path: Path, tiny_llamas: list[Path]) -> None:
    with pytest.raises(ConfigError, match="'zz' is not resident"):
        merger.state_dict(_recipe("linear", ("zz",), None, {}))
    with pytest.raises(ConfigError, match="density"):
        merger.state_dict(_recipe("ties", ("a",), "base", {"a": {"density": 1.5}}))
    with pytest.raises(ConfigError, match="base is 'base'"):
        merger.state_dict(_recipe("ties", ("a",), "other", {}))
    other = build_llamas(tmp_path, 1, layers=2)
    with pytest.raises(ModelError, match="layers"):
        ResidentMerger(tiny_llamas[0], {"x": other[1]})
    with pytest.raises(ConfigError, match="reserved"):
        ResidentMerger(tiny_llamas[0], {"base": tiny_llamas[1]})


def test_bfloat16_resident_is_close(tiny_llamas: list[Path]) -> None:
    m = ResidentMerger(tiny_llamas[0], {"a": tiny_llamas[1], "b": tiny_llamas[2]}, dtype="bfloat16")
    recipe = _recipe("task_arithmetic", ("a", "b"), "base", {"a": {"weight": 0.5}, "b": {"weight": 0.5}})
    got = m.state_dict(recipe)
    ref = ResidentMerger(tiny_llamas[0], {"a": tiny_llamas[1], "b": tiny_llamas[2]}).state_dict(recipe)
    for n in ref:
        assert got[n].dtype == torch.bfloat16
        torch.testing.assert_close(got[n].float(), ref[n], rtol=2e-2, atol=2e-2)


def test_single_thread_and_parallel_apply_agree(tiny_llamas: list[Path]) -> None:
    serial = ResidentMerger(tiny_llamas[0], dict(zip(KEYS, tiny_llamas[1:])), workers=1)
    parallel = ResidentMerger(tiny_llamas[0], dict(zip(KEYS, tiny_llamas[1:])), workers=3)
    for recipe in (_recipe("ties", KEYS, "base", {k: {"density": 0.3} for k in KEYS}),
                   _recipe("task_arithmetic", ("b", "c"), "base", {"b": {"weight": [0.2, 0.6]}})):
        a, b = serial.state_dict(recipe), parallel.state_dict(recipe)
        assert all(torch.equal(a[n], b[n]) for n in a)
    model = parallel.new_model()
    assert parallel.copy_floor(model) > 0
    base = load_state(tiny_llamas[0])
    assert all(torch.equal(p.detach(), base[n]) for n, p in model.named_parameters())
    assert parallel.resident_bytes == 4 * sum(t.numel() for t in base.values()) * 4
    parallel.close()
