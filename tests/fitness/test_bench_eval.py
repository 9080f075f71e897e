from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_bench_eval_on_micro_zoo(micro_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from evomerge.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "eval", "--zoo-size", "micro", "--candidates", "2", "--limit", "8", "--skip-big",
               "--threads", "1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["zoo"]["rows"]
    assert len(rows) == 2
    for row in rows:
        # evomerge's prebuilt-task path and simple_evaluate from scratch score every candidate identically,
        # and the built-in teacher-forced exact match agrees with lm-eval's greedy generation
        assert row["scores_agree"] and row["builtin_agrees"]
        assert 0.0 <= row["outside_forward_lmeval"] <= 1.0
        assert row["speedup_lmeval"] == pytest.approx(row["simple_evaluate_s"] / row["evomerge_lmeval_s"])
    assert "faster than simple_evaluate" in capsys.readouterr().out
