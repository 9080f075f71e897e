"""Fingerprints of model folders: enough to notice a changed model without reading its weights.

A run records one per input model when it is created; ``resume`` compares them, so an archive never mixes scores
of two different models under one name (and an export never builds a winner from weights that were not scored).
Per file that loading reads (weights, configs, tokenizer files): its size, its modification time (ns) and a
SHA-256 of its safetensors header (names, dtypes, shapes, offsets) or, for other files, of its first MiB. The
modification time is what notices a fine-tune overwritten with weights of the same shapes; reading the 14 GB
of a 7B model on every resume is what this avoids. Light: no torch.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HEAD_BYTES = 1 << 20  # bytes hashed of a file that is not safetensors
_SUFFIXES = (".safetensors", ".json", ".model", ".tiktoken")
_NAMES = ("merges.txt", "vocab.txt")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


def _tracked(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and (p.suffix in _SUFFIXES or p.name in _NAMES)


def _content_hash(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        if p.suffix == ".safetensors":
            raw = fh.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if 0 <= n <= _MAX_HEADER:
                h.update(raw + fh.read(n))
                return "header:" + h.hexdigest()
            fh.seek(0)
        h.update(fh.read(HEAD_BYTES))
    return "head:" + h.hexdigest()


def fingerprint_folder(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """{file name: {size, mtime_ns, hash}} for the files of ``path`` that loading a model reads."""
    folder = Path(path)
    out: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if _tracked(p):
            st = p.stat()
            out[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": _content_hash(p)}
    return out


def fingerprint_models(paths: Mapping[str, str | os.PathLike[str]]) -> dict[str, dict[str, Any]]:
    """{model key: {path, files}} for each model folder."""
    return {key: {"path": str(p), "files": fingerprint_folder(p)} for key, p in paths.items()}


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def fingerprint_changes(stored: Mapping[str, Any], paths: Mapping[str, str | os.PathLike[str]]) -> list[str]:
    """What differs between ``stored`` fingerprints and the folders at ``paths`` now, one line per file
    (empty: the same models)."""
    problems: list[str] = []
    for key, entry in stored.items():
        if key not in paths:
            problems.append(f"model {key!r} ({entry.get('path')}) is no longer a model of the run")
            continue
        where = f"model {key!r} ({paths[key]})"
        if Path(paths[key]).resolve() != Path(str(entry.get("path"))).resolve():
            problems.append(f"{where} was at {entry.get('path')} when the run was created")
        old: Mapping[str, Any] = entry.get("files", {})
        new = fingerprint_folder(paths[key])
        for name in sorted(set(old) | set(new)):
            a, b = old.get(name), new.get(name)
            if a is None:
                problems.append(f"{where}: {name} was added")
            elif b is None:
                problems.append(f"{where}: {name} was removed")
            elif a["hash"] != b["hash"] or a["size"] != b["size"]:
                problems.append(f"{where}: {name} has other content (size {a['size']} -> {b['size']} bytes, "
                                f"modified {_when(b['mtime_ns'])})")
            elif a["mtime_ns"] != b["mtime_ns"]:
                problems.append(f"{where}: {name} was rewritten (modified {_when(a['mtime_ns'])} -> "
                                f"{_when(b['mtime_ns'])}; same size and header, so maybe other weights)")
    return problems
