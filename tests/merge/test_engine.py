"""The streaming engine: merged tensors against hand computations, output folder contents, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import build_llamas, load_state

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.engines.disk import merge_to_disk
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe


@pytest.fixture(scope="module")
def states(tiny_llamas: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [load_state(p) for p in tiny_llamas]


def _entry(path: Path, **params: object) -> ModelEntry:
    return ModelEntry(str(path), {k: ParamValue.parse(v) for k, v in params.items()})


def test_linear_is_the_weighted_average(tmp_path: Path, tiny_llamas: list[Path], states: list[dict]) -> None:
    recipe = Recipe("linear", (_entry(tiny_llamas[1], weight=1.0), _entry(tiny_llamas[2], weight=3.0)))
    summary = merge_to_disk(recipe, tmp_path / "out", progress=False)
    out = load_state(tmp_path / "out")
    assert set(out) == set(states[0])
    for name, t in out.items():
        want = (states[1][name] + 3 * states[2][name]) / 4
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6)
    assert summary.tensors == len(states[0])
    assert summary.bytes == sum(t.numel() * 4 for t in out.values())
    assert summary.peak_rss_bytes > 0 and summary.seconds > 0
    assert "merged" in summary.line()


def test_one_model_with_weight_one_is_that_model(tmp_path: Path, tiny_llamas: list[Path], states: list[dict]) -> None:
    merge_to_disk(Recipe("linear", (_entry(tiny_llamas[2], weight=1.0),)), tmp_path / "o", progress=False)
    out = load_state(tmp_path / "o")
    assert all(torch.equal(out[n], states[2][n]) for n in out)


def test_per_layer_weights_follow_the_layer_index(tmp_path: Path, tiny_llamas: list[Path], states: list[dict]) -> None:
    # task arithmetic with weight [0, 1] on m1: layer l gets l/(L-1) of its task vector, non-layer tensors 0.
    recipe = Recipe("task_arithmetic", (_entry(tiny_llamas[1], weight=[0.0, 1.0]),), base_model=str(tiny_llamas[0]))
    merge_to_disk(recipe, tmp_path / "o", progress=False)
    out = load_state(tmp_path / "o")
    b, m = states[0], states[1]
    for layer, u in ((0, 0.0), (1, 0.5), (2, 1.0)):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(out[name], b[name] + u * (m[name] - b[name]), rtol=0, atol=1e-6)
    assert torch.equal(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_filters_pick_values_by_tensor_name(tmp_path: Path, tiny_llamas: list[Path], states: list[dict]) -> None:
    lam = [{"filter": "mlp", "value": 2.0}, {"filter": "kind:attention", "value": 0.5}, {"value": 0.0}]
    recipe = Recipe("task_arithmetic", (_entry(tiny_llamas[1]),), base_model=str(tiny_llamas[0]),
                    parameters={"lambda": ParamValue.parse(lam)})
    merge_to_disk(recipe, tmp_path / "o", progress=False)
    out = load_state(tmp_path / "o")
    b, m = states[0], states[1]
    for name, scale in (("model.layers.1.mlp.up_proj.weight", 2.0), ("model.layers.1.self_attn.v_proj.weight", 0.5),
                        ("model.norm.weight", 0.0)):
        torch.testing.assert_close(out[name], b[name] + scale * (m[name] - b[name]), rtol=0, atol=1e-6)


def test_ties_matches_the_kernel_per_tensor_and_global_scope(tmp_path: Path, tiny_llamas: list[Path],
                                                             states: list[dict]) -> None:
    from evomerge.merge.kernels.sparsify import global_trim_thresholds
    from evomerge.merge.kernels.task_arithmetic import ties

    models = tuple(_entry(p, weight=w, density=0.3) for p, w in zip(tiny_llamas[1:], (1.0, 0.5, 2.0)))
    for scope in ("tensor", "global"):
        recipe = Recipe("ties", models, base_model=str(tiny_llamas[0]), options={"trim_scope": scope})
        merge_to_disk(recipe, tmp_path / scope, progress=False)
        out = load_state(tmp_path / scope)
        names = sorted(out)
        opts: dict = {"trim_scope": scope}
        if scope == "global":
            def batches(names: list[str] = names) -> list:
                return [[s[n] - states[0][n] for s in states[1:]] for n in names]
            opts["global_threshold"] = global_trim_thresholds(batches, [0.3, 0.3, 0.3])
            kept = sum(int(((s[n] - states[0][n]).abs() >= opts["global_threshold"][0]).sum()) for n in names
                       for s in states[1:2])
            assert kept == int(0.3 * sum(states[0][n].numel() for n in names))
        mp = [{"weight": w, "density": 0.3} for w in (1.0, 0.5, 2.0)]
        for n in names:
            want = ties(states[0][n], [s[n] for s in states[1:]], mp, {"lambda": 1.0}, opts, None)
            assert torch.equal(out[n], want), (scope, n)


def test_dare_masks_depend_on_seed_not_order(tmp_path: Path, tiny_llamas: list[Path]) -> None:
    models = tuple(_entry(p, density=0.5) for p in tiny_llamas[1:])
    recipe = Recipe("dare_ties", models, base_model=str(tiny_llamas[0]), seed=3)
    merge_to_disk(recipe, tmp_path / "a", progress=False)
    merge_to_disk(recipe, tmp_path / "b", progress=False)
    merge_to_disk(recipe, tmp_path / "c", seed=4, progress=False)
    a, b, c = (load_state(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # the seed written with the output is the one used
    assert "seed: 4" in (tmp_path / "c" / "evomerge_recipe.yaml").read_text()


def test_output_folder_contents_dtype_and_shards(tmp_path: Path, tiny_llamas: list[Path], states: list[dict]) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    recipe = Recipe("linear", (_entry(tiny_llamas[1]), _entry(tiny_llamas[2])))
    out_dir = tmp_path / "o"
    merge_to_disk(recipe, out_dir, dtype="bfloat16", max_shard_size="20KB", progress=False)
    shards = sorted(out_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out_dir / "model.safetensors.index.json").is_file()
    assert (out_dir / "config.json").is_file() and (out_dir / "generation_config.json").is_file()
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    text = (out_dir / "evomerge_recipe.yaml").read_text()
    assert "method: linear" in text
    with safe_open(str(shards[0]), "pt") as f:
        meta = f.metadata()
    assert meta["evomerge_recipe"] == text and meta["evomerge_version"]
    out = load_state(out_dir)
    name = "model.layers.0.mlp.down_proj.weight"
    assert out[name].dtype == torch.bfloat16
    torch.testing.assert_close(out[name], ((states[1][name] + states[2][name]) / 2).bfloat16(), rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    paths = build_llamas(tmp_path / "tied", 2, tied=True)
    recipe = Recipe("ties", tuple(_entry(p, density=0.5) for p in paths[1:]), base_model=str(paths[0]))
    merge_to_disk(recipe, tmp_path / "o", progress=False)
    out = load_state(tmp_path / "o")
    assert "lm_head.weight" not in out and "model.embed_tokens.weight" in out
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_bad_input_leaves_no_output(tmp_path: Path, tiny_llamas: list[Path]) -> None:
    out_dir = tmp_path / "o"
    with pytest.raises(ModelError, match="does not exist"):
        merge_to_disk(Recipe("linear", (_entry(tmp_path / "nope"),)), out_dir, progress=False)
    with pytest.raises(ConfigError, match="density"):
        merge_to_disk(Recipe("ties", (_entry(tiny_llamas[1], density=1.5),), base_model=str(tiny_llamas[0])), out_dir,
                      progress=False)
    assert list(tmp_path.iterdir()) == []
    merge_to_disk(Recipe("linear", (_entry(tiny_llamas[1]),)), out_dir, progress=False)
    with pytest.raises(ConfigError, match="already exists"):
        merge_to_disk(Recipe("linear", (_entry(tiny_llamas[2]),)), out_dir, progress=False)
    merge_to_disk(Recipe("linear", (_entry(tiny_llamas[2]),)), out_dir, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_worker_count_does_not_change_the_result(tmp_path: Path, tiny_llamas: list[Path]) -> None:
    models = tuple(_entry(p, density=0.4, weight=w) for p, w in zip(tiny_llamas[1:], (1.0, 0.5, 0.8)))
    for method in ("ties", "dare_ties"):
        recipe = Recipe(method, models, base_model=str(tiny_llamas[0]), seed=11)
        merge_to_disk(recipe, tmp_path / f"{method}1", workers=1, progress=False)
        merge_to_disk(recipe, tmp_path / f"{method}3", workers=3, progress=False)
        a, b = load_state(tmp_path / f"{method}1"), load_state(tmp_path / f"{method}3")
        assert all(torch.equal(a[n], b[n]) for n in a), method
    with pytest.raises(ConfigError, match="workers"):
        merge_to_disk(Recipe("linear", (_entry(tiny_llamas[1]),)), tmp_path / "w0", workers=0, progress=False)


def test_tokenizer_source_files_are_copied(tmp_path: Path, tiny_llamas: list[Path]) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "config.json").write_text((tiny_llamas[0] / "config.json").read_text())
    (tok / "tokenizer.json").write_text('{"marker": 1}')
    recipe = Recipe("linear", (_entry(tiny_llamas[1]),), tokenizer_source=str(tok))
    merge_to_disk(recipe, tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "tokenizer.json").read_text() == '{"marker": 1}'
    bad = Recipe("linear", (_entry(tiny_llamas[1]),), tokenizer_source=str(tmp_path / "none"))
    with pytest.raises(ModelError, match="tokenizer_source"):
        merge_to_disk(bad, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_methods_merged_in_pieces_equal_whole_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 dtype: torch.dtype) -> None:
    # pieces of 7 elements (not a divisor of any shape) against the whole-tensor kernel: bitwise equal, for the
    # stored and a wider output dtype, and with the embeddings of a larger vocabulary sliced to the base's
    import dataclasses

    import evomerge.merge.engines.disk as engine
    from evomerge.merge.methods.registry import REGISTRY

    small = build_llamas(tmp_path / "a", 2, dtype=dtype, vocab=64)
    wide = build_llamas(tmp_path / "b", 1, dtype=dtype, vocab=72, seed=5)[1]
    recipes = [
        Recipe("linear", (_entry(small[1], weight=1.0), _entry(small[2], weight=[0.2, 0.9]))),
        Recipe("task_arithmetic", (_entry(small[1], weight=[0.3, 1.2]), _entry(small[2], weight=0.5)),
               base_model=str(small[0]), parameters={"lambda": ParamValue.parse(0.8)}),
        Recipe("task_arithmetic", (_entry(small[1], weight=0.7), _entry(wide, weight=0.4)), base_model=str(small[0])),
    ]
    for i, recipe in enumerate(recipes):
        policy = "slice_to_base" if i == 2 else "refuse"
        for out_dtype in (None, "float32"):
            whole = tmp_path / f"whole{i}{out_dtype}"
            with monkeypatch.context() as m:
                method = REGISTRY.get(recipe.method)
                m.setitem(REGISTRY._methods, recipe.method, dataclasses.replace(method, elementwise=False))
                merge_to_disk(recipe, whole, dtype=out_dtype, vocab_policy=policy, progress=False)
            with monkeypatch.context() as m:
                m.setattr(engine, "PIECE_ELEMS", 7)
                m.setattr(engine, "_pieces", __import__("threading").local())
                merge_to_disk(recipe, tmp_path / f"pieces{i}{out_dtype}", dtype=out_dtype, vocab_policy=policy,
                              progress=False)
            a, b = load_state(whole), load_state(tmp_path / f"pieces{i}{out_dtype}")
            assert a.keys() == b.keys()
            for name in a:
                assert a[name].dtype == (dtype if out_dtype is None else torch.float32)
                assert torch.equal(a[name], b[name]), (i, out_dtype, name)


def test_streaming_from_files_in_parts_and_under_a_budget_equals_whole_tensors(tmp_path: Path) -> None:
    """TIES read piece by piece from the files (several readers, parts walked by two threads) and merge_to_disk
    under a tiny budget give the whole-tensor kernel's bits; the embedding (8,192 x 32) has 8 parts."""
    from evomerge.merge.engines.disk import open_inputs
    from evomerge.merge.kernels.pieces import CpuShare
    from evomerge.merge.kernels.task_arithmetic import ties

    paths = build_llamas(tmp_path / "m", 3, dtype=torch.bfloat16, vocab=8192, layers=1)
    states = [load_state(p) for p in paths]
    weights = (1.0, 0.5, 2.0)
    recipe = Recipe("ties", tuple(_entry(p, weight=w, density=0.2) for p, w in zip(paths[1:], weights)),
                    base_model=str(paths[0]))
    mp = [{"weight": w, "density": 0.2} for w in weights]

    def whole(n: str) -> torch.Tensor:
        return ties(states[0][n], [s[n] for s in states[1:]], mp, {}, {}).to(torch.bfloat16)

    name = "model.embed_tokens.weight"
    inputs = open_inputs(recipe)
    try:
        srcs = [inputs.source(k, name) for k in (inputs.plan.base_key, *inputs.plan.input_keys)]
        out = torch.empty(srcs[0].shape, dtype=torch.bfloat16)
        opts = {"cpu_share": CpuShare(2), "kernel_threads": 2, "part_elems": 1 << 15, "piece_elems": 10_000}
        ties(srcs[0], srcs[1:], mp, {}, opts, out=out)
        assert torch.equal(out, whole(name))
    finally:
        inputs.close()
    merge_to_disk(recipe, tmp_path / "o", memory_budget="1MB", workers=2, progress=False)
    got = load_state(tmp_path / "o")
    assert all(torch.equal(got[n], whole(n)) for n in got)
