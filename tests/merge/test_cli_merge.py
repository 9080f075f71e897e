"""`evomerge merge`: both recipe forms, the summary line, and every bad input's clear error with no output left."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers.tiny_models import build_llamas, load_state

from evomerge.cli import main


@pytest.fixture(scope="module")
def llamas(tiny_llamas: list[Path]) -> list[Path]:
    """The session's base and first two fine-tunes (read only)."""
    return tiny_llamas[:3]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _ties(llamas: list[Path], **over: object) -> dict:
    data = {"method": "ties", "base_model": str(llamas[0]),
            "models": [{"model": str(llamas[1]), "parameters": {"density": 0.5}},
                       {"model": str(llamas[2]), "parameters": {"density": [0.2, 0.8]}}]}
    data.update(over)
    return data


def test_evomerge_and_mergekit_forms_give_the_same_model(tmp_path: Path, llamas: list[Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # relative paths in a recipe are relative to the recipe file's folder
    root = llamas[0].parent
    rel = {"method": "ties", "base_model": "base",
           "models": [{"model": "m1", "parameters": {"density": 0.5}},
                      {"model": "m2", "parameters": {"density": [0.2, 0.8]}}]}
    ev = _write(root / "recipe_rel.yaml", rel)
    assert main(["merge", str(ev), str(tmp_path / "ev"), "--no-progress", "--write-mergekit-yaml"]) == 0
    line = capsys.readouterr().out
    assert "merged" in line and "tensors" in line and "peak RSS" in line and "evomerge recipe" in line
    mk_file = tmp_path / "ev" / "mergekit_config.yml"
    mk = yaml.safe_load(mk_file.read_text())
    assert mk["merge_method"] == "ties" and mk["base_model"] == str(llamas[0].resolve())
    assert main(["merge", str(mk_file), str(tmp_path / "mk"), "--no-progress"]) == 0
    assert "mergekit recipe" in capsys.readouterr().out
    a, b = load_state(tmp_path / "ev"), load_state(tmp_path / "mk")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_dtype_seed_and_overwrite(tmp_path: Path, llamas: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    r = _write(tmp_path / "r.yaml", {"method": "dare_linear", "base_model": str(llamas[0]),
                                     "models": [str(llamas[1]), str(llamas[2])], "seed": 1})
    out = tmp_path / "o"
    assert main(["merge", str(r), str(out), "--dtype", "bfloat16", "--seed", "9", "--no-progress"]) == 0
    first = load_state(out)
    assert all(t.dtype == torch.bfloat16 for t in first.values())
    assert main(["merge", str(r), str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(r), str(out), "--dtype", "bfloat16", "--seed", "9", "--overwrite",
                 "--no-progress"]) == 0
    again = load_state(out)
    assert all(torch.equal(first[n], again[n]) for n in first)


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return dst


BAD = {
    "unknown method": (lambda ll, tmp: _ties(ll, method="frobnicate"), "unknown merge method 'frobnicate'"),
    "density 1.5": (lambda ll, tmp: _ties(ll, models=[{"model": str(ll[1]), "parameters": {"density": 1.5}}]),
                    "density = 1.5"),
    "density list": (lambda ll, tmp: _ties(ll, parameters={"density": [0.5, -0.1]}), "density = -0.1"),
    "missing model": (lambda ll, tmp: _ties(ll, models=[{"model": str(tmp / "nowhere")}]), "nowhere does not exist"),
    "missing base": (lambda ll, tmp: _ties(ll, base_model=None), "needs a base model"),
    "incompatible": (lambda ll, tmp: _ties(ll, models=[{"model": str(build_llamas(tmp / "x", 1, layers=2)[1])}]),
                     "layers"),
    "vocab": (lambda ll, tmp: _ties(ll, models=[{"model": str(build_llamas(tmp / "v", 1, vocab=80)[1])}]),
              "vocab"),
    "corrupt": (lambda ll, tmp: _ties(ll, models=[{"model": str(_corrupt_copy(ll[1], tmp / "bad"))}]),
                "corrupt safetensors"),
    "unknown key": (lambda ll, tmp: _ties(ll, wat=1), "unknown keys"),
    "mergekit unknown method": (lambda ll, tmp: {"merge_method": "della_ties", "base_model": str(ll[0]),
                                                 "models": [{"model": str(ll[1])}]}, "no evomerge equivalent"),
    "mergekit unknown parameter": (lambda ll, tmp: {"merge_method": "sce", "base_model": str(ll[0]),
                                                    "models": [{"model": str(ll[1])}, {"model": str(ll[2])}],
                                                    "parameters": {"topk": 0.5}},
                                   "parameters.topk: unknown parameter for method sce"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exit_2_and_no_output(case: str, tmp_path: Path, llamas: list[Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    make, message = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    recipe = _write(tmp_path / "r.yaml", make(llamas, tmp_path))
    outroot = tmp_path / "outroot"
    outroot.mkdir()
    capsys.readouterr()  # drop the model builders' progress bars
    assert main(["merge", str(recipe), str(outroot / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evomerge: error:") and message in err, err
    assert "Traceback" not in err
    assert list(outroot.iterdir()) == []


def test_vocab_slice_policy_is_opt_in(tmp_path: Path, llamas: list[Path]) -> None:
    big = build_llamas(tmp_path / "v", 1, vocab=80)[1]
    r = _write(tmp_path / "r.yaml", _ties(llamas, models=[{"model": str(big), "parameters": {"density": 1.0}}]))
    assert main(["merge", str(r), str(tmp_path / "o"), "--vocab-policy", "slice_to_base", "--no-progress"]) == 0
    out = load_state(tmp_path / "o")
    assert out["model.embed_tokens.weight"].shape[0] == 64


def test_bad_device_is_refused(tmp_path: Path, llamas: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    r = _write(tmp_path / "r.yaml", _ties(llamas))
    assert main(["merge", str(r), str(tmp_path / "o"), "--device", "tpu", "--no-progress"]) == 2
    assert "--device 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_write_mergekit_yaml_refused_before_merging(tmp_path: Path, llamas: list[Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    r = _write(tmp_path / "r.yaml", _ties(llamas, options={"trim_scope": "global"}))
    assert main(["merge", str(r), str(tmp_path / "o"), "--write-mergekit-yaml", "--no-progress"]) == 2
    assert "trim_scope" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_memory_budget_changes_memory_not_the_model(tmp_path: Path, llamas: list[Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    r = _write(tmp_path / "r.yaml", _ties(llamas))
    assert main(["merge", str(r), str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["merge", str(r), str(tmp_path / "b"), "--no-progress", "--memory-budget", "64KB"]) == 0
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    capsys.readouterr()
    assert main(["merge", str(r), str(tmp_path / "c"), "--no-progress", "--memory-budget", "lots"]) == 2
    assert "size" in capsys.readouterr().err and not (tmp_path / "c").exists()
