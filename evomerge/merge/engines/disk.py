"""The streaming merge engine: model folders on disk -> merged model folder on disk, one tensor at a time.

Everything is checked before any work (recipe against its method, models against each other, output folder),
so bad input never leaves an output folder behind; the output is written in a temporary sibling folder and
renamed when complete (:func:`evomerge.atomic.atomic_output_dir`).

Speed: a pool of worker threads (one per CPU thread torch would use) each reads a tensor's inputs with
``pread`` and runs the kernel on it single-threaded, while the main thread hands finished tensors, in order,
to the shard writer: reading, computing and writing overlap (torch and ``pread`` release the GIL), and the
parts of a kernel torch runs on one core (top-k selection, compaction) no longer leave the other cores idle.
Inputs stay in their stored dtype until the kernel converts them (float32 per tensor, never the whole model).

Methods whose kernels stream (``MergeMethod.streams``: task arithmetic, TIES, DARE, Breadcrumbs) never load a
tensor whole: the kernel reads each input piece by piece straight from the files (:class:`FileSource`, a
``pread`` into a small reused buffer) as often as its passes need (page cache, not process memory) and writes
the merged pieces into the output tensor, in the output dtype. Memory per tensor in flight is then its output
plus the kernel's piece buffers (``memory_budget``), whatever the vocabulary; other methods hold the tensor's
inputs and work buffers. At most ``workers + 1`` tensors are in flight.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from evomerge import __version__
from evomerge.atomic import atomic_output_dir
from evomerge.dtypes import dtype_name, parse_dtype
from evomerge.errors import ConfigError, ModelError
from evomerge.merge.calibration.rows import CalibrationSet
from evomerge.merge.formats.layer_stack import LayerStack
from evomerge.merge.formats.recipe_yaml import RECIPE_FILE, recipe_yaml
from evomerge.merge.kernels.pieces import CpuShare, ranges
from evomerge.merge.methods.registry import get_method
from evomerge.merge.methods.resolve import check_recipe, plan_inputs
from evomerge.merge.plan import MergePlan
from evomerge.merge.recipe import Recipe
from evomerge.models.adapter import Source, open_weights, source_ref
from evomerge.models.compat import check_compatible
from evomerge.models.folder import ModelFolder, read_shape
from evomerge.models.layers import LayerMap
from evomerge.models.writer import ShardedWriter, copy_model_files, parse_size

DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclasses.dataclass(frozen=True)
class MergeSummary:
    """What a merge wrote and what it cost."""

    out_dir: Path
    tensors: int
    bytes: int
    seconds: float
    peak_rss_bytes: int
    peak_cuda_bytes: int | None = None
    method: str = ""

    def line(self) -> str:
        """One line for the CLI: tensors, bytes, seconds, peak memory."""
        text = (f"merged {self.tensors} tensors, {self.bytes / 1e9:.3f} GB, in {self.seconds:.2f} s; "
                f"peak RSS {self.peak_rss_bytes / 1e9:.2f} GB")
        if self.peak_cuda_bytes is not None:
            text += f", peak CUDA {self.peak_cuda_bytes / 1e9:.2f} GB"
        return text + f" -> {self.out_dir}"


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru if sys.platform == "darwin" else ru * 1024)


# ------------------------------------------------------------------------------------------- inputs


@dataclass
class DiskInputs:
    """The recipe's model folders opened and checked against each other before any tensor is read."""

    plan: MergePlan
    folders: dict[str, Source]  # plan key -> model folder, or a LoRA adapter over the recipe's base
    reference: Source  # whose config, layer map and tensor names rule (the base, else the first input)
    tensor_names: list[str]
    vocab_slices: Mapping[str, int]

    def read(self, key: str, name: str, device: str) -> torch.Tensor:
        """One input tensor; under the opt-in vocabulary policy only the base vocabulary's rows are read."""
        return self.folders[key].get(name, device=device, rows=self.vocab_slices.get(name))

    def source(self, key: str, name: str, device: str = "cpu") -> FileSource:
        """One input tensor as a kernel source, read piece by piece (the vocabulary policy's rows only)."""
        return FileSource(self.folders[key], name, self.vocab_slices.get(name), device)

    def task_vectors(self, device: str) -> Callable[[], Iterator[Sequence[torch.Tensor]]]:
        """Task vectors piece by piece, tensor by tensor, in float32 (for the global TIES thresholds), read again
        on each call; pieces of :data:`TASK_VECTOR_PIECE` elements, so no tensor is loaded whole."""
        def gen() -> Iterator[Sequence[torch.Tensor]]:
            assert self.plan.base_key is not None
            for name in self.tensor_names:
                base = self.source(self.plan.base_key, name, device)
                models = [self.source(k, name, device) for k in self.plan.input_keys]
                for start, stop in ranges(base.numel(), TASK_VECTOR_PIECE):
                    b = base.read(start, stop).to(torch.float32)
                    yield [m.read(start, stop).to(torch.float32, copy=True).sub_(b) for m in models]
        return gen

    def close(self) -> None:
        for folder in self.folders.values():
            folder.close()


TASK_VECTOR_PIECE = 1 << 20


class FileSource:
    """One tensor of a model folder as a :class:`~evomerge.merge.kernels.pieces.Source`: each ``read`` is a
    ``pread`` of a flat range into a reused buffer (moved to ``device`` when that is not the CPU).

    ``rows``: read only the first rows (the vocabulary policy's slice: a prefix of the flat tensor).
    """

    def __init__(self, folder: ModelFolder, name: str, rows: int | None = None, device: str = "cpu") -> None:
        info = folder.info(name)
        self.folder = folder
        self.name = name
        self._rows = rows
        self._shape = torch.Size(read_shape(info, rows))
        self._dtype = info.dtype
        self._device = torch.device(device)
        self._buf: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def numel(self) -> int:
        return self._shape.numel()

    def read(self, start: int, stop: int) -> torch.Tensor:
        if not 0 <= start <= stop <= self.numel():
            raise ModelError(f"tensor {self.name!r}: elements {start}..{stop} outside its {self.numel()}")
        m = stop - start
        if self._buf is None or self._buf.numel() < m:
            self._buf = torch.empty(m, dtype=self._dtype)
        piece = self.folder.read_range(self.name, start, self._buf[:m])
        return piece if self._device.type == "cpu" else piece.to(self._device)

    def clone(self) -> FileSource:
        """Another reader of the same tensor, with its own buffer (``pread`` needs no shared file position)."""
        return FileSource(self.folder, self.name, self._rows, str(self._device))


def open_inputs(recipe: Recipe, *, vocab_policy: str = "refuse", where: str = "recipe") -> DiskInputs:
    """Check the recipe, open its models and check them against each other; no tensor is read.

    A model that is a LoRA adapter folder is read over the recipe's base (``BASE+ADAPTER`` names its own; with
    no base in the recipe, the local model its ``base_model_name_or_path`` names).
    """
    if vocab_policy not in ("refuse", "slice_to_base"):
        raise ConfigError(f"vocab_policy: {vocab_policy!r} is not one of ['refuse', 'slice_to_base']")
    method = check_recipe(recipe, get_method(recipe.method), where)  # before any folder is opened
    inputs = plan_inputs(recipe, method)
    keys = list(dict.fromkeys(([inputs.base] if inputs.base else []) + list(inputs.models)))
    folders: dict[str, Source] = {}
    try:
        for k in keys:  # the base first: adapters are read over it
            base = folders.get(inputs.base) if inputs.base is not None and k != inputs.base else None
            folders[k] = open_weights(k, base=base if isinstance(base, ModelFolder) else None)
    except BaseException:
        for folder in folders.values():
            folder.close()
        raise
    try:
        reference = folders[inputs.base if inputs.base is not None else inputs.models[0]]
        report = check_compatible(reference, [f for f in folders.values() if f is not reference],
                                  vocab_policy=vocab_policy)
        plan = MergePlan.of(recipe, method, LayerMap.from_config(reference.config), where)
    except BaseException:
        for folder in folders.values():
            folder.close()
        raise
    return DiskInputs(plan, folders, reference, list(report.tensor_names),
                      dict(getattr(report, "vocab_slices", None) or {}))


# ------------------------------------------------------------------------------------------- the engine


def merge_to_disk(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    seed: int | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    vocab_policy: str = "refuse",
    progress: bool = True,
    where: str = "recipe",
    workers: int | None = None,
    calibration: CalibrationSet | None = None,
    base_scores: Mapping[str, float] | None = None,
    memory_budget: str | int | None = None,
) -> MergeSummary:
    """Merge the recipe's models into ``out_dir`` (sharded safetensors + config + tokenizer), streaming.

    ``dtype``: output dtype (else the recipe's, else each tensor's stored dtype); kernels compute in float32.
    ``seed`` overrides the recipe's seed (DARE masks come from (seed, tensor name), so they do not depend on
    the order tensors are merged in). ``workers``: tensors merged concurrently (default: torch's thread count
    on CPU, 1 on CUDA), each kernel then running single-threaded. The recipe YAML and evomerge's version go
    into the safetensors metadata and ``evomerge_recipe.yaml``. ``calibration`` / ``base_scores``: what a
    data-aware method needs (:class:`evomerge.method_data.MethodDataProvider`), keyed by the recipe's models.
    ``memory_budget``: bytes (or ``256MB``) of temporaries a streaming kernel may hold per tensor, per worker
    (default 256 MiB; on CPU its pieces stay cache-sized well below it).
    """
    t0 = time.perf_counter()
    if seed is not None:
        recipe = dataclasses.replace(recipe, seed=int(seed))
    out_dtype = parse_dtype(dtype, "--dtype") if dtype is not None else parse_dtype(recipe.dtype, f"{where}.dtype")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    n_workers = _worker_count(workers, device)
    shard_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    budget = None if memory_budget is None else parse_size(memory_budget)
    target = Path(out_dir)
    if target.exists() and not overwrite:
        raise ConfigError(f"output folder {target} already exists; pass --overwrite to replace it")
    inputs = open_inputs(recipe, vocab_policy=vocab_policy, where=where)
    try:
        if budget is not None:
            inputs.plan = inputs.plan.with_runtime_options(memory_budget=budget)
        return _merge_opened(inputs, target, t0, device=device, out_dtype=out_dtype, shard_bytes=shard_bytes,
                             overwrite=overwrite, progress=progress, n_workers=n_workers, where=where,
                             calibration=calibration, base_scores=base_scores)
    finally:
        inputs.close()


def _merge_opened(inputs: DiskInputs, target: Path, t0: float, *, device: str, out_dtype: torch.dtype | None,
                  shard_bytes: int, overwrite: bool, progress: bool, n_workers: int, where: str,
                  calibration: CalibrationSet | None, base_scores: Mapping[str, float] | None) -> MergeSummary:
    plan = inputs.plan
    recipe = plan.recipe
    # layer stacking (recipe slices): the output's tensors map to source tensors (formats.layer_stack)
    stack = LayerStack.of(recipe, inputs.tensor_names, plan.layer_map,
                          {k: f.config for k, f in inputs.folders.items()}, where) if recipe.slices else None
    files_from = (recipe.tokenizer_source or (recipe.base_model if stack else None) or plan.base_key
                  or plan.input_keys[0])
    opened = inputs.folders.get(files_from)
    if opened is not None:  # config and tokenizer come from a model folder (an adapter's: its base's)
        files_from = str(getattr(opened, "base_path", opened.path))
    if not Path(files_from).is_dir():  # checked before any work
        raise ModelError(f"{where}.tokenizer_source: folder {files_from} does not exist")
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()

    plan = plan.prepare({k: source_ref(inputs.folders[k]) for k in plan.keys}, device, calibration=calibration,
                        base_scores=base_scores)
    plan = plan.with_global_trim(inputs.task_vectors(device))
    share = CpuShare(n_workers) if n_workers > 1 and device == "cpu" else None
    if share is not None and plan.method.streams:
        # a large tensor's kernel borrows the cores other workers leave idle (the Llama-3 embedding is one tensor)
        plan = plan.with_runtime_options(cpu_share=share, kernel_threads=n_workers)
    text = recipe_yaml(recipe)
    metadata = {"format": "pt", "evomerge_version": __version__, "evomerge_recipe": text}
    names = stack.names if stack else inputs.tensor_names
    sources = [inputs.folders[k] for k in ([plan.base_key] if plan.base_key else []) + list(plan.input_keys)]
    in_pieces = plan.method.elementwise and not plan.prepared and device == "cpu" and stack is None
    keys = ([plan.base_key] if plan.base_key else []) + list(plan.input_keys)

    def merge_streaming(name: str) -> torch.Tensor | None:
        """A streaming kernel on file sources, writing into the output tensor: no input is loaded whole."""
        if not all(f.dtype(name).is_floating_point for f in sources):
            return None
        srcs = [inputs.source(k, name, device) for k in keys]
        base_s, rest = (srcs[0], srcs[1:]) if plan.base_key is not None else (None, srcs)
        out = torch.empty(srcs[0].shape, dtype=out_dtype if out_dtype is not None else srcs[0].dtype)
        return plan.merge_tensor(name, base_s, rest, device=device, out=out)

    def merge_in_pieces(name: str) -> torch.Tensor | None:
        """An elementwise kernel run piece by piece: each piece of every input is read into a small reused
        buffer and merged while it is in cache, straight into the output tensor (no full-size intermediates)."""
        dtypes = [f.dtype(name) for f in sources]
        if not dtypes[0].is_floating_point:
            return None
        shape = read_shape(sources[0].info(name), inputs.vocab_slices.get(name))
        out = torch.empty(shape, dtype=out_dtype if out_dtype is not None else dtypes[0])
        flat = out.view(-1)
        buffers = _piece_buffers(dtypes)
        n = flat.numel()
        for begin in range(0, n, PIECE_ELEMS):
            count = min(PIECE_ELEMS, n - begin)
            pieces = [f.read_range(name, begin, buf[:count]) for f, buf in zip(sources, buffers)]
            base_p, rest = (pieces[0], pieces[1:]) if plan.base_key is not None else (None, pieces)
            flat[begin:begin + count].copy_(plan.merge_tensor(name, base_p, rest))
        return out

    def merge_one(name: str) -> torch.Tensor:
        """Read one tensor's inputs, merge them, cast to the output dtype (runs in a worker thread)."""
        if share is None:
            return merge_held(name)
        with share.hold():
            return merge_held(name)

    def merge_held(name: str) -> torch.Tensor:
        if plan.method.streams and stack is None:
            streamed = merge_streaming(name)
            if streamed is not None:
                return streamed
        if in_pieces:
            merged = merge_in_pieces(name)
            if merged is not None:
                return merged
        if stack is not None:
            src = stack.source(name)
            out = stack.merge(plan, inputs.read, name, device)
            want = out_dtype if out_dtype is not None else inputs.folders[src.model].dtype(src.source)
            out = out.to(device="cpu", dtype=want)
            return out if out.is_contiguous() else out.contiguous()
        base_t = inputs.read(plan.base_key, name, device) if plan.base_key is not None else None
        tensors = [inputs.read(k, name, device) for k in plan.input_keys]
        ref = base_t if base_t is not None else tensors[0]
        out = plan.merge_tensor(name, base_t, tensors, device=device)
        want = out_dtype if out_dtype is not None else ref.dtype
        del base_t, tensors
        out = out.to(device="cpu", dtype=want)
        return out if out.is_contiguous() else out.contiguous()

    updates = {"dtype": dtype_name(out_dtype)} if out_dtype is not None else {}
    if stack is not None:  # the stack's layer count (checked before any output exists)
        updates.update(stack.config_updates(Path(files_from), {k: f.config for k, f in inputs.folders.items()}))
    threads_before = torch.get_num_threads()
    written = 0
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        # every output tensor's shape and dtype is known now: shard headers go first and each merged tensor
        # streams to its place while the next ones merge (no shard held in memory, I/O overlaps compute)
        ref = inputs.reference
        layout = [(n, ref.shape(n), out_dtype if out_dtype is not None else ref.dtype(n)) for n in names] \
            if stack is None else stack.layout(inputs.folders, out_dtype)
        writer = ShardedWriter(tmp, shard_bytes, metadata, layout=layout)
        bar = _progress(len(names), progress)
        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="evomerge-merge")
        window: deque[tuple[str, Future[torch.Tensor]]] = deque()
        try:
            if n_workers > 1:
                # Tensor-level parallelism: each worker runs its kernel single-threaded, so the parts of a
                # kernel that torch runs on one core (selection, compaction) no longer leave cores idle.
                torch.set_num_threads(1)
            pending = iter(names)
            for name in itertools.islice(pending, n_workers + 1):
                window.append((name, pool.submit(merge_one, name)))
            while window:
                name, fut = window.popleft()
                out = fut.result()
                nxt = next(pending, None)
                if nxt is not None:
                    window.append((nxt, pool.submit(merge_one, nxt)))
                written += out.numel() * out.element_size()
                writer.add(name, out)  # results are taken in order, so shards are deterministic
                del out
                bar.update(1)
        except BaseException:
            for _, fut in window:
                fut.cancel()
            writer.abort()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads_before)
            bar.close()
        writer.finish()
        copy_model_files(Path(files_from), tmp, config_updates=updates or None)
        (tmp / RECIPE_FILE).write_text(text, encoding="utf-8")
    return MergeSummary(
        out_dir=target.resolve(), tensors=len(names), bytes=written, seconds=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss_bytes(),
        peak_cuda_bytes=int(torch.cuda.max_memory_allocated()) if on_cuda else None, method=plan.method.name,
    )


PIECE_ELEMS = 1 << 18  # elements per piece of an elementwise merge: a float32 piece is 1 MiB and stays in cache
_pieces = threading.local()


def _piece_buffers(dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """One reusable piece buffer per input (this thread's, of each input's stored dtype)."""
    cache: dict[tuple[int, torch.dtype], torch.Tensor] = getattr(_pieces, "buffers", None) or {}
    _pieces.buffers = cache
    out = []
    for i, dt in enumerate(dtypes):
        if (i, dt) not in cache:
            cache[(i, dt)] = torch.empty(PIECE_ELEMS, dtype=dt)
        out.append(cache[(i, dt)])
    return out


def _worker_count(workers: int | None, device: str) -> int:
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"workers: expected at least 1, got {workers}")
        return int(workers)
    if device != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), 8))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    return tqdm(total=total, unit="tensor", desc="merge", dynamic_ncols=True, mininterval=0.5)
