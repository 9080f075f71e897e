"""Sharded safetensors output, written as tensors arrive, plus the config and tokenizer files of a model.

:class:`ShardedWriter` buffers tensors up to ``max_shard_size`` bytes and writes each full shard with
safetensors' ``save_file`` (zero-copy from the tensors' memory) under a temporary name; :meth:`finish`
renames them to their final names (``model.safetensors`` for one shard, else
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``). Readers never see a half-written
file. The folder as a whole is made atomic by the caller (``evomerge.atomic.atomic_output_dir``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from evomerge.atomic import write_bytes_atomic, write_json_atomic
from evomerge.dtypes import CODE_OF
from evomerge.errors import ConfigError, ModelError
from evomerge.files import read_json_object
from evomerge.models.folder import INDEX_NAME, SINGLE_NAME

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}


def _file_mode() -> int:
    """The mode a plain ``open`` would give (0644 under the usual umask); temp-file helpers make 0600."""
    old = os.umask(0o022)
    os.umask(old)
    return 0o666 & ~old


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Bytes from ``2GB`` / ``500MB`` / ``1.5GiB`` / an integer (decimal units as Hugging Face uses them)."""
    if isinstance(value, bool):
        raise ConfigError(f"size: expected a byte count such as 2GB or 500MB, got {value!r}")
    if isinstance(value, (int, float)):
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(f"size: cannot parse {value!r}; expected a byte count such as 2GB, 500MB or 1GiB")
        size = float(m.group(1)) * _UNITS[unit]
    else:
        raise ConfigError(f"size: expected a byte count such as 2GB or 500MB, got {value!r}")
    if not size >= 1 or size != size:
        raise ConfigError(f"size: must be at least 1 byte, got {value!r}")
    return int(size)


@dataclass
class WriteSummary:
    """What :meth:`ShardedWriter.finish` wrote."""

    out_dir: Path
    files: list[Path]
    num_tensors: int
    total_bytes: int
    seconds: float
    index: Path | None = None
    weight_map: dict[str, str] = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return len(self.files)


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(
                f"safetensors metadata must map strings to strings; got {key!r}: {value!r} ({type(value).__name__})"
            )
        out[key] = value
    out.setdefault("format", "pt")  # transformers refuses files without it
    return out


LayoutEntry = tuple[str, Sequence[int], torch.dtype]


@dataclass
class _Slot:
    """Where one planned tensor goes: shard index, absolute byte offset, expected shape and dtype."""

    shard: int
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class ShardedWriter:
    """Write tensors into ``out_dir`` as sharded safetensors.

    Two modes. Without ``layout``, tensors are buffered up to ``max_shard_size`` and each full shard is written
    with safetensors' ``save_file``; the writer keeps a reference to every buffered tensor, so callers must not
    modify a tensor in place after :meth:`add`. With ``layout`` (every output tensor's name, shape and dtype,
    known before merging), the shard headers are written up front and each tensor's bytes go straight to their
    place in its shard as it is added, in any order, by a background thread: no shard is held in memory and
    disk writes overlap the caller's computation (at most ``max_in_flight`` bytes are queued).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        max_shard_size: int | str = "5GB",
        metadata: Mapping[str, str] | None = None,
        *,
        fsync: bool = False,
        layout: Iterable[LayoutEntry] | None = None,
        max_in_flight: int | str = "256MB",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = _check_metadata(metadata)
        self.fsync = fsync
        self._mode = _file_mode()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # temp file, tensor names
        self._names: set[str] = set()
        self._total = 0
        self._start = time.perf_counter()
        self._finished = False
        self._slots: dict[str, _Slot] | None = None
        self._fds: list[int] = []
        self._tmp_paths: list[Path] = []
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: deque[tuple[Future[None], int]] = deque()
        self._inflight_bytes = 0
        self._max_in_flight = parse_size(max_in_flight)
        if layout is not None:
            self._plan(layout)

    # ------------------------------------------------------------------ planned (streaming) mode
    def _plan(self, layout: Iterable[LayoutEntry]) -> None:
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        seen: set[str] = set()
        for entry in layout:
            name, shape, dtype = entry
            if name in seen:
                raise ModelError(f"layout lists tensor {name!r} twice")
            if dtype not in CODE_OF:
                raise ModelError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            seen.add(name)
            shp = tuple(int(d) for d in shape)
            nbytes = math.prod(shp) * dtype.itemsize
            if shards[-1] and size + nbytes > self.max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, shp, dtype, nbytes))
            size += nbytes
        slots: dict[str, _Slot] = {}
        try:
            for i, entries in enumerate(shards):
                header: dict[str, Any] = {"__metadata__": self.metadata}
                pos = 0
                for name, shp, dtype, nbytes in entries:
                    header[name] = {"dtype": CODE_OF[dtype], "shape": list(shp), "data_offsets": [pos, pos + nbytes]}
                    pos += nbytes
                raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
                raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data, as safetensors writes it
                base = 8 + len(raw)
                path = self.out_dir / f".shard-{i + 1:05d}.safetensors.tmp"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), self._mode)
                self._fds.append(fd)
                self._tmp_paths.append(path)
                _pwrite_all(fd, struct.pack("<Q", len(raw)) + raw, 0)
                os.ftruncate(fd, base + pos)
                start = base
                for name, shp, dtype, nbytes in entries:
                    slots[name] = _Slot(i, start, shp, dtype, nbytes)
                    start += nbytes
        except BaseException:
            self.abort()
            raise
        self._slots = slots
        self._written = [(p, [n for n, *_ in entries]) for p, entries in zip(self._tmp_paths, shards)]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-writer")

    def _add_planned(self, name: str, tensor: torch.Tensor) -> None:
        assert self._slots is not None and self._pool is not None
        slot = self._slots.get(name)
        if slot is None:
            raise ModelError(f"tensor {name!r} is not in the planned layout of the output in {self.out_dir}")
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ModelError(
                f"tensor {name!r}: got shape {tuple(tensor.shape)} {tensor.dtype}, the planned layout says "
                f"{slot.shape} {slot.dtype}"
            )
        self._names.add(name)
        self._total += slot.nbytes
        if slot.nbytes == 0:
            return
        while self._inflight and self._inflight_bytes + slot.nbytes > self._max_in_flight:
            self._wait_oldest()
        fut = self._pool.submit(_write_tensor, self._fds[slot.shard], tensor, slot.offset)
        self._inflight.append((fut, slot.nbytes))
        self._inflight_bytes += slot.nbytes

    def _wait_oldest(self) -> None:
        fut, nbytes = self._inflight.popleft()
        self._inflight_bytes -= nbytes
        fut.result()

    def _drain(self) -> None:
        while self._inflight:
            self._wait_oldest()

    # ------------------------------------------------------------------ adding
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; a full shard is written to disk before the tensor that would overflow it."""
        if self._finished:
            raise RuntimeError("ShardedWriter.add after finish")
        if not isinstance(name, str) or not name:
            raise ModelError(f"tensor name must be a non-empty string, got {name!r}")
        if name in self._names:
            raise ModelError(f"tensor {name!r} added twice to the output in {self.out_dir}")
        if not isinstance(tensor, torch.Tensor):
            raise ModelError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        if self._slots is not None:
            self._add_planned(name, tensor)
            return
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._names.add(name)
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self._total += nbytes

    def add_all(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        for name, tensor in items:
            self.add(name, tensor)

    def _flush(self) -> None:
        if not self._pending:
            return
        tensors = self._pending
        # save_file refuses tensors that share memory (views of one buffer): give each its own storage
        seen: set[int] = set()
        for key, t in tensors.items():
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in seen:
                tensors[key] = t.clone()
            else:
                seen.add(ptr)
        path = self.out_dir / f".shard-{len(self._written) + 1:05d}.safetensors.tmp"
        try:
            save_file(tensors, str(path), metadata=self.metadata)
            os.chmod(path, self._mode)
            if self.fsync:
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        self._written.append((path, list(tensors)))
        self._pending = {}
        self._pending_bytes = 0

    # ------------------------------------------------------------------ finishing
    def finish(self) -> WriteSummary:
        """Write the last shard, give every shard its final name and write the index (when sharded)."""
        if self._finished:
            raise RuntimeError("ShardedWriter.finish called twice")
        try:
            if self._slots is not None:
                self._finish_planned()
            self._flush()
            if not self._written:
                # an empty model is still a valid (empty) safetensors file
                save_file({}, str(self.out_dir / ".shard-00001.safetensors.tmp"), metadata=self.metadata)
                os.chmod(self.out_dir / ".shard-00001.safetensors.tmp", self._mode)
                self._written.append((self.out_dir / ".shard-00001.safetensors.tmp", []))
            n = len(self._written)
            weight_map: dict[str, str] = {}
            files: list[Path] = []
            for i, (tmp, names) in enumerate(self._written, start=1):
                final = self.out_dir / (SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
                os.replace(tmp, final)
                files.append(final)
                for name in names:
                    weight_map[name] = final.name
            index_path: Path | None = None
            if n > 1:
                index_path = self.out_dir / INDEX_NAME
                meta: dict[str, Any] = {k: v for k, v in self.metadata.items() if k != "format"}
                meta["total_size"] = self._total
                write_json_atomic(index_path, {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))})
                os.chmod(index_path, self._mode)
        except BaseException:
            self.abort()
            raise
        self._finished = True
        return WriteSummary(
            out_dir=self.out_dir,
            files=files,
            num_tensors=len(weight_map),
            total_bytes=self._total,
            seconds=time.perf_counter() - self._start,
            index=index_path,
            weight_map=weight_map,
        )

    def _finish_planned(self) -> None:
        assert self._slots is not None
        self._drain()
        missing = [n for n in self._slots if n not in self._names]
        if missing:
            raise ModelError(
                f"output in {self.out_dir}: {len(missing)} planned tensor(s) were never added, e.g. {missing[0]!r}"
            )
        if self.fsync:
            for fd in self._fds:
                os.fsync(fd)
        self._close_fds()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def abort(self) -> None:
        """Drop buffered tensors and delete temporary shards (final files are the caller's folder to remove)."""
        while self._inflight:
            fut, _ = self._inflight.popleft()
            fut.cancel()
            with contextlib.suppress(BaseException):
                fut.result()
        self._inflight_bytes = 0
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._close_fds()
        for tmp in self._tmp_paths:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._pending = {}
        self._pending_bytes = 0
        for tmp, _ in self._written:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._finished = True

    @property
    def num_tensors(self) -> int:
        return len(self._names)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None and not self._finished:
            self.abort()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _write_tensor(fd: int, tensor: torch.Tensor, offset: int) -> None:
    """Write a contiguous CPU tensor's bytes at ``offset`` (runs in the writer thread; pwrite drops the GIL)."""
    _pwrite_all(fd, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), offset)


# ---------------------------------------------------------------------- auxiliary files
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILES: tuple[str, ...] = ("config.json", "generation_config.json")
_NEVER = (".py", ".pyc", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")


def copy_model_files(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    include_config: bool = True,
    include_tokenizer: bool = True,
    config_updates: Mapping[str, Any] | None = None,
) -> list[str]:
    """Copy config, generation config and tokenizer files (never weights or code) from ``src`` to ``dst``.

    ``config_updates`` sets keys of the copied config.json (e.g. ``{"dtype": "bfloat16"}``); ``auto_map``
    is dropped because the remote code it names is not copied. Returns the copied file names.
    """
    src_dir, dst_dir = Path(src), Path(dst)
    if not src_dir.is_dir():
        raise ModelError(f"model folder {src_dir} does not exist")
    dst_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    if include_config:
        names += list(MODEL_FILES)
    if include_tokenizer:
        names += list(TOKENIZER_FILES)
        names += sorted(
            p.name for p in src_dir.glob("chat_template*") if p.name not in names and p.is_file()
        )
    copied: list[str] = []
    for name in names:
        source = src_dir / name
        if not source.is_file() or name.endswith(_NEVER):
            continue
        if name == "config.json":
            config = read_json_object(source, "model config", ModelError)
            config.pop("auto_map", None)
            config.update(dict(config_updates or {}))
            write_bytes_atomic(dst_dir / name, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
            os.chmod(dst_dir / name, _file_mode())
        else:
            tmp = dst_dir / f".{name}.tmp"
            shutil.copyfile(source, tmp)  # follows symlinks (hub caches link to blobs)
            os.replace(tmp, dst_dir / name)
        copied.append(name)
    if include_config and "config.json" not in copied:
        raise ModelError(f"model folder {src_dir} has no config.json to copy")
    return copied
