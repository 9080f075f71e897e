"""Layer stacking (passthrough with slices) through the disk engine: which tensor each output layer is, values
per slice, the new layer count in the config, and bad slices refused before any output exists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers.tiny_models import load_state

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.merge.engines.disk import merge_to_disk
from evomerge.merge.engines.memory import merge_in_memory
from evomerge.merge.engines.resident import ResidentMerger
from evomerge.merge.methods.registry import plan_recipe
from evomerge.merge.recipe import Recipe
from evomerge.models.layers import LayerMap


@pytest.fixture(scope="module")
def llamas(tiny_llamas: list[Path]) -> list[Path]:
    """The session's base and first two fine-tunes (read only)."""
    return tiny_llamas[:3]


def _stack(a: Path, b: Path) -> Recipe:
    return Recipe.from_dict({"method": "passthrough", "slices": [
        {"model": str(a), "layer_range": [0, 2]},
        {"model": str(b), "layer_range": [1, 3],
         "parameters": {"scale": [{"filter": "o_proj", "value": [0.0, 1.0]}, {"value": 1.0}]}},
        {"model": str(a), "layer_range": [2, 3], "parameters": {"scale": 0.5}},
    ]})


def test_output_layers_are_the_slices_in_order(tmp_path: Path, llamas: list[Path]) -> None:
    _, a, b = llamas
    out = tmp_path / "o"
    summary = merge_to_disk(_stack(a, b), out, progress=False)
    sa, sb, got = load_state(a), load_state(b), load_state(out)
    # output layer -> (source state, source layer, scale of o_proj, scale of the rest)
    plan = [(sa, 0, 1.0, 1.0), (sa, 1, 1.0, 1.0), (sb, 1, 0.0, 1.0), (sb, 2, 1.0, 1.0), (sa, 2, 0.5, 0.5)]
    per_layer = [n.replace("model.layers.0.", "") for n in sa if n.startswith("model.layers.0.")]
    assert summary.tensors == len(got) == 3 + 5 * len(per_layer)  # embed, norm, head + 5 layers
    for j, (src, i, o_scale, scale) in enumerate(plan):
        for part in per_layer:
            want = src[f"model.layers.{i}.{part}"] * (o_scale if "o_proj" in part else scale)
            assert torch.equal(got[f"model.layers.{j}.{part}"], want), (j, part)
    # embeddings from the first slice's model, final norm and head from the last slice's model
    assert torch.equal(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], sa["lm_head.weight"] * 0.5)
    assert torch.equal(got["model.norm.weight"], sa["model.norm.weight"] * 0.5)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 5
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    recorded = yaml.safe_load((out / "evomerge_recipe.yaml").read_text())
    assert Recipe.from_dict(recorded) == _stack(a, b)


def test_per_layer_lists_run_over_each_slice(tmp_path: Path, llamas: list[Path]) -> None:
    _, a, _ = llamas
    recipe = Recipe.from_dict({"method": "passthrough", "slices": [
        {"model": str(a), "layer_range": [0, 3], "parameters": {"scale": [0.0, 1.0]}},
        {"model": str(a), "layer_range": [1, 2], "parameters": {"scale": [0.0, 1.0]}},
    ]})
    merge_to_disk(recipe, tmp_path / "o", progress=False)
    got, src = load_state(tmp_path / "o"), load_state(a)
    name = "mlp.up_proj.weight"
    for j, (i, u) in enumerate([(0, 0.0), (1, 0.5), (2, 1.0), (1, 1.0)]):  # a one-layer slice sits at u = 1
        torch.testing.assert_close(got[f"model.layers.{j}.{name}"], src[f"model.layers.{i}.{name}"] * u)
    torch.testing.assert_close(got["model.embed_tokens.weight"], src["model.embed_tokens.weight"] * 0.0)


def test_per_layer_config_lists_follow_the_source_layers_and_base_supplies_the_config(
        tmp_path: Path, llamas: list[Path]) -> None:
    base, a, b = llamas
    typed = tmp_path / "typed"
    shutil.copytree(a, typed)
    cfg = json.loads((typed / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "sliding_attention", "chunked"]
    (typed / "config.json").write_text(json.dumps(cfg))
    recipe = Recipe.from_dict({"method": "passthrough", "slices": [
        {"model": str(typed), "layer_range": [1, 3]}, {"model": str(typed), "layer_range": [0, 2]}]})
    merge_to_disk(recipe, tmp_path / "o", progress=False)
    out_cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert out_cfg["num_hidden_layers"] == 4
    assert out_cfg["layer_types"] == ["sliding_attention", "chunked", "full_attention", "sliding_attention"]
    # base_model: the stack's config and tokenizer files come from it (mergekit's output config too)
    marked = tmp_path / "marked_base"
    shutil.copytree(base, marked)
    cfg = json.loads((marked / "config.json").read_text())
    cfg["rms_norm_eps"] = 1.25e-3
    (marked / "config.json").write_text(json.dumps(cfg))
    with_base = Recipe.from_dict({"method": "passthrough", "base_model": str(marked),
                                  "slices": [{"model": str(b), "layer_range": [0, 1]}]})
    merge_to_disk(with_base, tmp_path / "ob", progress=False)
    cfg_b = json.loads((tmp_path / "ob" / "config.json").read_text())
    assert cfg_b["rms_norm_eps"] == 1.25e-3 and cfg_b["num_hidden_layers"] == 1


def test_a_stack_needs_the_disk_engine(llamas: list[Path]) -> None:
    _, a, b = llamas
    recipe = _stack(a, b)
    with pytest.raises(ConfigError, match="disk engine only"):
        merge_in_memory(plan_recipe(recipe, LayerMap.generic(3)), {str(a): load_state(a), str(b): load_state(b)})
    merger = ResidentMerger(llamas[0], {"a": a, "b": b})
    keyed = Recipe.from_dict({"method": "passthrough", "slices": [{"model": "a", "layer_range": [0, 2]}]})
    with pytest.raises(ConfigError, match="disk engine only"):
        merger.state_dict(keyed)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_slices_give_clear_errors_and_no_output(tmp_path: Path, llamas: list[Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _, a, b = llamas
    cases = {
        "beyond the model": ({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [2, 5]}]}]},
            r"slices[1].layer_range: [2, 5] of model " + str(b) + " exceeds its 3 layers"),
        "mismatch across sources": ({"merge_method": "slerp", "base_model": str(a), "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}, {"model": str(b), "layer_range": [0, 2]}]}]},
            "slices[0].sources[1].layer_range: [0, 2] gives 2 layers but sources[0] gives 3"),
        "partial range, not stacked": ({"merge_method": "slerp", "base_model": str(a), "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}]}]},
            "does not cover every layer"),
        "unknown parameter": ({"merge_method": "della", "base_model": str(llamas[0]),
                               "models": [{"model": str(a), "parameters": {"weight": 1.0, "epsilonn": 0.1}}]},
                              "parameters.epsilonn: unknown parameter for method della"),
        "evomerge form beyond the model": ({"method": "passthrough", "slices": [
            {"model": str(a), "layer_range": [1, 4]}]}, "exceeds its 3 layers"),
    }
    for label, (data, message) in cases.items():
        outroot = tmp_path / label.replace(" ", "_")
        outroot.mkdir()
        recipe = _write(tmp_path / f"{label.replace(' ', '_')}.yaml", data)
        capsys.readouterr()
        assert main(["merge", str(recipe), str(outroot / "o"), "--no-progress"]) == 2, label
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (label, err)
        assert list(outroot.iterdir()) == [], label
    # the engine checks the ranges itself too (a recipe built in code)
    bad = Recipe.from_dict({"method": "passthrough", "slices": [{"model": str(a), "layer_range": [0, 9]}]})
    with pytest.raises(ConfigError, match=r"recipe.slices\[0\].layer_range: \[0, 9\]"):
        merge_to_disk(bad, tmp_path / "engine_out", progress=False)
    assert not (tmp_path / "engine_out").exists()


def test_mergekit_yaml_of_a_stack_is_written_and_reads_back(tmp_path: Path, llamas: list[Path]) -> None:
    _, a, b = llamas
    recipe_file = _write(tmp_path / "stack.yaml", _stack(a, b).to_dict())
    assert main(["merge", str(recipe_file), str(tmp_path / "ev"), "--no-progress", "--write-mergekit-yaml"]) == 0
    mk = yaml.safe_load((tmp_path / "ev" / "mergekit_config.yml").read_text())
    assert mk["merge_method"] == "passthrough" and len(mk["slices"]) == 3
    assert main(["merge", str(tmp_path / "ev" / "mergekit_config.yml"), str(tmp_path / "mk"), "--no-progress"]) == 0
    x, y = load_state(tmp_path / "ev"), load_state(tmp_path / "mk")
    assert sorted(x) == sorted(y) and all(torch.equal(x[n], y[n]) for n in x)


def test_slice_models_are_resolved_like_every_model_reference(tmp_path: Path, llamas: list[Path]) -> None:
    from evomerge.merge.formats.recipe_yaml import load_recipe
    from evomerge.search.export import recipe_with_paths

    _, a, b = llamas
    here = a.parent
    f = _write(here / "rel_stack.yaml", {"method": "passthrough", "slices": [
        {"model": a.name, "layer_range": [0, 1]}, {"model": b.name, "layer_range": [2, 3]}]})
    recipe = load_recipe(f)
    assert [s.model for s in recipe.slices] == [str(a.resolve()), str(b.resolve())]
    assert [m.model for m in recipe.models] == [str(a.resolve()), str(b.resolve())]
    keyed = Recipe.from_dict({"method": "passthrough", "slices": [{"model": "x", "layer_range": [0, 1]},
                                                                  {"model": "y", "layer_range": [1, 2]}]})
    placed = recipe_with_paths(keyed, {"x": str(a), "y": str(b)})
    assert [s.model for s in placed.slices] == [str(a), str(b)] and placed.models[1].model == str(b)
