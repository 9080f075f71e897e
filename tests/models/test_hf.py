"""checkpoint_names: file tensor names map to the loaded model's parameters, renamed ones included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny_hf import make_config, save_tiny

from evomerge.errors import ModelError
from evomerge.models.folder import ModelFolder
from evomerge.models.hf import checkpoint_names


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "gemma"])
def test_file_tensors_written_through_the_mapping_rebuild_the_model(tmp_path: Path, family: str) -> None:
    src = save_tiny(family, tmp_path / "m", seed=4)
    fresh = tf.AutoModelForCausalLM.from_config(make_config(family))
    with ModelFolder.open(tmp_path / "m") as folder:
        mapping = checkpoint_names(fresh, folder.tensor_names)
        state = fresh.state_dict()
        with torch.no_grad():
            for name in folder.tensor_names:
                state[mapping[name]].copy_(folder.get(name))
    for key, value in src.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    if family == "gpt_neox":
        assert mapping["embed_out.weight"] == "lm_head.weight"
    if family == "gemma":  # tied head left out of the files still maps to itself
        assert mapping["lm_head.weight"] == "lm_head.weight"
    else:
        assert all(k == v for k, v in mapping.items() if k != "embed_out.weight")


def test_fused_and_unknown_tensors_are_refused() -> None:
    cfg = tf.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    mapping = checkpoint_names(model)
    assert mapping["model.layers.0.self_attn.q_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ModelError, match=r"'model\.layers\.0\.block_sparse_moe\.experts\.0\.w\d\.weight' .* is fused"):
        checkpoint_names(model, ["model.layers.0.block_sparse_moe.experts.0.w1.weight"])
    with pytest.raises(ModelError, match=r"no parameter for file tensor 'nope\.weight'"):
        checkpoint_names(model, ["nope.weight"])
