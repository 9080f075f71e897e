"""The CLI: every verb is discovered, errors exit 2 with the message, `evomerge methods` lists the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.cli import build_parser, main
from evomerge.merge.registry import REGISTRY

VERBS = {"run", "resume", "status", "export", "report", "merge", "methods", "kinship", "eval", "mergeability",
         "qp-diagnose", "zoo", "bench"}


def test_every_verb_is_discovered() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) >= VERBS


def test_methods_lists_every_registered_method_with_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert len(REGISTRY.names()) >= 12
    for name in REGISTRY.names():
        assert f"{name}:" in out
    assert "density      default 0.2" in out  # TIES' default density


def test_a_bad_input_exits_2_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
