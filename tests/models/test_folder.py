"""ModelFolder: lazy reads equal the saved tensors; every bad folder gives a ModelError naming the file."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import FAMILIES, save_tiny
from safetensors.torch import load_file, save_file

from evomerge.errors import ModelError
from evomerge.models.folder import INDEX_NAME, ModelFolder

# transformers 5 keeps GPT-NeoX's historical file name for the head
_FILE_NAME = {"gpt_neox": {"lm_head.weight": "embed_out.weight"}}
_TIED = {"gemma", "gemma2", "gpt2", "falcon", "bloom"}


def _expected(family: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    rename = _FILE_NAME.get(family, {})
    out = {rename.get(k, k): v for k, v in sd.items()}
    if family in _TIED:
        del out["lm_head.weight"]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_names_shapes_dtypes_and_values(tiny_models, family: str) -> None:
    path, model = tiny_models[family]
    expected = _expected(family, model)
    oracle = load_file(str(path / "model.safetensors"))
    with ModelFolder.open(path) as folder:
        assert set(folder.tensor_names) == set(expected) == set(oracle)
        assert folder.num_parameters == model.num_parameters() == sum(t.numel() for t in oracle.values())
        assert folder.config["model_type"] == model.config.model_type
        assert folder.tied_embeddings is (family in _TIED)
        for name, ref in expected.items():
            assert folder.has(name) and name in folder
            assert folder.shape(name) == tuple(ref.shape)
            assert folder.dtype(name) == ref.dtype == torch.float32
            got = folder.get(name)
            assert torch.equal(got, ref) and torch.equal(got, oracle[name])
        assert not folder.has("no.such.tensor")
        with pytest.raises(ModelError, match=r"no tensor 'no\.such\.tensor'"):
            folder.get("no.such.tensor")


@pytest.mark.parametrize("family", ["gemma", "gpt2"])
def test_tied_head_left_out_is_served_from_embedding(tiny_models, family: str) -> None:
    path, model = tiny_models[family]
    embed = {"gemma": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}[family]
    with ModelFolder.open(path) as folder:
        assert not folder.has("lm_head.weight")
        assert folder.tied_aliases == {"lm_head.weight": embed}
        assert folder.resolve("lm_head.weight") == embed
        assert folder.shape("lm_head.weight") == (64, 16)
        assert torch.equal(folder.get("lm_head.weight"), model.lm_head.weight.detach())


def test_untied_head_has_no_alias(tiny_models) -> None:
    with ModelFolder.open(tiny_models["llama"][0]) as folder:
        assert folder.tied_embeddings is False
        assert folder.tied_aliases == {}
        assert folder.has("lm_head.weight")


def test_sharded_folder_reads_every_shard(tmp_path: Path) -> None:
    model = save_tiny("llama", tmp_path / "m", seed=3, max_shard_size="8KB")
    index = json.loads((tmp_path / "m" / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    with ModelFolder.open(tmp_path / "m") as folder:
        sd = model.state_dict()
        assert set(folder.tensor_names) == set(sd)
        for name in folder.tensor_names:
            assert folder.info(name).file.name == index["weight_map"][name]
            assert torch.equal(folder.get(name), sd[name])
        # file order: grouped by shard, increasing offsets inside each
        keys = [(str(folder.info(n).file), folder.info(n).start) for n in folder.tensor_names]
        assert keys == sorted(keys)


def test_get_converts_dtype_and_reads_row_prefix(tmp_path: Path) -> None:
    model = save_tiny("llama", tmp_path / "m", seed=1, dtype=torch.bfloat16)
    sd = model.state_dict()
    with ModelFolder.open(tmp_path / "m") as folder:
        name = "model.embed_tokens.weight"
        assert folder.dtype(name) == torch.bfloat16
        raw = folder.get(name)
        assert raw.dtype == torch.bfloat16 and torch.equal(raw, sd[name])
        f32 = folder.get(name, dtype=torch.float32)
        assert f32.dtype == torch.float32 and torch.equal(f32, sd[name].float())
        head = folder.get(name, rows=10)
        assert head.shape == (10, 16) and torch.equal(head, sd[name][:10])
        assert torch.equal(folder.get(name, rows=1000), sd[name])
        norm = "model.norm.weight"
        assert torch.equal(folder.get(norm, rows=3), sd[norm][:3])


def test_reads_are_independent_and_thread_safe(tmp_path: Path) -> None:
    model = save_tiny("qwen2", tmp_path / "m", seed=2, max_shard_size="8KB")
    sd = model.state_dict()
    with ModelFolder.open(tmp_path / "m") as folder:
        a = folder.get("model.norm.weight")
        a.add_(1.0)  # the caller owns what get returns: the file and later reads are untouched
        assert torch.equal(folder.get("model.norm.weight"), sd["model.norm.weight"])
        errors: list[str] = []

        def worker(offset: int) -> None:
            names = list(folder.tensor_names)
            for _ in range(5):
                for name in names[offset::3]:
                    if not torch.equal(folder.get(name), sd[name]):
                        errors.append(name)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def test_other_dtypes_and_empty_tensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "b": torch.tensor([True, False, True]),
        "c": torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).to(torch.float16),
        "d": torch.zeros(0, 3),
        "e": torch.tensor(2.5),
    }
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with ModelFolder.open(tmp_path / "m") as folder:
        for name, ref in tensors.items():
            got = folder.get(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref)
        assert folder.num_parameters == 6 + 3 + 20 + 0 + 1


def test_close_releases_descriptors(tiny_models) -> None:
    folder = ModelFolder.open(tiny_models["llama"][0])
    fds = [s.fd for s in folder._shards]
    folder.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(ModelError, match="closed"):
        folder.get("model.norm.weight")


# --------------------------------------------------------------------------- bad folders
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_folder_and_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model folder .*nope does not exist"):
        ModelFolder.open(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match=r"is not a folder"):
        ModelFolder.open(tmp_path / "file")


def test_missing_or_invalid_config(tiny_models, tmp_path: Path) -> None:
    m = _copy(tiny_models["llama"][0], tmp_path / "m")
    (m / "config.json").unlink()
    with pytest.raises(ModelError, match=r"model config .*m/config\.json is missing"):
        ModelFolder.open(m)
    (m / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json is not valid JSON"):
        ModelFolder.open(m)
    (m / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"is not a JSON object"):
        ModelFolder.open(m)


def test_pickled_weights_only_explains_conversion(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    # never unpickled: the content is irrelevant, the refusal is by file type
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelError) as err:
        ModelFolder.open(m)
    msg = str(err.value)
    assert str(m) in msg and "pytorch_model.bin" in msg
    assert "save_pretrained" in msg and "safe_serialization=True" in msg and "trusted" in msg


def test_no_weights_at_all(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"has no safetensors weights"):
        ModelFolder.open(m)


def test_truncated_file_is_refused_with_its_name(tiny_models, tmp_path: Path) -> None:
    m = _copy(tiny_models["llama"][0], tmp_path / "m")
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(ModelError, match=r"corrupt safetensors file .*m/model\.safetensors: .*truncated"):
        ModelFolder.open(m)
    f.write_bytes(data[:5])
    with pytest.raises(ModelError, match=r"corrupt safetensors file .*too short"):
        ModelFolder.open(m)


def test_garbled_header_is_refused(tiny_models, tmp_path: Path) -> None:
    m = _copy(tiny_models["llama"][0], tmp_path / "m")
    f = m / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:30] = b"\xff" * 20
    f.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"corrupt safetensors file .*model\.safetensors: header is not valid JSON"):
        ModelFolder.open(m)
    good = tiny_models["llama"][0].joinpath("model.safetensors").read_bytes()
    f.write_bytes(struct.pack("<Q", 10**12) + good[8:])
    with pytest.raises(ModelError, match=r"header length 1000000000000 does not fit"):
        ModelFolder.open(m)


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_inconsistent_header_entries_are_refused(tiny_models, tmp_path: Path) -> None:
    m = _copy(tiny_models["llama"][0], tmp_path / "m")
    f = m / "model.safetensors"
    original = f.read_bytes()
    _rewrite_header(f, lambda h: h["model.norm.weight"].update(shape=[17]))
    with pytest.raises(ModelError, match=r"tensor 'model\.norm\.weight': 64 bytes for shape \(17,\) F32 \(expected 68\)"):
        ModelFolder.open(m)
    f.write_bytes(original)
    _rewrite_header(f, lambda h: h["model.norm.weight"].update(dtype="Q7"))
    with pytest.raises(ModelError, match=r"tensor 'model\.norm\.weight': unsupported dtype 'Q7'"):
        ModelFolder.open(m)


def test_index_pointing_at_missing_shard(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m", max_shard_size="8KB")
    index = json.loads((tmp_path / "m" / INDEX_NAME).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "m" / victim).unlink()
    with pytest.raises(ModelError) as err:
        ModelFolder.open(tmp_path / "m")
    msg = str(err.value)
    assert f"shard {victim} listed in {INDEX_NAME} is missing" in msg and str(tmp_path / "m") in msg


def test_index_listing_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "m", max_shard_size="8KB")
    ipath = tmp_path / "m" / INDEX_NAME
    index = json.loads(ipath.read_text())
    index["weight_map"]["model.ghost.weight"] = sorted(set(index["weight_map"].values()))[0]
    ipath.write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"puts tensor 'model\.ghost\.weight' in model-00001-of-\d+\.safetensors, which does not contain it"):
        ModelFolder.open(tmp_path / "m")
    index["weight_map"] = {"x": "../outside.safetensors"}
    ipath.write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"points outside the folder"):
        ModelFolder.open(tmp_path / "m")
    ipath.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ModelError, match=r"has no valid 'weight_map'"):
        ModelFolder.open(tmp_path / "m")


def test_opening_never_executes_folder_code(tiny_models, tmp_path: Path) -> None:
    m = _copy(tiny_models["llama"][0], tmp_path / "m")
    marker = tmp_path / "pwned"
    (m / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (m / "config.json").write_text(json.dumps(cfg))
    with ModelFolder.open(m) as folder:
        for name in folder.tensor_names:
            folder.get(name)
    assert not marker.exists()


def test_hub_cache_layout_with_symlinked_shards(tmp_path: Path) -> None:
    """Hugging Face cache snapshots are folders of symlinks into a blobs folder."""
    model = save_tiny("llama", tmp_path / "saved", seed=6, max_shard_size="8KB")
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted((tmp_path / "saved").iterdir())):
        blob = blobs / f"blob{i}"
        f.rename(blob)
        (snap / f.name).symlink_to(blob)
    with ModelFolder.open(snap) as folder:
        sd = model.state_dict()
        assert set(folder.tensor_names) == set(sd)
        assert all(torch.equal(folder.get(n), sd[n]) for n in folder.tensor_names)


def test_shards_without_index(tmp_path: Path) -> None:
    model = save_tiny("llama", tmp_path / "m", seed=7, max_shard_size="8KB")
    (tmp_path / "m" / INDEX_NAME).unlink()
    with ModelFolder.open(tmp_path / "m") as folder:
        assert set(folder.tensor_names) == set(model.state_dict())
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(ModelError, match=rf"has no {INDEX_NAME} and an incomplete set of shards"):
        ModelFolder.open(tmp_path / "m")


def test_non_hf_safetensors_names_are_refused(tiny_models, tmp_path: Path) -> None:
    m = _copy(tiny_models["llama"][0], tmp_path / "m")
    (m / "model.safetensors").rename(m / "consolidated.safetensors")
    with pytest.raises(ModelError, match=r"safetensors files \(consolidated\.safetensors\) but not in the Hugging Face layout"):
        ModelFolder.open(m)


def test_pickles_as_its_path(tiny_models) -> None:
    import pickle

    with ModelFolder.open(tiny_models["gpt2"][0]) as folder:
        clone = pickle.loads(pickle.dumps(folder))
        assert clone.path == folder.path and clone.tensor_names == folder.tensor_names
        assert torch.equal(clone.get("lm_head.weight"), folder.get("transformer.wte.weight"))
        clone.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_get_onto_cuda_with_conversion(tiny_models) -> None:
    path, model = tiny_models["llama"]
    with ModelFolder.open(path) as folder:
        got = folder.get("model.embed_tokens.weight", device="cuda", dtype=torch.bfloat16)
        assert got.device.type == "cuda" and got.dtype == torch.bfloat16
        assert torch.equal(got.cpu(), model.model.embed_tokens.weight.detach().to(torch.bfloat16))


def test_get_into_reused_buffers(tmp_path: Path) -> None:
    model = save_tiny("llama", tmp_path / "m", seed=8, dtype=torch.bfloat16)
    sd = model.state_dict()
    name = "model.layers.1.mlp.up_proj.weight"
    with ModelFolder.open(tmp_path / "m") as folder:
        same = torch.full((32, 16), 7.0, dtype=torch.bfloat16)
        assert folder.get(name, out=same) is same and torch.equal(same, sd[name])
        wider = torch.zeros(32, 16, dtype=torch.float32)  # converted while copying
        assert folder.get(name, out=wider) is wider and torch.equal(wider, sd[name].float())
        strided = torch.zeros(16, 32, dtype=torch.bfloat16).t()  # non-contiguous target
        folder.get(name, out=strided)
        assert torch.equal(strided, sd[name])
        rows = torch.zeros(5, 16, dtype=torch.bfloat16)
        folder.get("lm_head.weight", rows=5, out=rows)
        assert torch.equal(rows, sd["lm_head.weight"][:5])
        with pytest.raises(ModelError, match=r"tensor 'lm_head\.weight' reads as shape \(64, 16\), but out has shape \(5, 16\)"):
            folder.get("lm_head.weight", out=rows)


@pytest.mark.parametrize("chunk", [6, 100, 1 << 20])
def test_converting_reads_go_chunk_by_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    import evomerge.models.folder as folder_mod

    monkeypatch.setattr(folder_mod, "_CHUNK_BYTES", chunk)
    monkeypatch.setattr(folder_mod._local, "buf", None, raising=False)
    model = save_tiny("llama", tmp_path / "m", seed=9, dtype=torch.bfloat16)
    sd = model.state_dict()
    with ModelFolder.open(tmp_path / "m") as folder:
        for name in folder.tensor_names:
            got = folder.get(name, dtype=torch.float32)
            assert got.dtype == torch.float32 and torch.equal(got, sd[name].float()), name
            part = folder.get(name, dtype=torch.float64, rows=3)
            assert torch.equal(part, sd[name][:3].double()), name


def test_tie_flag_from_config_or_files(tiny_models, tmp_path: Path) -> None:
    m = _copy(tiny_models["gemma"][0], tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    del cfg["tie_word_embeddings"]  # absent: inferred from the files (head left out, embedding stored)
    (m / "config.json").write_text(json.dumps(cfg))
    with ModelFolder.open(m) as folder:
        assert folder.tied_embeddings is True and folder.tied_aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    cfg["tie_word_embeddings"] = False  # explicitly untied: a missing head is really missing
    (m / "config.json").write_text(json.dumps(cfg))
    with ModelFolder.open(m) as folder:
        assert folder.tied_embeddings is False and folder.tied_aliases == {}
        with pytest.raises(ModelError, match=r"has no tensor 'lm_head\.weight'"):
            folder.get("lm_head.weight")
