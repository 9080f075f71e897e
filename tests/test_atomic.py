"""Atomic writes: a failure leaves the previous content and no temporary files behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.atomic import atomic_output_dir, write_json_atomic, write_text_atomic
from evomerge.errors import ConfigError


def test_write_replaces_content_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_output_dir_is_removed_on_error_and_old_output_kept(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with atomic_output_dir(out) as tmp:
        write_text_atomic(tmp / "a.txt", "first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=True) as tmp:
        write_text_atomic(tmp / "a.txt", "second")
        raise RuntimeError("merge failed half way")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_existing_output_refused_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "merged").mkdir()
    with pytest.raises(ConfigError, match="already exists"), atomic_output_dir(tmp_path / "merged"):
        pass
    with atomic_output_dir(tmp_path / "merged", overwrite=True) as tmp:
        write_text_atomic(tmp / "b.txt", "new")
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["b.txt"]
