"""ShardedWriter, parse_size and copy_model_files: sharded round trips that transformers reloads exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from helpers.tiny_models import save_tiny
from safetensors import safe_open

from evomerge.errors import ConfigError, ModelError
from evomerge.models.folder import INDEX_NAME, ModelFolder
from evomerge.models.writer import ShardedWriter, copy_model_files, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2_000_000_000), ("500MB", 500_000_000), ("1.5GB", 1_500_000_000), ("1GiB", 2**30),
        ("64KiB", 65536), ("10kb", 10_000), ("123", 123), (" 7 MB ", 7_000_000), ("3G", 3_000_000_000),
        (4096, 4096), (1e6, 1_000_000),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "2 parsecs", "-1MB", "0", 0, True, None, [1]])
def test_parse_size_refuses(bad: object) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(bad)  # type: ignore[arg-type]


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(10, 10, generator=g) for i in range(7)}  # 400 bytes each


def test_sharding_follows_the_size_limit(tmp_path: Path) -> None:
    tensors = _tensors()
    out = tmp_path / "out"
    w = ShardedWriter(out, max_shard_size=1000, metadata={"merged_by": "evomerge", "recipe_hash": "abc"})
    for i, (name, t) in enumerate(tensors.items()):
        w.add(name, t)
        # a shard is written as soon as the next tensor would overflow it: after t2, t4, t6
        assert len([p for p in out.iterdir() if p.name.endswith(".tmp")]) == i // 2
    summary = w.finish()
    assert summary.num_tensors == 7 and summary.total_bytes == 7 * 400
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([INDEX_NAME] + [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)])
    assert summary.files == [out / f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": 2800, "merged_by": "evomerge", "recipe_hash": "abc"}
    # two tensors (800 bytes) per shard, the last one alone
    assert index["weight_map"] == {
        "t0": "model-00001-of-00004.safetensors", "t1": "model-00001-of-00004.safetensors",
        "t2": "model-00002-of-00004.safetensors", "t3": "model-00002-of-00004.safetensors",
        "t4": "model-00003-of-00004.safetensors", "t5": "model-00003-of-00004.safetensors",
        "t6": "model-00004-of-00004.safetensors",
    }
    assert summary.weight_map == index["weight_map"] and summary.index == out / INDEX_NAME
    with safe_open(str(summary.files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt", "merged_by": "evomerge", "recipe_hash": "abc"}
    with _as_model(out) as folder:
        for name, t in tensors.items():
            assert torch.equal(folder.get(name), t)


def _as_model(out: Path) -> ModelFolder:
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    return ModelFolder.open(out)


def test_single_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with ShardedWriter(out, "1MB", {}) as w:
        w.add_all(_tensors(1))
        summary = w.finish()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert summary.num_shards == 1 and summary.index is None
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(_tensors(1))


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path / "o", 500, {})
    w.add("small", torch.zeros(10))  # 40 bytes
    w.add("big", torch.zeros(1000))  # 4000 bytes > limit
    w.add("small2", torch.zeros(10))
    s = w.finish()
    assert s.weight_map == {"small": "model-00001-of-00003.safetensors", "big": "model-00002-of-00003.safetensors",
                            "small2": "model-00003-of-00003.safetensors"}


def test_views_noncontiguous_and_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    w = ShardedWriter(tmp_path / "o", "1MB", {})
    w.add("a", base[:2])  # views of one storage: save_file would refuse them as shared
    w.add("b", base[2:])
    w.add("c", base.t())  # non-contiguous
    w.add("d", base)
    w.finish()
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("a"), base[:2]) and torch.equal(f.get_tensor("b"), base[2:])
        assert torch.equal(f.get_tensor("c"), base.t()) and torch.equal(f.get_tensor("d"), base)


def test_bad_input_and_abort_leave_no_temporary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metadata must map strings to strings; got 'step': 3"):
        ShardedWriter(tmp_path / "o", "1MB", {"step": 3})  # type: ignore[dict-item]
    out = tmp_path / "o2"
    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(out, 500, {}) as w:
        for name, t in _tensors().items():
            w.add(name, t)
        assert any(p.name.endswith(".tmp") for p in out.iterdir())  # shards written as it goes
        raise RuntimeError("boom")
    assert list(out.iterdir()) == []
    w = ShardedWriter(tmp_path / "o3", 500, {})
    w.add("x", torch.zeros(3))
    with pytest.raises(ModelError, match=r"tensor 'x' added twice"):
        w.add("x", torch.zeros(3))
    with pytest.raises(ModelError, match=r"tensor 'y': expected a torch\.Tensor"):
        w.add("y", [1, 2])  # type: ignore[arg-type]
    w.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        w.add("z", torch.zeros(1))


@pytest.mark.parametrize("planned", [False, True], ids=["buffered", "planned"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "gpt_neox"])
def test_round_trip_reloads_with_transformers(tmp_path: Path, family: str, planned: bool) -> None:
    """Folder -> ShardedWriter (forced sharding) + copy_model_files -> from_pretrained: identical tensors."""
    src = tmp_path / "src"
    model = save_tiny(family, src, seed=5, dtype=torch.bfloat16, max_shard_size="10KB")
    out = tmp_path / "out"
    with ModelFolder.open(src) as folder:
        layout = [(n, folder.shape(n), folder.dtype(n)) for n in folder.tensor_names] if planned else None
        writer = ShardedWriter(out, "6KB", {"source": str(src)}, layout=layout, max_in_flight=2000)
        # the planned writer takes tensors in any order
        for name in (reversed(folder.tensor_names) if planned else folder.tensor_names):
            writer.add(name, folder.get(name))
        summary = writer.finish()
    assert summary.num_shards > 1 and (out / INDEX_NAME).exists()
    copied = copy_model_files(src, out)
    assert copied == ["config.json", "generation_config.json"]
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    want, got = model.state_dict(), reloaded.state_dict()
    assert set(want) == set(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    if family in ("gpt2", "gemma"):  # tied: the head is still the embedding after reload
        assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_copy_model_files_copies_tokenizer_not_weights_or_code(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_tiny("llama", src)
    files = {
        "tokenizer.json": "{}", "tokenizer_config.json": '{"model_max_length": 8}', "special_tokens_map.json": "{}",
        "vocab.json": "{}", "merges.txt": "#v\n", "tokenizer.model": "spm", "chat_template.jinja": "{{x}}",
        "modeling_x.py": "raise SystemExit", "tokenization_x.py": "x", "pytorch_model.bin": "p", "extra.safetensors": "s",
        "README.md": "hi",
    }
    for name, text in files.items():
        (src / name).write_text(text)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "dst"
    copied = copy_model_files(src, dst, config_updates={"dtype": "bfloat16"})
    assert sorted(copied) == sorted([
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
    ])
    assert sorted(p.name for p in dst.iterdir()) == sorted(copied)
    for name in copied:
        if name != "config.json":
            assert (dst / name).read_bytes() == (src / name).read_bytes()
    out_cfg = json.loads((dst / "config.json").read_text())
    assert "auto_map" not in out_cfg and out_cfg["dtype"] == "bfloat16"
    assert out_cfg["hidden_size"] == 16 and out_cfg["model_type"] == "llama"
    only_tok = copy_model_files(src, tmp_path / "tok", include_config=False)
    assert "config.json" not in only_tok and "tokenizer.json" in only_tok


def test_copy_model_files_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model folder .*missing does not exist"):
        copy_model_files(tmp_path / "missing", tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no config\.json"):
        copy_model_files(tmp_path / "empty", tmp_path / "d")


def test_written_files_get_ordinary_permissions(tmp_path: Path) -> None:
    """Temporary-file helpers create 0600 files; outputs must be readable like any saved model."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    src = tmp_path / "src"
    save_tiny("llama", src)
    out = tmp_path / "out"
    w = ShardedWriter(out, "5KB", {})
    with ModelFolder.open(src) as folder:
        for name in folder.tensor_names:
            w.add(name, folder.get(name))
    w.finish()
    copy_model_files(src, out)
    files = list(out.iterdir())
    assert len(files) > 4
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: want for p in files}


def test_planned_layout_matches_buffered_shards_and_reads_back(tmp_path: Path) -> None:
    tensors = {**_tensors(2), "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(3, dtype=torch.int64), "half": torch.ones(3, 3, dtype=torch.bfloat16)}
    layout = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    planned = ShardedWriter(tmp_path / "p", 1000, {"k": "v"}, layout=layout)
    for name in sorted(tensors, reverse=True):
        planned.add(name, tensors[name])
    sp = planned.finish()
    buffered = ShardedWriter(tmp_path / "b", 1000, {"k": "v"})
    buffered.add_all(tensors)
    sb = buffered.finish()
    assert sp.weight_map == sb.weight_map and sp.total_bytes == sb.total_bytes == 7 * 400 + 2 + 0 + 8 + 18
    assert json.loads((tmp_path / "p" / INDEX_NAME).read_text()) == json.loads((tmp_path / "b" / INDEX_NAME).read_text())
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.endswith(".tmp")]
    for f in sp.files:
        with safe_open(str(f), "pt") as h:  # safetensors' own reader validates the header we wrote
            assert h.metadata() == {"format": "pt", "k": "v"}
            names = h.keys()  # a safe_open handle is not iterable
            for name in names:
                got = h.get_tensor(name)
                assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name])


def test_planned_layout_refuses_what_it_did_not_plan(tmp_path: Path) -> None:
    layout = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    with pytest.raises(ModelError, match=r"layout lists tensor 'a' twice"):
        ShardedWriter(tmp_path / "x", "1MB", {}, layout=[*layout, ("a", (1,), torch.float32)])
    w = ShardedWriter(tmp_path / "o", "1MB", {}, layout=layout)
    with pytest.raises(ModelError, match=r"tensor 'c' is not in the planned layout"):
        w.add("c", torch.zeros(1))
    with pytest.raises(ModelError, match=r"tensor 'a': got shape \(3, 2\) torch.float32, the planned layout says \(2, 3\) torch.float32"):
        w.add("a", torch.zeros(3, 2))
    with pytest.raises(ModelError, match=r"tensor 'b': got shape \(4,\) torch.float32, .* \(4,\) torch.bfloat16"):
        w.add("b", torch.zeros(4))
    w.add("a", torch.zeros(2, 3))
    with pytest.raises(ModelError, match=r"1 planned tensor\(s\) were never added, e.g. 'b'"):
        w.finish()
    assert list((tmp_path / "o").iterdir()) == []  # temporary shards removed
