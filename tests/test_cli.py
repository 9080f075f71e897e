"""The CLI: every verb is discovered, errors exit 2 with the message, `evomerge methods` lists the registry."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.spaces import micro_space, write_space

import evomerge.commands as commands
from evomerge.cli import COMMANDS, build_parser, main
from evomerge.merge.methods.registry import REGISTRY

VERBS = {"run", "resume", "status", "export", "report", "merge", "methods", "kinship", "eval", "mergeability",
         "qp-diagnose", "zoo", "bench", "plan"}


def test_every_verb_is_in_the_table_and_every_command_module_has_a_verb() -> None:
    parser = build_parser([])
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == VERBS == set(COMMANDS)
    modules = {p.stem for p in (Path(commands.__file__).parent).glob("*.py") if not p.stem.startswith("_")}
    assert {m for m, _ in COMMANDS.values()} == modules
    for module_name, _ in COMMANDS.values():
        module = importlib.import_module(f"evomerge.commands.{module_name}")
        assert callable(module.add_arguments) and callable(module.run)


def test_help_imports_no_command_module_and_no_torch() -> None:
    code = ("import sys\nfrom evomerge.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'transformers', 'evomerge.commands.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


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


def test_analysis_commands_read_evomerge_search_spaces(micro_zoo: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`qp-diagnose` takes the same SPACE.yaml as `evomerge run` (models: {base, fine_tunes}, inline fitness)."""
    space = write_space(tmp_path / "s.yaml", micro_space())
    assert main(["qp-diagnose", str(space), "--basis", "full"]) == 0
    out = capsys.readouterr().out
    rho = float(out.split("overall rho")[1].split()[0])
    assert 0.0 <= rho <= 1.0


def test_merge_in_a_subprocess_exits_fast_with_complete_output(micro_zoo: Path, tmp_path: Path) -> None:
    # `evomerge merge` ends with os._exit (no interpreter teardown): its output and summary line must be complete
    # and its exit code kept, for success and for a bad input
    import json
    import subprocess
    import sys

    import yaml

    zoo = micro_zoo
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "linear", "models": [{"model": str(zoo / "add")},
                                                                     {"model": str(zoo / "rev")}]}))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "merged " in done.stdout and str(out) in done.stdout
    from safetensors.torch import load_file

    def state(folder: Path) -> dict:
        return {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}

    merged, a, b = state(out), state(zoo / "add"), state(zoo / "rev")
    assert merged.keys() == a.keys() and json.loads((out / "config.json").read_text())
    for name in merged:
        assert (merged[name] - (a[name] + b[name]) / 2).abs().max().item() <= 1e-6, name
    bad = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(tmp_path / "missing.yaml"), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr
