"""check_compatible: what may be merged, and a ModelError naming model, tensor and shapes for what may not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from evomerge.errors import ConfigError, ModelError
from evomerge.models.compat import check_compatible
from evomerge.models.folder import ModelFolder


def _open(*paths: Path) -> list[ModelFolder]:
    return [ModelFolder.open(p) for p in paths]


def _edit_weights(folder: Path, edit) -> None:
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_compatible_models_give_the_reference_order(tmp_path: Path) -> None:
    for i in range(3):
        save_tiny("llama", tmp_path / f"m{i}", seed=i)
    base, a, b = _open(tmp_path / "m0", tmp_path / "m1", tmp_path / "m2")
    report = check_compatible(base, [a, b])
    assert report.reference is base and report.models == [a, b]
    assert report.tensor_names == base.tensor_names and len(report.tensor_names) == 21
    assert report.vocab_slices == {} and report.num_layers == 2
    assert report.rows("lm_head.weight") is None
    t = torch.ones(64, 16)
    assert report.slice_rows("lm_head.weight", t) is t
    no_base = check_compatible(None, [a, b])
    assert no_base.reference is a and no_base.tensor_names == a.tensor_names


def test_tied_head_left_out_is_not_a_mismatch(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "tied", seed=0, tie_word_embeddings=True)
    save_tiny("llama", tmp_path / "untied", seed=1)
    tied, untied = _open(tmp_path / "tied", tmp_path / "untied")
    assert not tied.has("lm_head.weight") and tied.tied_embeddings
    # base tied: the model's own head is not merged (the output ties it), noted
    r1 = check_compatible(tied, [untied])
    assert "lm_head.weight" not in r1.tensor_names
    assert any("'lm_head.weight' not merged" in n and str(untied.path) in n for n in r1.notes)
    # base untied: the tied model's head is its embedding
    r2 = check_compatible(untied, [tied])
    assert "lm_head.weight" in r2.tensor_names
    assert torch.equal(tied.get("lm_head.weight"), tied.get("model.embed_tokens.weight"))


def test_shape_mismatch_names_model_tensor_and_shapes(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "base")
    save_tiny("llama", tmp_path / "wide", intermediate_size=48)
    base, wide = _open(tmp_path / "base", tmp_path / "wide")
    with pytest.raises(ModelError) as err:
        check_compatible(base, [wide])
    msg = str(err.value)
    assert "models cannot be merged (6 problems)" in msg
    assert (f"model {wide.path}: tensor 'model.layers.0.mlp.up_proj.weight' has shape (48, 16) but (32, 16) "
            f"in the base {base.path}") in msg
    assert "'model.layers.1.mlp.down_proj.weight' has shape (16, 48) but (16, 32)" in msg


def test_missing_and_extra_tensors(tmp_path: Path) -> None:
    save_tiny("qwen2", tmp_path / "base")
    save_tiny("qwen2", tmp_path / "m", seed=1)
    _edit_weights(tmp_path / "m", lambda t: (t.pop("model.layers.1.self_attn.q_proj.bias"),
                                             t.__setitem__("model.layers.1.self_attn.extra.weight", torch.zeros(2, 3))))
    base, m = _open(tmp_path / "base", tmp_path / "m")
    with pytest.raises(ModelError) as err:
        check_compatible(base, [m])
    msg = str(err.value)
    assert f"model {m.path} lacks tensor 'model.layers.1.self_attn.q_proj.bias' (shape (16,) in the base {base.path})" in msg
    assert (f"model {m.path} has tensor 'model.layers.1.self_attn.extra.weight' (shape (2, 3)) that the base "
            f"{base.path} lacks") in msg


def test_buffers_some_checkpoints_store_are_dropped_not_refused(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "base")
    save_tiny("llama", tmp_path / "m", seed=1)
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _edit_weights(tmp_path / "base", lambda t: t.__setitem__(name, torch.ones(4)))
    base, m = _open(tmp_path / "base", tmp_path / "m")
    report = check_compatible(base, [m])
    assert name not in report.tensor_names and len(report.tensor_names) == 21
    assert any(name in n for n in report.notes)


def test_vocab_mismatch_refused_by_default_and_sliced_on_request(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "base")
    big = save_tiny("llama", tmp_path / "big", seed=1, vocab_size=80)
    base, m = _open(tmp_path / "base", tmp_path / "big")
    with pytest.raises(ModelError) as err:
        check_compatible(base, [m])
    msg = str(err.value)
    assert (f"model {m.path}: tensor 'model.embed_tokens.weight' has shape (80, 16) (vocab_size 80) but (64, 16) "
            f"in the base {base.path} (vocab_size 64)") in msg
    assert "'lm_head.weight' has shape (80, 16)" in msg
    assert "slice_to_base" in msg
    report = check_compatible(base, [m], vocab_policy="slice_to_base")
    assert report.vocab_slices == {"model.embed_tokens.weight": 64, "lm_head.weight": 64}
    full = m.get("lm_head.weight")
    sliced = report.slice_rows("lm_head.weight", full)
    assert sliced.shape == (64, 16) and torch.equal(sliced, big.lm_head.weight.detach()[:64])
    assert torch.equal(m.get("lm_head.weight", rows=report.rows("lm_head.weight")), sliced)
    assert report.slice_rows("model.norm.weight", m.get("model.norm.weight")).shape == (16,)
    # slicing only drops rows: a model with a smaller vocabulary than the base is refused
    save_tiny("llama", tmp_path / "small", seed=2, vocab_size=48)
    (small,) = _open(tmp_path / "small")
    with pytest.raises(ModelError, match=r"'model\.embed_tokens\.weight' has 48 rows \(shape \(48, 16\)\), fewer than the 64"):
        check_compatible(base, [small], vocab_policy="slice_to_base")


def test_config_vocab_difference_with_equal_shapes(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "base")
    save_tiny("llama", tmp_path / "m", seed=1)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["vocab_size"] = 60
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    base, m = _open(tmp_path / "base", tmp_path / "m")
    with pytest.raises(ModelError, match=r"has vocab_size 60 but the base .* has 64"):
        check_compatible(base, [m])
    report = check_compatible(base, [m], vocab_policy="slice_to_base")
    assert report.vocab_slices == {} and any("vocab_size 60" in n for n in report.notes)


def test_different_architectures_and_layer_counts(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "llama")
    save_tiny("qwen2", tmp_path / "qwen")
    save_tiny("llama", tmp_path / "deep", num_hidden_layers=3)
    llama, qwen, deep = _open(tmp_path / "llama", tmp_path / "qwen", tmp_path / "deep")
    with pytest.raises(ModelError) as err:
        check_compatible(llama, [qwen, deep])
    msg = str(err.value)
    assert (f"model {qwen.path} is Qwen2ForCausalLM (model_type 'qwen2') but the base {llama.path} is "
            "LlamaForCausalLM (model_type 'llama'): different architectures cannot be merged") in msg
    assert f"model {deep.path} has 3 layers but the base {llama.path} has 2" in msg
    assert "(2 problems)" in msg
    with pytest.raises(ModelError, match=r"reference model \(the first; no base given\)"):
        check_compatible(None, [llama, qwen])


def test_policy_and_arguments_are_validated(tiny_models) -> None:
    (m,) = _open(tiny_models["llama"][0])
    with pytest.raises(ConfigError, match=r"vocab_policy: unknown value 'pad'; expected one of refuse, slice_to_base"):
        check_compatible(m, [m], vocab_policy="pad")
    with pytest.raises(ConfigError, match="no models"):
        check_compatible(None, [])
    assert check_compatible(m, [m]).tensor_names == m.tensor_names  # the base may also be listed as a model
