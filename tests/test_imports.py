"""The import map (docs/ARCHITECTURE.md) enforced: no cycle among evomerge modules, function-local imports
included; no function-local import of an evomerge module; no arrow the map forbids; kernels import only torch."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "evomerge"

GROUND = {"evomerge", "evomerge.errors", "evomerge.atomic", "evomerge.paths", "evomerge.dtypes", "evomerge.files",
          "evomerge.killpoints"}
# unit -> the units it may import (besides itself and the ground floor); a unit is a top-level module or package
MAP: dict[str, set[str]] = {
    "ground": set(),
    "models": set(),
    "merge": {"models"},
    "kinship": {"merge", "models"},
    "fitness": {"models"},
    "method_data": {"fitness", "merge", "models"},
    "lab": {"method_data", "fitness", "merge", "models"},
    "zoo": {"fitness", "merge", "models"},
    "executors": {"method_data", "fitness", "merge", "models"},
    "search": {"executors", "method_data", "kinship", "fitness", "merge", "models"},
    "report": {"search", "kinship", "merge", "models"},
    "commands": {"bench", "report", "search", "executors", "zoo", "lab", "method_data", "fitness", "kinship",
                 "merge", "models"},
    "bench": {"report", "search", "executors", "zoo", "lab", "method_data", "fitness", "kinship", "merge",
              "models"},
    "cli": set(),
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def unit_of(module: str) -> str:
    if module in GROUND:
        return "ground"
    return module.split(".")[1]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for n in ast.walk(node))
    return out


def imports(module: str, source: str | None = None) -> Iterator[tuple[str, int, bool]]:
    """(imported evomerge module, line, whether the import sits inside a function or class) of ``module``;
    ``if TYPE_CHECKING:`` imports (annotations only) are not imports at run time."""
    path = MODULES[module]
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    skip = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in targets:
            if not target.startswith("evomerge"):
                continue
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module:
                yield target, node.lineno, id(node) not in top


EDGES = {m: sorted({t for t, _, _ in imports(m)}) for m in MODULES}


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in EDGES[m]:
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)


# Modules that must not load torch before their own code runs, so their evomerge imports stay inside functions:
# `evomerge bench merge` forks its process spawner before torch is imported (a child's peak RSS counts the
# memory of the process it was forked from, and the benchmark reports each tool's own peak).
LATE_IMPORTS = {"evomerge.bench.merge"}


def test_no_function_local_import_of_evomerge_modules() -> None:
    local = [f"{m}:{line} imports {t}" for m in MODULES for t, line, nested in imports(m)
             if nested and m not in LATE_IMPORTS]
    assert not local, "imports of evomerge modules go at the top of the module:\n" + "\n".join(local)


def test_every_arrow_is_on_the_map() -> None:
    assert {unit_of(m) for m in MODULES} <= set(MAP), "a new top-level module or package: add it to MAP"
    bad = []
    for m, targets in EDGES.items():
        src = unit_of(m)
        for t in targets:
            dst = unit_of(t)
            if dst not in (src, "ground") and dst not in MAP[src]:
                bad.append(f"{m} -> {t} ({src} may not import {dst})")
    assert not bad, "\n".join(bad)


def test_kernels_import_only_kernels_and_the_ground_floor() -> None:
    bad = [f"{m} -> {t}" for m in MODULES if m.startswith("evomerge.merge.kernels")
           for t in EDGES[m] if not (t.startswith("evomerge.merge.kernels") or t in GROUND)]
    assert not bad, "\n".join(bad)


def test_the_checks_see_local_relative_and_type_checking_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .spec import Need\n"
        "if TYPE_CHECKING:\n    from evomerge.search.loop import Timings\n"
        "def f():\n    from evomerge.fitness.spec import FitnessSpec\n    import torch\n"
    )
    found = sorted(imports("evomerge.merge.methods.qp", source))
    assert found == [("evomerge.fitness.spec", 6, True), ("evomerge.merge.methods.spec", 2, False)]
    assert unit_of("evomerge.fitness.spec") == "fitness" and unit_of("evomerge.paths") == "ground"
    assert "fitness" not in MAP["merge"]  # so the local import above would be a forbidden arrow too
