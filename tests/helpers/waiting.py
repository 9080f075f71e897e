"""Waiting for a condition with a deadline, instead of sleeping a fixed time and hoping it happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, *, what: str = "the condition", interval: float = 0.02,
               between: Callable[[], object] | None = None) -> T:
    """``predicate()``'s first truthy value, checked every ``interval`` seconds (or after each call of
    ``between``, which then does the waiting, e.g. an executor's ``poll``); AssertionError naming ``what`` once
    ``timeout`` seconds have passed. The predicate may raise to give up early (a process that died)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        if between is not None:
            between()
        else:
            time.sleep(interval)


def hook_text(marker: Path) -> str:
    """The line a kill point wrote into its marker file, or '' while it is absent or not completely written
    (``evomerge.killpoints`` opens the file, then writes one line ending in a newline)."""
    try:
        text = marker.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    return text if text.endswith("\n") else ""
