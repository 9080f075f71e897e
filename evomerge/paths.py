"""Paths users write: plain folders and files, ``~``, and scheme paths such as ``zoo:demo/base``.

A scheme names a plugin module with a ``resolve(rest: str) -> Path`` function, imported on first use (the
way fsspec's ``known_implementations`` maps protocols to classes): ``zoo:`` paths resolve through
:mod:`evomerge.zoo.scheme`, which builds the demo zoo (and its LoRA adapters, ``zoo:SIZE/lora/SKILL``) on first use. So every layer (search spaces, fitness specs,
calibration files, recipes, the CLI) resolves paths through this one function without importing the zoo.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from evomerge.errors import ConfigError

# scheme -> module whose ``resolve(rest)`` maps the rest of the path to a local path
SCHEMES: dict[str, str] = {"zoo": "evomerge.zoo.scheme"}


def scheme_of(path: str | os.PathLike[str]) -> str | None:
    """``"zoo"`` for ``zoo:demo/base``; None for a plain path (a Windows drive letter is not a scheme)."""
    text = os.fspath(path)
    head, sep, _ = text.partition(":")
    return head if sep and head in SCHEMES else None


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """The local path ``path`` stands for: ``~`` expanded, scheme paths resolved (``zoo:`` may build the zoo)."""
    text = os.fspath(path)
    scheme = scheme_of(text)
    if scheme is None:
        return Path(text).expanduser()
    module = importlib.import_module(SCHEMES[scheme])
    resolved = module.resolve(text[len(scheme) + 1:])
    if not isinstance(resolved, Path):
        raise ConfigError(f"{text}: the {scheme}: scheme resolved to {resolved!r}, not a path")
    return resolved


def is_absolute_or_scheme(path: str) -> bool:
    """Whether ``path`` needs no folder to be resolved against (absolute, ``~`` or a scheme path)."""
    return scheme_of(path) is not None or Path(path).expanduser().is_absolute()


def cache_root() -> Path:
    """Where evomerge caches what it builds (the demo zoo): ``$EVOMERGE_CACHE`` or ``~/.cache/evomerge``."""
    return Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge").expanduser()
