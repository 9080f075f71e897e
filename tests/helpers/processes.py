"""The evomerge CLI in a subprocess: started (optionally paused at a kill point), read while it runs, killed at
its hook."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from helpers.waiting import hook_text, wait_until


def run_cli(*args: str, hook: str | None = None, marker: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m evomerge ARGS --quiet`` in a subprocess, optionally paused at a kill point
    (``evomerge.killpoints``: ``hook`` is ``POINT[@N]``, ``marker`` the file it writes on arrival)."""
    env = dict(os.environ)
    env.pop("EVOMERGE_TEST_HOOK", None)
    env.pop("EVOMERGE_TEST_HOOK_FILE", None)
    if hook:
        env["EVOMERGE_TEST_HOOK"] = hook
        env["EVOMERGE_TEST_HOOK_FILE"] = str(marker)
    return subprocess.Popen([sys.executable, "-m", "evomerge", *args, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_hook(proc: subprocess.Popen[bytes], marker: Path, timeout: float = 180.0) -> str:
    """The marker's line once ``proc`` pauses at its kill point; AssertionError (and ``proc`` killed) if it ends
    first or the deadline passes."""

    def reached() -> str:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"the run ended before the hook: {out[-2000:]}")
        return hook_text(marker)

    try:
        return wait_until(reached, timeout, what=f"the hook {marker.name}", interval=0.05)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise


def kill_at_hook(proc: subprocess.Popen[bytes], marker: Path, timeout: float = 180.0) -> None:
    """Wait until ``proc`` pauses at its hook (the marker file appears), then SIGKILL it."""
    wait_for_hook(proc, marker, timeout)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marker.unlink()


class OutputReader:
    """Reads a process's stdout on a thread, so a test can wait for a line while the process runs."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None, "the process needs stdout=PIPE"
        self._proc, self._chunks, self._lock = proc, [], threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stream = self._proc.stdout
        assert stream is not None
        for line in iter(stream.readline, b""):
            with self._lock:
                self._chunks.append(line)

    def text(self) -> str:
        """Everything read so far."""
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        """Until ``needle`` appears in the output (AssertionError with the output if not by ``timeout``)."""
        try:
            wait_until(lambda: needle in self.text(), timeout, what=repr(needle))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; output: {self.text()[-2000:]}") from None

    def finish(self, timeout: float) -> str:
        """The whole output once the process has ended."""
        self._proc.wait(timeout=timeout)
        self._thread.join(timeout=timeout)
        return self.text()
