"""The search space of a run directory: read back from its snapshot, and compared with a space given on resume.

Apart from :class:`~evomerge.search.run.RunDir`, which only knows files (so ``evomerge status`` reads a run
without loading the search-space machinery, the merge registry and torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError
from evomerge.search.run import RunDir
from evomerge.search.space import SAFE_ON_RESUME, Space, space_from_dict


def snapshot_space(run: RunDir, check_models: bool = True) -> Space:
    """The space ``run`` was started with (relative paths resolved against the original file's folder)."""
    text = run.space_path.read_text(encoding="utf-8")
    info = run.info()
    base_dir = Path(info.get("space_dir") or run.path)
    return space_from_dict(yaml.safe_load(text), where=str(run.space_path), base_dir=base_dir, text=text,
                           path=Path(info["space_path"]) if info.get("space_path") else None,
                           check_models=check_models)


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
