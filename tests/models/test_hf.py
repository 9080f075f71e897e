"""checkpoint_names: file tensor names map to the loaded model's parameters, renamed ones included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from helpers.tiny_models import save_tiny, tiny_config

from evomerge.errors import ModelError
from evomerge.models.folder import ModelFolder
from evomerge.models.hf import checkpoint_names


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "gemma"])
def test_file_tensors_written_through_the_mapping_rebuild_the_model(tmp_path: Path, family: str) -> None:
    src = save_tiny(family, tmp_path / "m", seed=4)
    fresh = tf.AutoModelForCausalLM.from_config(tiny_config(family))
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


def test_the_loading_rule_never_runs_folder_code_nor_unpickles(tmp_path: Path) -> None:
    """A folder that asks for its own code is refused before transformers could import it; pickles likewise."""
    import json
    import subprocess
    import sys

    from evomerge.models.hf import load_causal_lm

    folder = tmp_path / "custom"
    save_tiny("llama", folder, seed=1)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="custom code"):
        load_causal_lm(folder)
    # the CLI too, with a terminal-like stdin answering "y" to any prompt
    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (tmp_path / "tasks.yaml").write_text(f"tasks: [{{name: t, jsonl: {tmp_path / 'rows.jsonl'}}}]\n")
    out = subprocess.run([sys.executable, "-m", "evomerge", "eval", str(folder), "--tasks", str(tmp_path / "tasks.yaml")],
                         input="y\n", capture_output=True, text=True)
    assert out.returncode == 2 and "custom code" in out.stderr, out.stderr
    assert not marker.exists()
    unknown = tmp_path / "unknown"
    save_tiny("llama", unknown, seed=1)
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "evil_arch"
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="'evil_arch' is not an architecture"):
        load_causal_lm(unknown)
    pickled = tmp_path / "pickled"
    save_tiny("llama", pickled, seed=1)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    with pytest.raises(ModelError, match="only pickled weights"):
        load_causal_lm(pickled)
