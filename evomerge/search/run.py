"""A run directory ``runs/<name>/``: config snapshot, archive, optimizer checkpoint, log, lock.

Layout::

    space.yaml        the search space as given (the snapshot a resume is checked against)
    overrides.json    fields safe to change that the command line or a resume changed (``--budget``,
                      ``--workers``, ``resume --space``): the run's space is space.yaml with these applied
    run.json          name, creation time, space path, seeds, versions, command line
    archive.sqlite    every evaluation and event (append-only; see :mod:`evomerge.search.archive`)
    checkpoint.json   the optimizer's calls (replayed on resume) + in-flight candidates, replaced atomically
                      after each tell batch; JSON only, so a run directory never runs code
    log.txt           what the search printed, appended by every session
    .lock             held (flock) by the one process running the search

A run directory is created complete (files written in a temporary sibling, then renamed), so an error at start
never leaves a half-made run behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.atomic import _fsync_dir, disk_full_error, is_disk_full, raise_if_disk_full, write_json_atomic
from evomerge.errors import RunDirError
from evomerge.files import read_json_object
from evomerge.killpoints import kill_point
from evomerge.models.fingerprint import fingerprint_models
from evomerge.search.archive import FILE_NAME as ARCHIVE_FILE
from evomerge.search.archive import Archive

if TYPE_CHECKING:  # a run directory is read without the search space's machinery (`evomerge status`)
    from evomerge.search.space import Space

SPACE_FILE = "space.yaml"
RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.json"
LEGACY_CHECKPOINT_FILE = "checkpoint.pkl"  # older evomerge: a pickle, never read
CHECKPOINT_FORMAT = 2
OVERRIDES_FILE = "overrides.json"
LOG_FILE = "log.txt"
LOCK_FILE = ".lock"


class CorruptCheckpoint(RunDirError):
    """The checkpoint is not readable as this evomerge's JSON checkpoint (truncated, foreign, another format)."""


def versions() -> dict[str, str]:
    """Versions of everything that can change a score or a merge."""
    out = {"python": platform.python_version()}
    for dist in ("evomerge", "torch", "transformers", "nevergrad", "ray", "lm-eval", "datasets", "numpy",
                 "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


class RunDir:
    """One search's directory. ``create`` for a new run, ``open`` to resume or inspect one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_fh: Any = None

    # ------------------------------------------------------------------------------------- files

    @property
    def archive_path(self) -> Path:
        return self.path / ARCHIVE_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def space_path(self) -> Path:
        return self.path / SPACE_FILE

    @property
    def name(self) -> str:
        return self.path.name

    def info(self) -> dict[str, Any]:
        return read_json_object(self.path / RUN_FILE, "run file", RunDirError)

    # ------------------------------------------------------------------------------------- create / open

    def overrides(self) -> dict[str, Any]:
        """Safe fields (dotted paths) that differ from space.yaml: what ``run``/``resume`` were asked for."""
        p = self.path / OVERRIDES_FILE
        if not p.is_file():
            return {}
        return read_json_object(p, "overrides file", RunDirError)

    def save_overrides(self, overrides: Mapping[str, Any]) -> None:
        try:
            write_json_atomic(self.path / OVERRIDES_FILE, dict(overrides))
        except OSError as exc:
            raise_if_disk_full(exc, self.path, 4096, OVERRIDES_FILE, self._resume_hint())
            raise

    @staticmethod
    def create(path: str | os.PathLike[str], space: Space, argv: list[str] | None = None,
               overrides: Mapping[str, Any] | None = None) -> RunDir:
        """Make a new run directory for ``space``; an existing one is refused (``evomerge resume`` continues it).

        ``overrides``: the safe fields the command line changed (kept in overrides.json). The input models are
        fingerprinted (archive meta ``fingerprints``) so a resume notices a changed model."""
        target = Path(path)
        RunDir.check_new(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            os.chmod(tmp, 0o755)
            (tmp / SPACE_FILE).write_text(space.text, encoding="utf-8")
            write_json_atomic(tmp / OVERRIDES_FILE, dict(overrides or {}))
            info = {
                "name": target.name,
                "created_at": time.time(),
                "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "space_path": str(space.path.resolve()) if space.path is not None else None,
                "space_dir": str((space.path.parent if space.path is not None else Path.cwd()).resolve()),
                "seed": space.seed,
                "versions": versions(),
                "argv": list(argv if argv is not None else sys.argv),
                "host": socket.gethostname(),
            }
            write_json_atomic(tmp / RUN_FILE, info)
            with Archive.create(tmp / ARCHIVE_FILE) as archive:
                archive.set_meta("models", {"base": str(space.base_path),
                                            **{k: str(v) for k, v in space.models.items()}})
                archive.set_meta("model_refs", dict(space.model_refs))
                archive.set_meta("space", space.comparable())
                archive.set_meta("seed", space.seed)
                archive.set_meta("fingerprints", fingerprint_models(space.model_paths()))
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(exc):
                raise disk_full_error(target.parent, 1 << 20, f"the new run directory {target}",
                                      "Nothing was created: free some space and run again") from None
            raise
        return RunDir(target)

    @staticmethod
    def check_new(path: str | os.PathLike[str]) -> None:
        """Refuse a run directory that exists already (``evomerge resume`` continues it)."""
        target = Path(path)
        if target.exists():
            raise RunDirError(f"run directory {target} already exists; continue it with `evomerge resume {target}` "
                              "or choose another --name")

    @staticmethod
    def open(path: str | os.PathLike[str]) -> RunDir:
        """An existing run directory (checked: it has a snapshot, a run file and an archive)."""
        p = Path(path)
        if not p.is_dir():
            raise RunDirError(f"run directory {p} does not exist")
        missing = [f for f in (SPACE_FILE, RUN_FILE, ARCHIVE_FILE) if not (p / f).is_file()]
        if missing:
            raise RunDirError(f"{p} is not an evomerge run directory (missing {', '.join(missing)})")
        return RunDir(p)

    def archive(self, readonly: bool = False) -> Archive:
        return Archive.open(self.archive_path, readonly=readonly)

    # ------------------------------------------------------------------------------------- lock

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock; a second process on the same run is refused with the holder's pid."""
        fh = open(self.path / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held for the block
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise RunDirError(f"{self.path} is being run by another evomerge process ({holder}); "
                              "wait for it or stop it first") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    # ------------------------------------------------------------------------------------- checkpoint

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Replace the checkpoint (JSON: plain numbers and strings, nothing that can run code) atomically:
        temporary file, fsync, rename. A full disk is a :class:`~evomerge.errors.DiskFullError`; the previous
        checkpoint is kept."""
        data = json.dumps(state, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
        try:
            fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", suffix=".tmp", dir=self.path)
        except OSError as exc:
            raise_if_disk_full(exc, self.path, len(data), "the optimizer checkpoint", self._resume_hint())
            raise
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            kill_point("checkpoint_write")
            os.replace(tmp, self.checkpoint_path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise_if_disk_full(exc, self.path, len(data), "the optimizer checkpoint", self._resume_hint())
            raise

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint's data (None: there is none). Never unpickles: an old ``checkpoint.pkl`` is not read.

        A checkpoint that is not valid JSON of this format raises :class:`CorruptCheckpoint` (the caller moves it
        aside with :meth:`set_checkpoint_aside` and rebuilds the optimizer from the archive)."""
        if not self.checkpoint_path.is_file():
            return None
        try:
            state = json.loads(self.checkpoint_path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CorruptCheckpoint(f"{self.checkpoint_path}: unreadable checkpoint ({type(exc).__name__}: "
                                    f"{exc})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise CorruptCheckpoint(f"{self.checkpoint_path}: not an evomerge checkpoint of format "
                                    f"{CHECKPOINT_FORMAT} (format {got!r})")
        return state

    def set_checkpoint_aside(self) -> Path:
        """Rename an unusable checkpoint out of the way (kept for inspection); returns its new path."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path / f"{CHECKPOINT_FILE}.unusable-{stamp}"
        n = 1
        while aside.exists():
            n += 1
            aside = self.path / f"{CHECKPOINT_FILE}.unusable-{stamp}-{n}"
        os.replace(self.checkpoint_path, aside)
        return aside

    @property
    def legacy_checkpoint_path(self) -> Path:
        """Where evomerge before format 2 pickled its optimizer (never read: unpickling can run code)."""
        return self.path / LEGACY_CHECKPOINT_FILE

    def _resume_hint(self) -> str:
        return f"`evomerge resume {self.path}`"

    def clean_temporaries(self) -> None:
        """Remove temporary files an interrupted checkpoint write left behind."""
        for tmp in self.path.glob(".checkpoint.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    # ------------------------------------------------------------------------------------- log

    def log(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"
        try:
            with open(self.path / LOG_FILE, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as exc:
            raise_if_disk_full(exc, self.path, len(line), LOG_FILE, self._resume_hint())
            raise
