"""Kill points: pause the process at a named point so a test can SIGKILL it exactly there.

``EVOMERGE_TEST_HOOK="POINT[@N]"`` makes the N-th (default 1st) arrival at ``POINT`` in this process write the
file named by ``EVOMERGE_TEST_HOOK_FILE`` (if set) and then sleep until killed. Points: ``evaluate`` (inside a
worker's evaluation), ``race_stage`` (a racing stage scored and compared, the next not started),
``checkpoint_write`` (optimizer state written to its temporary file, not yet renamed), ``archive_commit`` (a
candidate inserted, transaction not yet committed), ``after_record`` (archived, not yet told to the optimizer).
Unset (always, outside tests), a hook costs one dictionary lookup.
"""

from __future__ import annotations

import os
import time

_counts: dict[str, int] = {}


def kill_point(point: str) -> None:
    """Pause here forever when the test hook names this point (and this is the chosen arrival)."""
    spec = os.environ.get("EVOMERGE_TEST_HOOK")
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != (int(nth) if nth else 1):
        return
    marker = os.environ.get("EVOMERGE_TEST_HOOK_FILE")
    if marker:
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(f"{point}@{_counts[point]} pid {os.getpid()}\n")
    while True:  # wait for the test's SIGKILL
        time.sleep(0.05)
