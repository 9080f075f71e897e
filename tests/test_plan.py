"""`evomerge plan`: the memory plan of search_spaces/mistral7b_leaderboard.yaml on a config-only stand-in of its
four 7B models (configs and safetensors headers, no weights): the numbers, and the tier auto picks per device."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.merge.engines.tiers import plan_resident

ROOT = Path(__file__).resolve().parent.parent
MISTRAL = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "head_dim": 128,
}


def mistral_tensors() -> dict[str, tuple[int, ...]]:
    h, i, kv, v = 4096, 14336, 1024, 32000
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(32):
        p = f"model.layers.{layer}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return out


def write_stand_in(folder: Path, shards: int = 2) -> int:
    """A model folder whose bf16 safetensors shards hold headers only (the data sections are absent)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(MISTRAL))
    names = list(mistral_tensors().items())
    per = math.ceil(len(names) / shards)
    weight_map, params = {}, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name, shape in names[s * per:(s + 1) * per]:
            n = math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * n]}
            offset += 2 * n
            params += n
            weight_map[name] = file
        raw = json.dumps(header).encode()
        (folder / file).write_bytes(struct.pack("<Q", len(raw)) + raw)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return params


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mistral")
    data = yaml.safe_load((ROOT / "search_spaces" / "mistral7b_leaderboard.yaml").read_text())
    params = write_stand_in(root / "Mistral-7B-v0.1")
    assert abs(params - 7.24e9) < 0.01e9
    data["models"]["base"] = str(root / "Mistral-7B-v0.1")
    for key in data["models"]["fine_tunes"]:
        write_stand_in(root / key)
        data["models"]["fine_tunes"][key] = str(root / key)
    (root / "space.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "space.yaml"


def _plan(space: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, dict]:
    code = main(["plan", str(space), "--no-probe", "--json", *flags])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_mistral_plan_numbers_and_choices(space: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, plan = _plan(space, capsys, "--device-memory", "24GB", "--host-memory", "1TB")
    assert code == 0
    model = 7241732096 * 2  # Mistral-7B-v0.1's parameters in bfloat16
    assert plan["live_model_bytes"] == model and plan["base_bytes"] == model
    assert [m["task_vector_bytes"] for m in plan["models"]] == [model] * 3
    tiers = plan["tiers"]
    # device: base + 3 task vectors + the live model (58 + 14.5 GB) + evaluation activations
    assert tiers["device"]["device_bytes"] == 5 * model + plan["eval_bytes"]
    assert tiers["cpu"]["host_bytes"] == 4 * model  # the store in pinned host memory
    assert tiers["disk"]["host_bytes"] == 0 and tiers["disk"]["mapped_bytes"] == 4 * model
    # 16 x 2048 tokens x (2 x 32000 logits + 2 x 4096) x 2 bytes (bf16)
    assert plan["eval_bytes"] == 16 * 2048 * (2 * 32000 + 2 * 4096) * 2
    assert plan["device_memory"] == 24 * 10**9 and plan["host_memory"] == 10**12
    assert plan["workers"] == 4  # the host memory is shared: 250 GB per worker
    assert not tiers["device"]["fits"] and "24.00 GB" in tiers["device"]["why"]
    assert tiers["cpu"]["fits"] and plan["choice"] == "cpu"
    assert all(tiers[t]["merge_seconds"] > 0 for t in tiers)
    assert tiers["device"]["merge_seconds"] < tiers["cpu"]["merge_seconds"] < tiers["disk"]["merge_seconds"]

    code, plan = _plan(space, capsys, "--device-memory", "80GB", "--host-memory", "1TB")
    assert code == 0 and plan["choice"] == "device" and plan["tiers"]["device"]["fits"]


def test_plan_refuses_when_nothing_fits(space: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", str(space), "--no-probe", "--device-memory", "12GB", "--host-memory", "200GB"])
    captured = capsys.readouterr()
    assert code == 2
    assert "nothing fits" in captured.err and "12.00 GB" in captured.err
    # the text form names every tier and what it needs
    assert "cpu" in captured.out and "disk" in captured.out and "resident: auto -> nothing fits" in captured.out


def test_lora_store_is_factored_in_the_plan(tmp_path: Path) -> None:
    """Three rank-16 adapters of a 7B model: the store holds N * r * (d_in + d_out) factors, not N models."""
    base = tmp_path / "base"
    write_stand_in(base, shards=1)
    header: dict = {}
    offset, factor_elems = 0, 0
    for layer in range(32):
        for proj, (d_out, d_in) in {"q_proj": (4096, 4096), "v_proj": (1024, 4096)}.items():
            for part, shape in (("lora_A", (16, d_in)), ("lora_B", (d_out, 16))):
                n = math.prod(shape)
                name = f"base_model.model.model.layers.{layer}.self_attn.{proj}.{part}.weight"
                header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + 4 * n]}
                offset += 4 * n
                factor_elems += n
    models = {}
    for key in ("a", "b", "c"):
        folder = tmp_path / key
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": "mistralai/Mistral-7B-v0.1"}))
        raw = json.dumps(header).encode()
        (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
        models[key] = str(folder)
    plan = plan_resident(base, models, device="cuda", dtype="bfloat16", device_memory=40 * 10**9,
                         host_memory=64 * 10**9, eval_batch=16)
    assert [m.kind for m in plan.models] == ["lora"] * 3
    assert all(m.factor_bytes == factor_elems * 4 for m in plan.models)
    store = plan.live_model_bytes + 3 * factor_elems * 4
    assert plan.tiers["cpu"].host_bytes == store  # the base and 3 x 109 MB of factors, not 4 models
    assert plan.tiers["device"].device_bytes == plan.live_model_bytes + store + plan.eval_bytes
    assert plan.choice == "device"  # the whole pool fits one 40 GB card (full fine-tunes would need 77 GB)
    small = plan_resident(base, models, device="cuda", dtype="bfloat16", device_memory=24 * 10**9,
                          host_memory=64 * 10**9, eval_batch=16)
    assert small.choice == "cpu"  # a second copy of the base does not fit 24 GB: it streams from host memory
