"""Calibration rows: interleaved unions for merged models, calibration files (short and long form), hashes,
and the provider that gives a worker's rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.calibration.rows import CalibrationSet, interleave_rows
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.method_data import MethodDataProvider, calibration_file_data, calibration_from_file


class CharTokenizer:
    """One token per character (enough to count tokens)."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def __len__(self) -> int:
        return 256


def _rows(tag: str, n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{tag}{i}=", "answer": str(i)} for i in range(n)]


def test_interleave_rows_round_robin_and_longer_sources_continue() -> None:
    a, b = _rows("a", 3), _rows("b", 1)
    assert interleave_rows([a, b]) == [a[0], b[0], a[1], a[2]]
    assert interleave_rows([]) == []


def test_add_union_covers_every_source_within_the_first_tokens() -> None:
    calib = CalibrationSet({"add": _rows("a", 50), "rev": _rows("r", 50)}, CharTokenizer(), seq_len=8)
    calib.add_union("g1.1", ["add", "rev"])
    first = calib.rows_for("g1.1")[:4]
    assert [r["prompt"] for r in first] == ["a0=", "r0=", "a1=", "r1="]
    # the first 24 tokens already hold rows of both tasks
    text = "".join(chr(t) for t in calib.token_batches("g1.1", 24)[0].flatten().tolist())
    assert "a0=" in text and "r0=" in text
    with pytest.raises(ConfigError, match="no calibration data for model 'nope'"):
        calib.add_union("g1.2", ["nope"])
    with pytest.raises(ConfigError, match="no calibration sources"):
        calib.add_union("g1.3", [])


def test_content_hash_of_some_keys_ignores_other_models() -> None:
    calib = CalibrationSet({"add": _rows("a", 3), "rev": _rows("r", 3)}, CharTokenizer())
    before_all, before_add = calib.content_hash(), calib.content_hash(["add"])
    calib.add_union("g1.1", ["add", "rev"])
    assert calib.content_hash(["add"]) == before_add  # cached Grams of 'add' stay valid
    assert calib.content_hash() != before_all


def _jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_calibration_file_lists_and_long_form(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", _rows("a", 3))
    r = _jsonl(tmp_path / "r.jsonl", _rows("r", 2))
    short = tmp_path / "short.yaml"
    short.write_text(f"add: a.jsonl\nmix: [a.jsonl, {r}]\n", encoding="utf-8")
    calib = calibration_from_file(short, CharTokenizer())
    assert [x["prompt"] for x in calib.rows_for("mix")] == ["a0=", "r0=", "a1=", "r1=", "a2="]
    assert calib.terminator == "\n" and calib.seq_len == 64

    long = tmp_path / "long.yaml"
    long.write_text(f"terminator: ';'\nseq_len: 16\nlimit: 1\nmodels:\n  mix: [{a}, {r}]\n", encoding="utf-8")
    calib = calibration_from_file(long, CharTokenizer())
    assert [x["prompt"] for x in calib.rows_for("mix")] == ["a0=", "r0="]  # limit applies per file
    assert (calib.terminator, calib.seq_len) == (";", 16)

    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {mix: []}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="model 'mix': expected a jsonl file or a list"):
        calibration_from_file(bad, CharTokenizer())
    bad.write_text("models: {mix: a.jsonl}\ncolour: red\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]"):
        calibration_from_file(bad, CharTokenizer())


def test_calibration_file_data_reproduces_the_workers_rows(tmp_path: Path) -> None:
    from evomerge.fitness.spec import FitnessSpec

    a = _jsonl(tmp_path / "a.jsonl", _rows("a", 5))
    r = _jsonl(tmp_path / "r.jsonl", _rows("r", 5))
    spec = FitnessSpec.model_validate({"terminator": ";", "tasks": [
        {"name": "add", "metric": "token_acc", "jsonl": {"search": str(a), "test": str(a)}},
        {"name": "rev", "metric": "token_acc", "jsonl": {"search": str(r), "test": str(r)}}]})
    recipe = Recipe("qp", (ModelEntry("g1.1"),), base_model="base")
    worker = MethodDataProvider(spec, tmp_path, tokenizer=CharTokenizer()).calibration(recipe, {"g1.1": ["rev", "add"]})
    import yaml

    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump(calibration_file_data(spec, {"g1.1": ["rev", "add"]})), encoding="utf-8")
    from_file = calibration_from_file(path, CharTokenizer())
    assert from_file.rows_for("g1.1") == worker.rows_for("g1.1")
    assert [t.tolist() for t in from_file.token_batches("g1.1", 40)] == [
        t.tolist() for t in worker.token_batches("g1.1", 40)]
    with pytest.raises(ConfigError, match="task\\(s\\) \\['sort'\\] are not jsonl tasks"):
        calibration_file_data(spec, {"g1.1": ["sort"]})
