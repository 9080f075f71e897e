"""The search space of a run directory: read back from its snapshot, and compared with a space given on resume.

Apart from :class:`~evomerge.search.run.RunDir`, which only knows files (so ``evomerge status`` reads a run
without loading the search-space machinery, the merge registry and torch).

The run's space is its ``space.yaml`` with the safe fields of ``overrides.json`` applied (what ``run --budget``,
``--workers`` or a ``resume`` asked for), so a resume after a crash continues what was asked, not the YAML's
values. ``space.yaml`` itself is checked against the space the archive recorded at creation
(:func:`check_snapshot`): a hand edit cannot bypass the check ``resume --space`` makes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge.errors import ConfigError, RunDirError
from evomerge.search.run import OVERRIDES_FILE, RunDir
from evomerge.search.space import SAFE_ON_RESUME, Space, SpaceModel, space_from_dict


def snapshot_space(run: RunDir, check_models: bool = True, overrides: bool = True) -> Space:
    """The space ``run`` was started with (relative paths resolved against the original file's folder), with
    the run's overrides applied unless ``overrides`` is False (then: space.yaml as written)."""
    text = run.space_path.read_text(encoding="utf-8")
    info = run.info()
    base_dir = Path(info.get("space_dir") or run.path)
    space = space_from_dict(yaml.safe_load(text), where=str(run.space_path), base_dir=base_dir, text=text,
                            path=Path(info["space_path"]) if info.get("space_path") else None,
                            check_models=check_models)
    return with_safe_fields(space, run.overrides(), where=str(run.path / OVERRIDES_FILE)) if overrides else space


def is_safe(dotted: str) -> bool:
    """Whether the field at ``dotted`` may change on resume."""
    return any(dotted == s or dotted.startswith(s + ".") for s in SAFE_ON_RESUME)


def given_raw(space: Space) -> SpaceModel:
    """The space as its text says, without command-line overrides."""
    return SpaceModel.model_validate(yaml.safe_load(space.text))


def safe_overrides(given: SpaceModel, effective: SpaceModel) -> dict[str, Any]:
    """The safe fields (dotted paths -> values) where ``effective`` differs from ``given``."""
    a, b = _flatten(given.model_dump(mode="json")), _flatten(effective.model_dump(mode="json"))
    return {k: b[k] for k in sorted(b) if is_safe(k) and a.get(k, _MISSING) != b[k]}


def with_safe_fields(space: Space, overrides: Mapping[str, Any], where: str = OVERRIDES_FILE) -> Space:
    """``space`` with safe fields replaced (dotted paths); an unsafe or invalid one is a RunDirError."""
    if not overrides:
        return space
    data = space.raw.model_dump(mode="json")
    for dotted, value in overrides.items():
        if not is_safe(dotted):
            raise RunDirError(f"{where}: {dotted} is not a field that may change on resume")
        node = data
        *head, last = dotted.split(".")
        for part in head:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    try:
        raw = SpaceModel.model_validate(data)
    except ValidationError as exc:
        raise RunDirError(f"{where}: invalid value ({exc.errors()[0]['msg']})") from None
    return dataclasses.replace(space, raw=raw)


def check_snapshot(run: RunDir, snapshot: Space, recorded: Mapping[str, Any] | None) -> None:
    """Refuse a space.yaml edited since the run was created: its unsafe fields must be the ones the archive
    recorded then (``recorded``: the archive's ``space`` meta; fields added to evomerge since then count as
    unchanged while they hold their default)."""
    if recorded is None:
        return
    a, b = _flatten(dict(recorded)), _flatten(snapshot.comparable())
    changed = []
    for k in sorted(set(a) | set(b)):
        old, new = a.get(k, _MISSING), b.get(k, _MISSING)
        if old == new or (old is _MISSING and new == _default_of(k)):
            continue
        changed.append(f"{k}: {_show(old)} -> {_show(new)}")
    if changed:
        raise ConfigError(
            f"{run.space_path} was edited after the run was created ({'; '.join(changed[:8])}): the archive's "
            f"scores belong to the space it was created with. Undo the edit, or start a new run; to change "
            f"{', '.join(SAFE_ON_RESUME)}, pass an edited copy with `evomerge resume {run.path} --space FILE`")


def _default_of(dotted: str) -> Any:
    """The default of a (possibly nested) SpaceModel field, or a marker when it has none."""
    model: Any = SpaceModel
    value: Any = _MISSING
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return _MISSING
        info = fields[part]
        if info.is_required():
            return _MISSING
        value = info.get_default(call_default_factory=True)
        model = type(value) if hasattr(value, "model_fields") else info.annotation
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return value


def check_resumable(run: RunDir, new: Space, old: Space) -> list[str]:
    """Fields that differ between ``old`` (the snapshot) and ``new``; refuses any not safe to change.

    Returns the dotted paths of the (safe) fields that changed.
    """
    a, b = _flatten(old.raw.model_dump(mode="json")), _flatten(new.raw.model_dump(mode="json"))
    changed = sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))
    unsafe = [k for k in changed if not any(k == s or k.startswith(s + ".") for s in SAFE_ON_RESUME)]
    if unsafe:
        shown = "; ".join(f"{k}: {_show(a.get(k, _MISSING))} -> {_show(b.get(k, _MISSING))}" for k in unsafe[:8])
        raise ConfigError(
            f"{new.where}: the search space differs from the one run {run.path} was started with ({shown}). "
            f"Only {', '.join(SAFE_ON_RESUME)} may change on resume; start a new run for the rest")
    return changed


_MISSING = object()


def _show(v: Any) -> str:
    return "(absent)" if v is _MISSING else repr(v)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}
