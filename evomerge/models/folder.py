"""Hugging Face model folders read lazily, one tensor at a time, from safetensors only.

Headers are parsed and validated when the folder is opened (so a corrupt file is refused before any work),
shapes and dtypes come from the header without touching data, and :meth:`ModelFolder.get` reads one tensor
with ``os.pread`` straight into a freshly allocated tensor (or a caller's reused buffer): one copy from the
page cache, no memory map, so the resident set stays bounded by what the caller keeps (a memory-mapped read
leaves every touched page of every input in the resident set until the file is closed). Reads that change
the dtype convert chunk by chunk, never holding a full-size copy in the stored dtype. ``pread`` is
thread-safe, so engines may read several tensors concurrently from one folder. Nothing from the folder is ever executed: pickled weights are
refused and ``config.json`` is parsed as JSON only.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.dtypes import SAFETENSORS_CODES
from evomerge.errors import ModelError
from evomerge.files import read_json
from evomerge.models.layers import LayerMap

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_SHARD_RE = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")



@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, byte range (absolute), dtype and shape."""

    name: str
    file: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _Shard:
    """One safetensors file: validated header and an open descriptor for ``pread``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._map: mmap.mmap | None = None
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ModelError(f"cannot open safetensors file {path}: {exc.strerror}") from exc
        if hasattr(os, "posix_fadvise"):  # tensors are mostly read front to back: ask for more readahead
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _corrupt(self, why: str) -> ModelError:
        return ModelError(f"corrupt safetensors file {self.path}: {why}")

    def _parse(self) -> None:
        assert self.fd is not None
        size = os.fstat(self.fd).st_size
        if size < 8:
            raise self._corrupt(f"only {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        if n > _MAX_HEADER or 8 + n > size:
            raise self._corrupt(f"header length {n} does not fit the file size {size}")
        raw = os.pread(self.fd, n, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(f"header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise self._corrupt("__metadata__ is not an object")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        base = 8 + n
        data_len = size - base
        spans: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            if not isinstance(entry, dict):
                raise self._corrupt(f"tensor {name!r}: entry is not an object")
            code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if code not in SAFETENSORS_CODES:
                raise self._corrupt(f"tensor {name!r}: unsupported dtype {code!r}")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise self._corrupt(f"tensor {name!r}: invalid shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
                raise self._corrupt(f"tensor {name!r}: invalid data_offsets {offsets!r}")
            begin, end = offsets
            dtype = SAFETENSORS_CODES[code]
            expected = math.prod(shape) * dtype.itemsize
            if not 0 <= begin <= end <= data_len:
                raise self._corrupt(
                    f"tensor {name!r}: data_offsets {offsets} outside the {data_len}-byte data section "
                    "(file truncated?)"
                )
            if end - begin != expected:
                raise self._corrupt(
                    f"tensor {name!r}: {end - begin} bytes for shape {tuple(shape)} {code} (expected {expected})"
                )
            spans.append((begin, end, name))
            self.tensors[name] = TensorInfo(name, self.path, base + begin, base + end, dtype, tuple(shape))
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                raise self._corrupt(f"tensor {name!r}: data_offsets start at {begin}, expected {pos} (overlap or gap)")
            pos = end
        if pos != data_len:
            raise self._corrupt(f"data section is {data_len} bytes but the tensors cover {pos}")

    def read(self, info: TensorInfo, rows: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (or its first ``rows`` rows, a contiguous prefix) into a new CPU tensor, or into
        ``out`` (contiguous CPU, the stored dtype and the read shape)."""
        if self.fd is None:
            raise ModelError(f"safetensors file {self.path} was closed")
        shape = read_shape(info, rows)
        nbytes = math.prod(shape) * info.dtype.itemsize
        if out is None:
            out = torch.empty(shape, dtype=info.dtype)
        if nbytes == 0:
            return out
        self._pread(memoryview(out.view(-1).view(torch.uint8).numpy()), info.start, info.name)
        return out

    def read_range(self, info: TensorInfo, begin: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``begin .. begin + out.numel()`` of the flattened tensor into ``out`` (contiguous CPU, the
        stored dtype)."""
        if self.fd is None:
            raise ModelError(f"safetensors file {self.path} was closed")
        size = info.dtype.itemsize
        if begin < 0 or info.start + (begin + out.numel()) * size > info.end:
            raise ModelError(f"tensor {info.name!r}: elements {begin}..{begin + out.numel()} are out of range")
        if out.numel():
            self._pread(memoryview(out.view(-1).view(torch.uint8).numpy()), info.start + begin * size, info.name)
        return out

    def read_converted(self, info: TensorInfo, rows: int | None, out: torch.Tensor) -> torch.Tensor:
        """Read into a contiguous CPU ``out`` of another dtype, converting chunk by chunk through a small
        per-thread staging buffer: no full-size intermediate in the stored dtype is allocated."""
        if self.fd is None:
            raise ModelError(f"safetensors file {self.path} was closed")
        flat = out.view(-1)
        n = flat.numel()
        size = info.dtype.itemsize
        step = max(1, _CHUNK_BYTES // size)
        staging = _staging(min(n, step) * size)
        for begin in range(0, n, step):
            count = min(step, n - begin)
            chunk = staging[: count * size]
            self._pread(memoryview(chunk.numpy()), info.start + begin * size, info.name)
            src = chunk.view(info.dtype)
            # convert in pieces below torch's parallel grain: a thread-pool dispatch per piece costs far more
            # than the conversion on a loaded machine, and one thread converts faster than memory is read
            for j in range(0, count, _CONVERT_ELEMS):
                flat[begin + j : begin + min(count, j + _CONVERT_ELEMS)].copy_(src[j : j + _CONVERT_ELEMS])
        return out

    def mapped(self, info: TensorInfo, rows: int | None = None) -> torch.Tensor:
        """A zero-copy CPU view of one tensor (or its first ``rows`` rows) over a private memory map of the file.

        The pages stay in the page cache, shared with every process mapping the file; the view must only be
        read. A tensor whose offset is not aligned to its element size is read with ``pread`` instead.
        """
        if self.fd is None:
            raise ModelError(f"safetensors file {self.path} was closed")
        shape = read_shape(info, rows)
        count = math.prod(shape)
        size = info.dtype.itemsize
        if count == 0 or info.start % size:
            return self.read(info, rows)
        if self._map is None:
            # ACCESS_COPY: a writable private mapping, so torch can wrap it without a read-only warning;
            # nothing is ever written, so every page stays shared with the page cache
            self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
        return torch.frombuffer(self._map, dtype=info.dtype, count=count, offset=info.start).view(shape)

    def _pread(self, view: memoryview, offset: int, name: str) -> None:
        assert self.fd is not None
        done, nbytes = 0, len(view)
        while done < nbytes:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise ModelError(
                    f"safetensors file {self.path}: unexpected end of file reading tensor {name!r} "
                    "(was the file changed while open?)"
                )
            done += got

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # views still alive keep the map until they are dropped
                self._map.close()
            self._map = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


_CHUNK_BYTES = 4 * 1024 * 1024
_CONVERT_ELEMS = 16384
_local = threading.local()


def _staging(nbytes: int) -> torch.Tensor:
    """This thread's reusable byte buffer of at least ``nbytes`` (at most one chunk)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        _local.buf = buf
    return buf


def read_shape(info: TensorInfo, rows: int | None) -> tuple[int, ...]:
    """The shape :meth:`ModelFolder.get` returns for ``rows`` (a row prefix; the whole tensor when None)."""
    if rows is not None and info.shape and rows < info.shape[0]:
        return (max(rows, 0), *info.shape[1:])
    return info.shape


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, what, ModelError)


class ModelFolder:
    """A model folder opened for lazy reading. Use :meth:`open`; close with :meth:`close` or ``with``."""

    def __init__(self, path: Path, config: dict[str, Any], shards: list[_Shard]) -> None:
        self.path = path
        self.config = config
        self._shards = shards
        self._lock = threading.Lock()
        infos: dict[str, TensorInfo] = {}
        for shard in shards:
            infos.update(shard.tensors)
        self._infos = infos
        self._shard_of: dict[Path, _Shard] = {s.path: s for s in shards}
        # file order (shard, offset): reading in this order is sequential on disk
        self._names = tuple(sorted(infos, key=lambda n: (str(infos[n].file), infos[n].start)))
        self._aliases = self._tied_aliases()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModelFolder:
        """Open ``path`` (a folder with config.json and safetensors weights); raises :class:`ModelError`."""
        folder = Path(path).expanduser()
        if not folder.exists():
            raise ModelError(f"model folder {folder} does not exist")
        if not folder.is_dir():
            raise ModelError(f"model path {folder} is not a folder (expected a Hugging Face model folder)")
        folder = folder.resolve()
        config = _read_json(folder / "config.json", "model config")
        if not isinstance(config, dict):
            raise ModelError(f"model config {folder / 'config.json'} is not a JSON object")
        files, wanted = cls._weight_files(folder)
        shards: list[_Shard] = []
        try:
            for f in files:
                shards.append(_Shard(f))
            seen: dict[str, Path] = {}
            for shard in shards:
                for name in shard.tensors:
                    if name in seen:
                        raise ModelError(
                            f"model {folder}: tensor {name!r} appears in both {seen[name].name} and {shard.path.name}"
                        )
                    seen[name] = shard.path
            if wanted is not None:
                cls._check_index(folder, wanted, shards)
        except BaseException:
            for shard in shards:
                shard.close()
            raise
        return cls(folder, config, shards)

    @staticmethod
    def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
        """Safetensors files to open and, for an indexed checkpoint, its weight_map."""
        index_path = folder / INDEX_NAME
        if index_path.exists():
            index = _read_json(index_path, "safetensors index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise ModelError(f"safetensors index {index_path} has no valid 'weight_map' (tensor -> file)")
            files: list[Path] = []
            for shard_name in sorted(set(weight_map.values())):
                # plain names only; the files themselves may be symlinks (Hugging Face cache snapshots)
                if Path(shard_name).name != shard_name or shard_name in ("", ".", ".."):
                    raise ModelError(f"safetensors index {index_path} points outside the folder: {shard_name!r}")
                shard_path = folder / shard_name
                if not shard_path.is_file():
                    tensors = sorted(k for k, v in weight_map.items() if v == shard_name)
                    raise ModelError(
                        f"model {folder}: shard {shard_name} listed in {INDEX_NAME} is missing "
                        f"(it should hold {len(tensors)} tensors, e.g. {tensors[0]!r})"
                    )
                files.append(shard_path)
            return files, weight_map
        single = folder / SINGLE_NAME
        if single.is_file():
            return [single], None
        found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        sharded = [p for p in found if _SHARD_RE.match(p.name)]
        if sharded:
            # shards without their index: usable when the set is complete
            totals = {int(_SHARD_RE.match(p.name).group(2)) for p in sharded}  # type: ignore[union-attr]
            if len(totals) != 1 or len(sharded) != next(iter(totals)):
                raise ModelError(
                    f"model {folder} has no {INDEX_NAME} and an incomplete set of shards: "
                    f"{', '.join(p.name for p in sharded)}"
                )
            return sharded, None
        if found:
            raise ModelError(
                f"model {folder} has safetensors files ({', '.join(p.name for p in found[:5])}) but not in the "
                f"Hugging Face layout: expected {SINGLE_NAME} or {INDEX_NAME} with its shards"
            )
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickled:
            raise ModelError(
                f"model {folder} has only pickled weights ({', '.join(pickled[:5])}); evomerge reads safetensors "
                "only, because loading a pickle can run arbitrary code. Convert it once in a trusted environment: "
                "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)` "
                "(transformers), then remove the .bin files"
            )
        raise ModelError(f"model {folder} has no safetensors weights (no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors)")

    @staticmethod
    def _check_index(folder: Path, weight_map: dict[str, str], shards: list[_Shard]) -> None:
        by_name = {s.path.name: s for s in shards}
        for tensor, shard_name in weight_map.items():
            shard = by_name[Path(shard_name).name]
            if tensor not in shard.tensors:
                raise ModelError(
                    f"model {folder}: {INDEX_NAME} puts tensor {tensor!r} in {shard_name}, which does not contain it"
                )
        listed = set(weight_map)
        for shard in shards:
            extra = sorted(set(shard.tensors) - listed)
            if extra:
                raise ModelError(
                    f"model {folder}: {shard.path.name} holds tensor {extra[0]!r} that {INDEX_NAME} does not list"
                )

    # ------------------------------------------------------------------ queries
    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Names stored in the files, in file order (shard, offset)."""
        return self._names

    def has(self, name: str) -> bool:
        """True when ``name`` is stored in the files (a tied head left out by transformers is not)."""
        return name in self._infos

    def resolve(self, name: str) -> str:
        """The stored name to read for ``name``: itself, or the embedding for a tied head left out of the files."""
        if name in self._infos:
            return name
        alias = self._aliases.get(name)
        if alias is not None:
            return alias
        raise ModelError(f"model {self.path} has no tensor {name!r}")

    def info(self, name: str) -> TensorInfo:
        return self._infos[self.resolve(name)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    @property
    def num_parameters(self) -> int:
        """Elements over the stored tensors (a tied head left out of the files is counted once, as stored)."""
        return sum(i.numel for i in self._infos.values())

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def tied_embeddings(self) -> bool:
        """config ``tie_word_embeddings``; when absent, whether the head is left out while the embedding is stored."""
        value = self._config_tie()
        return value if value is not None else bool(self._aliases)

    def _config_tie(self) -> bool | None:
        value = self.config.get("tie_word_embeddings")
        if value is None and isinstance(self.config.get("text_config"), dict):
            value = self.config["text_config"].get("tie_word_embeddings")
        return value if isinstance(value, bool) else None

    @property
    def tied_aliases(self) -> dict[str, str]:
        """{head name: embedding name} for a tied head that the files leave out."""
        return dict(self._aliases)

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors metadata of the first file."""
        return dict(self._shards[0].metadata) if self._shards else {}

    def _tied_aliases(self) -> dict[str, str]:
        value = self._config_tie()
        try:
            layer_map = LayerMap.from_config(self.config)
        except ModelError:
            return {}
        names = set(self._infos)
        head, embed = layer_map.tied_pair(names)
        if head in names or embed is None:
            return {}
        if value is False:
            return {}
        return {head: embed}

    def layer_map(self) -> Any:
        """The :class:`~evomerge.models.layers.LayerMap` of this model's config."""

        return LayerMap.from_config(self.config)

    # ------------------------------------------------------------------ reading
    def get(
        self,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        rows: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Read one tensor (a new tensor the caller owns), optionally its first ``rows`` rows only.

        ``dtype`` conversion happens on ``device`` (faster on a GPU); no copy is made when neither
        device nor dtype change. ``out`` (any device/dtype, the read shape) receives the values instead of a
        new tensor: reusing buffers avoids the page faults of fresh allocations, which cost more than
        the read itself for large tensors; a contiguous CPU ``out`` of the stored dtype is read into directly.
        """
        info = self.info(name)
        shard = self._shard_of[info.file]
        if out is not None:
            shape = read_shape(info, rows)
            if tuple(out.shape) != shape:
                raise ModelError(
                    f"model {self.path}: tensor {name!r} reads as shape {shape}, but out has shape {tuple(out.shape)}"
                )
            if out.device.type == "cpu" and out.is_contiguous():
                if out.dtype == info.dtype:
                    return shard.read(info, rows, out)
                return shard.read_converted(info, rows, out)
            out.copy_(shard.read(info, rows))
            return out
        dev = torch.device(device)
        if dev.type == "cpu" and dtype is not None and dtype != info.dtype:
            return shard.read_converted(info, rows, torch.empty(read_shape(info, rows), dtype=dtype))
        tensor = shard.read(info, rows)
        if dev.type != "cpu":
            tensor = tensor.to(dev, non_blocking=False)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def mapped(self, name: str, rows: int | None = None) -> torch.Tensor:
        """One tensor as a read-only CPU view of the memory-mapped file (no copy; the page cache holds it), in
        its stored dtype; the resident merger's ``disk`` tier reads through this."""
        info = self.info(name)
        return self._shard_of[info.file].mapped(info, rows)

    def read_range(self, name: str, begin: int, out: torch.Tensor) -> torch.Tensor:
        """A piece of one tensor: flattened elements ``begin .. begin + out.numel()`` into ``out`` (contiguous
        CPU, the stored dtype), for engines that merge large tensors piece by piece in cache."""
        info = self.info(name)
        if out.dtype != info.dtype or out.device.type != "cpu" or not out.is_contiguous():
            raise ModelError(f"model {self.path}: tensor {name!r} is {info.dtype}; read_range needs a contiguous "
                             f"CPU buffer of that dtype, got {out.dtype} on {out.device}")
        return self._shard_of[info.file].read_range(info, begin, out)

    def iter_tensors(
        self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every stored tensor, in file order, one at a time."""
        for name in self._names:
            yield name, self.get(name, device=device, dtype=dtype)

    def state_dict(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every stored tensor at once (for small models and tests; merging streams with :meth:`get`)."""
        return dict(self.iter_tensors(device, dtype))

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        with self._lock:
            for shard in self._shards:
                shard.close()

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            for shard in self._shards:
                shard.close()
        except Exception:  # noqa: BLE001
            pass

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickle as the path: the receiving process reopens (and revalidates) the folder."""
        return (ModelFolder.open, (str(self.path),))

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r}, tensors={len(self._names)}, files={len(self._shards)})"

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._infos


def open_model(path: str | os.PathLike[str] | ModelFolder) -> ModelFolder:
    """Accept a folder or a path (convenience for callers that take either)."""
    return path if isinstance(path, ModelFolder) else ModelFolder.open(path)


@dataclass(frozen=True)
class FolderLayout:
    """A model folder's config and its tensors' dtypes and shapes, read from the headers alone.

    For planning (``evomerge plan``): it needs no tensor data, so it also reads a config-only stand-in whose
    safetensors files hold headers and no weights; nothing here validates the data sections.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]

    def nbytes(self, name: str, dtype: torch.dtype | None = None) -> int:
        stored, shape = self.tensors[name]
        return math.prod(shape) * (dtype or stored).itemsize

    def total_bytes(self, dtype: torch.dtype | None = None) -> int:
        return sum(self.nbytes(n, dtype) for n in self.tensors)


def header_tensors(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from one safetensors file's header (the data section is not read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelError(f"corrupt safetensors file {path}: too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise ModelError(f"corrupt safetensors file {path}: header length {n} exceeds the format's limit")
            raw = fh.read(n)
    except OSError as exc:
        raise ModelError(f"cannot read safetensors file {path}: {exc.strerror}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"corrupt safetensors file {path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelError(f"corrupt safetensors file {path}: header is not a JSON object")
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        code = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if code not in SAFETENSORS_CODES or not (isinstance(shape, list) and all(isinstance(d, int) for d in shape)):
            raise ModelError(f"corrupt safetensors file {path}: tensor {name!r} has dtype {code!r}, shape {shape!r}")
        out[name] = (SAFETENSORS_CODES[code], tuple(shape))
    return out


def read_layout(path: str | os.PathLike[str]) -> FolderLayout:
    """The :class:`FolderLayout` of a model folder (config.json and the safetensors headers only)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    config = _read_json(folder / "config.json", "model config")
    if not isinstance(config, dict):
        raise ModelError(f"model config {folder / 'config.json'} is not a JSON object")
    files, _ = ModelFolder._weight_files(folder)
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for f in files:
        tensors.update(header_tensors(f))
    return FolderLayout(folder.resolve(), config, tensors)
