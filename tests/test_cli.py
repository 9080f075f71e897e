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


def test_analysis_commands_read_evomerge_search_spaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`qp-diagnose` takes the same SPACE.yaml as `evomerge run` (models: {base, fine_tunes}, inline fitness)."""
    import sys

    from evomerge.fitness.zoo import ensure_zoo

    ensure_zoo("micro")
    sys.path.insert(0, str(Path(__file__).parent / "search"))
    from _spaces import micro_space, write_space

    space = write_space(tmp_path / "s.yaml", micro_space())
    assert main(["qp-diagnose", str(space), "--basis", "full"]) == 0
    out = capsys.readouterr().out
    rho = float(out.split("overall rho")[1].split()[0])
    assert 0.0 <= rho <= 1.0
