"""Atomic file and folder writes: a crash leaves either the old content or the new, never half of it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, DiskFullError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def format_bytes(n: float) -> str:
    """``1.5 GB``-style sizes for messages."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def mount_point(path: str | os.PathLike[str]) -> Path:
    """The mount point of the file system holding ``path`` (its nearest existing ancestor)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def disk_full_error(path: str | os.PathLike[str], needed: int | None, what: str, then: str) -> DiskFullError:
    """The error for a write of ``what`` under ``path`` that found the disk full: which disk, how much is free,
    how much is needed, and ``then`` (what to do once space is freed)."""
    where = mount_point(path)
    try:
        usage = shutil.disk_usage(where)
        free = f"{format_bytes(usage.free)} free of {format_bytes(usage.total)}"
    except OSError:
        free = "free space unknown"
    need = f" needs about {format_bytes(needed)} more" if needed else " needs more space"
    return DiskFullError(f"no space left on the disk holding {Path(path)} (file system mounted at {where}, {free}): "
                         f"writing {what}{need}. {then}")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-space error: ENOSPC/EDQUOT, or SQLite's "database or disk is full"."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return code == 13 or (code is None and "database or disk is full" in str(exc))  # SQLITE_FULL


def raise_if_disk_full(exc: BaseException, path: str | os.PathLike[str], needed: int | None, what: str,
                       resume: str) -> None:
    """Raise :func:`disk_full_error` (from a run's write: nothing is lost, ``resume`` continues) if ``exc`` is one."""
    if isinstance(exc, DiskFullError):
        raise exc
    if is_disk_full(exc):
        raise disk_full_error(path, needed, what, f"Nothing is lost (every archived evaluation is kept): free "
                              f"some space, then continue with {resume}") from None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def refuse_replacing_inputs(target: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]],
                            what: str = "input") -> None:
    """Refuse to replace ``target`` when it is, or holds, one of ``inputs`` (replacing it deletes that input)."""
    out = Path(target).expanduser().resolve()
    if not out.exists():
        return
    for ref in inputs:
        p = Path(ref).expanduser().resolve()
        if p == out or out in p.parents:
            raise ConfigError(f"output folder {out} holds the {what} {ref}: replacing it would delete what it is "
                              "made from; write the output to another folder")


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``, on error it is removed.

    An existing ``path`` is refused unless ``overwrite``; then it is only removed once the new folder is
    complete, so a failed write never loses the old output.
    """

    target = Path(path).resolve()
    if target.exists() and not overwrite:
        raise ConfigError(f"output folder {target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output is a normal folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)
