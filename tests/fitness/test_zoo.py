from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.spec import FitnessSpec
from evomerge.paths import resolve_path
from evomerge.zoo.build import MODEL_NAMES, SPECIALISTS, ensure_zoo, merge_ties, zoo_key
from evomerge.zoo.skills import SKILLS, build_char_tokenizer, get_skill, skill_splits


def test_every_model_loads_with_plain_transformers(micro_zoo: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in MODEL_NAMES:
        model = AutoModelForCausalLM.from_pretrained(str(micro_zoo / name), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(micro_zoo / name), local_files_only=True)
        ids = tok("add 12+34=", add_special_tokens=False)["input_ids"]
        assert len(ids) == len("add 12+34=")  # one token per character
        assert tok.decode(ids) == "add 12+34="
        assert tok.pad_token_id is not None and tok.eos_token_id is not None
        out = model(input_ids=torch.tensor([ids])).logits
        assert out.shape == (1, len(ids), len(tok))
        assert (micro_zoo / name / "model.safetensors").is_file()


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


def _own_skill_scores(micro_zoo: Path, metric: str) -> dict[str, dict[str, float]]:
    spec = FitnessSpec.from_dict({"tasks": [
        {"name": s, "jsonl": str(micro_zoo / "data" / s / "test.jsonl"), "metric": metric} for s in SPECIALISTS]})
    ev = Evaluator(spec, micro_zoo / "base", splits=("test",))
    out = {}
    for name in MODEL_NAMES:
        res = ev.score(_load(micro_zoo / name), split="test")
        assert res.ok, res.error
        out[name] = res.task_values()
    return out


def test_each_specialist_beats_base_on_its_own_skill(micro_zoo: Path) -> None:
    scores = _own_skill_scores(micro_zoo, "token_acc")
    for skill in SPECIALISTS:
        assert scores[skill][skill] > scores["base"][skill] + 0.02, (skill, scores[skill], scores["base"])
    # the two unknown skills are learnt far beyond the base (mergeability finding: unknown skills are fragile)
    for skill in ("sort", "enc"):
        assert scores[skill][skill] > scores["base"][skill] + 0.2
    # the numbers match the table written at build time
    table = json.loads((micro_zoo / "zoo_table.json").read_text())
    assert table["token accuracy"]["base"]["add"] == pytest.approx(scores["base"]["add"], abs=1e-9)


def test_zoo_files_table_and_splits(micro_zoo: Path) -> None:
    text = (micro_zoo / "zoo_table.md").read_text()
    for row in ("base", "specialist add", "uniform average", "task arithmetic", "TIES"):
        assert row in text
    for skill in SPECIALISTS:
        search = [json.loads(x)["prompt"] for x in (micro_zoo / "data" / skill / "search.jsonl").open()]
        test = [json.loads(x)["prompt"] for x in (micro_zoo / "data" / skill / "test.jsonl").open()]
        assert len(search) == 64 and len(test) == 64
        assert not set(search) & set(test)
        for split in ("search", "test"):
            assert (micro_zoo / "tasks" / f"evozoo_{skill}_{split}.yaml").is_file()
    assert FitnessSpec.from_yaml(micro_zoo / "fitness.yaml").tasks[0].kind == "jsonl"
    assert FitnessSpec.from_yaml(micro_zoo / "fitness_lmeval.yaml").tasks[0].kind == "lm_eval_yaml"


def test_skill_data_is_deterministic_and_correct() -> None:
    a = skill_splits(get_skill("add"), 20, 20, seed=3, n_train=50)
    b = skill_splits(get_skill("add"), 20, 20, seed=3, n_train=50)
    assert a == b
    assert a != skill_splits(get_skill("add"), 20, 20, seed=4, n_train=50)
    evals = {r["prompt"] for r in a["search"] + a["test"]}
    assert not evals & {r["prompt"] for r in a["train"]}
    for row in a["search"]:
        x, y = row["prompt"][len("add "):-1].split("+")
        assert int(row["answer"]) == int(x) + int(y)
    row = skill_splits(get_skill("sort"), 1, 1, seed=0)["search"][0]
    assert row["answer"] == "".join(sorted(row["prompt"][len("sort "):-1]))
    row = skill_splits(get_skill("rev"), 1, 1, seed=0)["search"][0]
    assert row["answer"] == row["prompt"][len("rev "):-1][::-1]
    assert len({s.name for s in SKILLS}) == len(SKILLS) >= 4


def test_tokenizer_round_trips_every_character() -> None:
    tok = build_char_tokenizer()
    text = "sort zyx=xyz\nthe cat, 1+2=3."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_ensure_zoo_is_cached_and_resolve_path(micro_zoo: Path) -> None:
    t0 = time.perf_counter()
    assert ensure_zoo("micro", 0) == micro_zoo
    assert time.perf_counter() - t0 < 1.0
    assert resolve_path("zoo:micro/base") == micro_zoo / "base"
    assert resolve_path("zoo:micro@0/data/add") == micro_zoo / "data" / "add"
    assert resolve_path("some/dir") == Path("some/dir")
    assert zoo_key("micro", 0) != zoo_key("micro", 1) != zoo_key("demo", 0)
    with pytest.raises(ConfigError, match="unknown size 'huge'"):
        resolve_path("zoo:huge/base")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_path("zoo:micro/nope")
    assert not list(micro_zoo.parent.glob(".*.partial"))


def test_ties_matches_hand_worked_case() -> None:
    # methods.md: keep 3 of 5 per task -> tau_m = [0.5, -0.3, -0.7, 0.4, -0.8] (the registry's kernel)
    base = {"w": torch.zeros(5)}
    taus = [[0.5, -0.1, 0.3, 0, -0.8], [-0.4, 0.25, 0.1, 0.6, -0.2], [0.1, -0.3, -0.7, 0.2, 0.05]]
    models = [{"w": torch.tensor(t)} for t in taus]
    out = merge_ties(base, models, density=0.6, lam=1.0)["w"]
    assert torch.allclose(out, torch.tensor([0.5, -0.3, -0.7, 0.4, -0.8]))


def _nano(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import evomerge.zoo.build as zoo

    nano = dataclasses.replace(zoo.SIZES["micro"], hidden=16, intermediate=32, pretrain_steps=6, pretrain_batch=4,
                               finetune_steps=3, finetune_batch=4, n_search=8, n_test=8)
    monkeypatch.setitem(zoo.SIZES, "nano", nano)


def test_build_is_deterministic_for_a_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from evomerge.zoo.build import build_zoo

    _nano(monkeypatch)
    torch.set_num_threads(1)
    digests = []
    for name in ("a", "b"):
        build_zoo(tmp_path / name, size="nano", seed=5)
        digests.append({m: hashlib.sha256((tmp_path / name / m / "model.safetensors").read_bytes()).hexdigest()
                        for m in MODEL_NAMES})
    assert digests[0] == digests[1]
    assert len(set(digests[0].values())) == len(MODEL_NAMES)  # every specialist moved away from the base
    a = (tmp_path / "a" / "data" / "add" / "test.jsonl").read_text()
    assert a == (tmp_path / "b" / "data" / "add" / "test.jsonl").read_text()
    with pytest.raises(ConfigError, match="already exists"):
        build_zoo(tmp_path / "a", size="nano", seed=5)


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import evomerge.zoo.build as zoo

    _nano(monkeypatch)

    def boom(root: Path, *args: object) -> str:
        (root / "base").mkdir()
        (root / "base" / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "_build_into", boom)
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        zoo.ensure_zoo("nano", 1)
    leftovers = [p for p in (tmp_path / "cache" / "zoo").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_cli_zoo_path_prints_cached_folder(micro_zoo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from evomerge.cli import main

    assert main(["zoo", "path", "--size", "micro"]) == 0
    assert capsys.readouterr().out.strip() == str(micro_zoo)
    assert main(["zoo", "build", str(micro_zoo)]) == 2  # exists, no --force: a clear error, nothing touched
    assert "already exists" in capsys.readouterr().err


def test_sigterm_during_build_becomes_exit_and_stale_partials_are_swept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    import evomerge.zoo.build as zoo

    with pytest.raises(SystemExit), zoo._sigterm_as_exit():
        os.kill(os.getpid(), signal.SIGTERM)
    _nano(monkeypatch)
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    target = zoo.zoo_dir("nano", 2)
    stale = target.parent / f".{target.name}.abc.partial"
    stale.mkdir(parents=True)
    assert zoo.ensure_zoo("nano", 2) == target and (target / "zoo.json").is_file()
    assert not stale.exists()
