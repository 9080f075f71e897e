from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.fitness import builtin
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.result import EvalResult
from evomerge.fitness.spec import FitnessSpec


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


def _jsonl_spec(zoo: Path, metric: str = "token_acc", **extra: object) -> FitnessSpec:
    return FitnessSpec.from_dict({**extra, "tasks": [
        {"name": s, "jsonl": {"search": str(zoo / "data" / s / "search.jsonl"),
                              "test": str(zoo / "data" / s / "test.jsonl")}, "metric": metric}
        for s in ("add", "sort")]})


# ------------------------------------------------------------------------------------- built-in metrics


class _FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits depend only on the current token: logits[t] = table[ids[t]]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor):  # noqa: ANN201
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


class _CharTok:
    pad_token_id = 0
    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [int(c) for c in text]}


def test_builtin_metrics_hand_computed() -> None:
    # vocab {0..3}; after token 1 the model prefers 2 (p = 0.5 / 0.25 / 0.125 / 0.125), after 2 prefers 3.
    lp = torch.log(torch.tensor([0.125, 0.125, 0.5, 0.25]))
    table = torch.stack([lp, lp, lp[[0, 1, 3, 2]], lp])
    # rows: prompt "1", answer "2" + terminator "3": tokens 1 2 3 -> both argmax correct (exact)
    #       prompt "1", answer "3" + terminator "3": tokens 1 3 3 -> first wrong, second (after 3 -> 2) wrong
    rows = [{"prompt": "1", "answer": "2"}, {"prompt": "1", "answer": "3"}]
    batches = builtin.encode_rows(_CharTok(), rows, batch_size=1, terminator="3")
    assert batches[0].target_mask.tolist() == [[1.0, 1.0]]
    got = builtin.score_batches(_FixedLogits(table), batches)
    # log-probs: row1: p(2|1)=.5, p(3|2)=.5 ; row2: p(3|1)=.25, p(3|3)=.25
    expected_ll = (2 * math.log(0.5) + 2 * math.log(0.25)) / 4
    assert got["exact_match"] == pytest.approx(0.5)
    assert got["token_acc"] == pytest.approx(0.5)
    assert got["loglik"] == pytest.approx(expected_ll)
    assert got["perplexity"] == pytest.approx(math.exp(-expected_ll))


def test_teacher_forced_exact_match_equals_greedy_generation(micro_zoo: Path, micro_tokenizer) -> None:  # noqa: ANN001
    model = _load(micro_zoo / "enc")
    rows = builtin.read_jsonl(micro_zoo / "data" / "enc" / "test.jsonl")
    tf = builtin.score_batches(model, builtin.encode_rows(micro_tokenizer, rows, 64))["exact_match"]
    hits = 0
    for row in rows:
        ids = micro_tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=micro_tokenizer.convert_tokens_to_ids("\n"),
                             pad_token_id=micro_tokenizer.pad_token_id)
        text = micro_tokenizer.decode(out[0, ids.shape[1]:])
        hits += text == row["answer"] + "\n"
    assert tf == pytest.approx(hits / len(rows))
    assert tf > 0  # the enc specialist solves some held-out rows


# ------------------------------------------------------------------------------------- evaluator


def test_evaluation_is_deterministic_and_records_settings(micro_zoo: Path) -> None:
    spec = _jsonl_spec(micro_zoo, limit=32)
    model = _load(micro_zoo / "sort")
    a = Evaluator(spec, micro_zoo / "base").score(model)
    ev = Evaluator(spec, micro_zoo / "base")
    b, c = ev.score(model), ev.score(model)
    assert a.ok and a.aggregate == b.aggregate == c.aggregate
    assert a.task_values() == c.task_values()
    assert a.aggregate == pytest.approx(sum(t.value for t in a.tasks) / 2)
    s = a.settings
    assert s["split"] == "search" and s["batch_size"] == 32 and s["seed"] == 0
    assert s["tasks"][0]["limit"] == 32 and s["tasks"][0]["metric"] == "token_acc"
    assert {"evomerge", "lm_eval", "torch"} <= set(s["versions"])
    assert 0 < a.forward_seconds <= a.seconds
    assert EvalResult.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_splits_are_scored_separately(micro_zoo: Path) -> None:
    spec = _jsonl_spec(micro_zoo)
    ev = Evaluator(spec, micro_zoo / "base", splits=("search", "test"))
    model = _load(micro_zoo / "sort")
    s, t = ev.score(model, "search"), ev.score(model, "test")
    assert s.split == "search" and t.split == "test"
    assert s.settings["tasks"][0]["source"].endswith("search.jsonl")
    assert t.settings["tasks"][0]["source"].endswith("test.jsonl")
    assert s.aggregate != t.aggregate


def test_weights_rewritten_in_place_are_seen(micro_zoo: Path) -> None:
    spec = _jsonl_spec(micro_zoo, metric="loglik")
    ev = Evaluator(spec, micro_zoo / "base")
    model = _load(micro_zoo / "base")
    base_score = ev.score(model)
    sort_state = _load(micro_zoo / "sort").state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(sort_state[k])
    again = ev.score(model)
    assert again.aggregate == ev.score(_load(micro_zoo / "sort")).aggregate
    assert again.aggregate != base_score.aggregate


def test_minimized_metric_enters_negated(micro_zoo: Path) -> None:
    spec = FitnessSpec.from_dict({"tasks": [
        {"jsonl": str(micro_zoo / "data" / "add" / "search.jsonl"), "metric": "perplexity"}]})
    assert spec.tasks[0].direction == "minimize" and spec.tasks[0].name == "search"
    res = Evaluator(spec, micro_zoo / "base").score(_load(micro_zoo / "base"))
    assert res.ok and res.tasks[0].value > 1.0
    assert res.aggregate == pytest.approx(-res.tasks[0].value)
    assert spec.effective_penalty == -1.0e4


def test_nan_model_gives_recorded_failure(micro_zoo: Path) -> None:
    spec = _jsonl_spec(micro_zoo, penalty=-5.0)
    model = _load(micro_zoo / "base")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    res = Evaluator(spec, micro_zoo / "base").score(model)
    assert not res.ok and res.aggregate == -5.0
    assert "non-finite" in (res.error or "")
    assert res.settings["penalty"] == -5.0


def test_exception_in_forward_gives_recorded_failure(micro_zoo: Path) -> None:
    class Broken(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor):  # noqa: ANN201
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    res = Evaluator(_jsonl_spec(micro_zoo), micro_zoo / "base").score(Broken())
    assert not res.ok and res.aggregate == -1.0
    assert res.error.startswith("OutOfMemoryError: CUDA out of memory")


def test_unknown_split_is_a_failure_not_a_crash(micro_zoo: Path) -> None:
    res = Evaluator(_jsonl_spec(micro_zoo), micro_zoo / "base").score(_load(micro_zoo / "base"), split="dev")
    assert not res.ok and "unknown split 'dev'" in (res.error or "")


# ------------------------------------------------------------------------------------- lm-eval tasks


def test_lm_eval_yaml_tasks_match_builtin_and_are_deterministic(micro_zoo: Path) -> None:
    lm_spec = FitnessSpec.from_dict({"batch_size": 16, "max_gen_toks": 10, "limit": 24, "tasks": [
        {"name": s, "lm_eval_yaml": {"search": str(micro_zoo / "tasks" / f"evozoo_{s}_search.yaml"),
                                     "test": str(micro_zoo / "tasks" / f"evozoo_{s}_test.yaml")},
         "metric": "exact_match"} for s in ("sort", "enc")]})
    bi_spec = FitnessSpec.from_dict({"limit": 24, "tasks": [
        {"name": s, "jsonl": str(micro_zoo / "data" / s / "test.jsonl"), "metric": "exact_match"}
        for s in ("sort", "enc")]})
    ev = Evaluator(lm_spec, micro_zoo / "base", splits=("test",))
    model = _load(micro_zoo / "enc")
    a = ev.score(model, "test")
    b = ev.score(model, "test")
    assert a.ok, a.error
    assert a.task_values() == b.task_values()
    assert a.tasks[0].metric == "exact_match,none"
    ref = Evaluator(bi_spec, micro_zoo / "base", splits=("test",)).score(model, "test")
    # greedy generation through lm-eval == teacher-forced exact match
    assert a.task_values() == pytest.approx(ref.task_values())
    assert a.forward_seconds > 0
    assert a.settings["max_gen_toks"] == 10


def test_lm_eval_nan_model_is_a_failure(micro_zoo: Path) -> None:
    spec = FitnessSpec.from_yaml(micro_zoo / "fitness_lmeval.yaml").model_copy(update={"limit": 4})
    model = _load(micro_zoo / "base")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    res = Evaluator(spec, micro_zoo / "base").score(model)
    assert not res.ok and "non-finite" in (res.error or "") and res.aggregate == -1.0


# ------------------------------------------------------------------------------------- spec validation


@pytest.mark.parametrize(("data", "match"), [
    ({"tasks": [{"jsonl": "a.jsonl", "weight": -1}]}, r"fitness\.tasks\[0\]\.weight: .*greater than 0.*-1"),
    ({"tasks": []}, r"fitness\.tasks: .*at least 1"),
    ({"tasks": [{"jsonl": "a.jsonl", "lm_eval": "arc_easy"}]}, r"tasks\[0\]: give exactly one of"),
    ({"tasks": [{"jsonl": "a.jsonl", "metric": "bleu"}]}, r"tasks\[0\]: metric 'bleu' is not a built-in"),
    ({"tasks": [{"jsonl": "a.jsonl"}], "batch_size": 0}, r"fitness\.batch_size: .*greater than 0"),
    ({"tasks": [{"jsonl": "a.jsonl", "colour": 1}]}, r"tasks\[0\]\.colour: Extra inputs"),
    ({"tasks": [{"jsonl": {"search": "a.jsonl"}}]}, r"tasks\[0\]\.jsonl.*missing test"),
    ({"tasks": [{"jsonl": "x/a.jsonl"}, {"jsonl": "y/a.jsonl"}]}, r"task names must be unique \(repeated: a\)"),
])
def test_spec_errors_name_the_field(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FitnessSpec.from_dict(data)


def test_spec_from_search_space_file_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "space.yaml").write_text(
        "models: []\nfitness:\n  batch_size: 8\n  tasks:\n    - jsonl: d/x.jsonl\n      weight: 2\n"
        "    - lm_eval_yaml: zoo:micro/tasks/t.yaml\n")
    spec = FitnessSpec.from_yaml(tmp_path / "space.yaml")
    assert spec.batch_size == 8
    assert spec.tasks[0].source("test") == str(tmp_path / "d" / "x.jsonl")
    assert spec.tasks[1].source("search") == "zoo:micro/tasks/t.yaml"
    (tmp_path / "bad.yaml").write_text("fitness:\n  tasks:\n    - jsonl: a.jsonl\n      limit: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: fitness\.tasks\[0\]\.limit"):
        FitnessSpec.from_yaml(tmp_path / "bad.yaml")


def test_missing_data_file_is_a_config_error_at_build(tmp_path: Path, micro_zoo: Path) -> None:
    spec = FitnessSpec.from_dict({"tasks": [{"jsonl": str(tmp_path / "none.jsonl")}]})
    with pytest.raises(ConfigError, match="none.jsonl does not exist"):
        Evaluator(spec, micro_zoo / "base")


def test_cli_eval_json(micro_zoo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from evomerge.cli import main

    rc = main(["eval", str(micro_zoo / "sort"), "--tasks", str(micro_zoo / "fitness.yaml"), "--split", "test",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"] and out["split"] == "test"
    assert [t["task"] for t in out["tasks"]] == ["add", "rev", "sort", "enc"]
    table = json.loads((micro_zoo / "zoo_table.json").read_text())
    assert out["tasks"][2]["value"] == pytest.approx(table["exact match"]["specialist sort"]["sort"])


def test_packaged_specs_with_zoo_paths(micro_zoo: Path) -> None:
    from evomerge.fitness.spec import packaged_spec

    model = _load(micro_zoo / "sort")
    bi = Evaluator(FitnessSpec.from_yaml(packaged_spec("micro")), "zoo:micro/base", splits=("test",))
    res = bi.score(model, "test")
    table = json.loads((micro_zoo / "zoo_table.json").read_text())["exact match"]["specialist sort"]
    assert res.ok and res.task_values() == pytest.approx(table)
    lm = FitnessSpec.from_yaml(packaged_spec("micro_lmeval")).model_copy(update={"limit": 8})
    assert Evaluator(lm, "zoo:micro/base").score(model).ok
    with pytest.raises(ConfigError, match="no packaged fitness spec 'nope'"):
        packaged_spec("nope")
