"""Reading the text files users write (YAML): one reader, so every error names the file and line the same way."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError


def read_text(path: str | os.PathLike[str], what: str = "file") -> str:
    """The file's text; ConfigError naming ``what`` and the path when it is missing or unreadable."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {p} cannot be read: {exc}") from None


def parse_yaml(text: str, where: str) -> Any:
    """Parsed YAML; ConfigError naming ``where`` with the line and column of a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None


def read_yaml(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Parsed YAML of ``path`` (see :func:`read_text` and :func:`parse_yaml`)."""
    return parse_yaml(read_text(path, what), f"{what} {Path(path)}")


def read_yaml_mapping(path: str | os.PathLike[str], what: str = "file") -> dict[str, Any]:
    """Like :func:`read_yaml`, and the top level must be a mapping."""
    data = read_yaml(path, what)
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {Path(path)}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def refuse_unknown_keys(data: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """ConfigError naming ``where``, the unknown keys and the known ones: a typo must not be silently ignored."""
    known = set(known)
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")


def read_json(path: str | os.PathLike[str], what: str = "file", error: type[Exception] = ConfigError) -> Any:
    """Parsed JSON of ``path``; ``error`` naming ``what`` and the path when it is missing, unreadable or invalid."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {p} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{what} {p} is not valid JSON: {exc}") from None


def read_json_object(path: str | os.PathLike[str], what: str = "file", error: type[Exception] = ConfigError,
                     ) -> dict[str, Any]:
    """Like :func:`read_json`, and the top level must be an object."""
    data = read_json(path, what, error)
    if not isinstance(data, dict):
        raise error(f"{what} {Path(path)} is not a JSON object")
    return data
