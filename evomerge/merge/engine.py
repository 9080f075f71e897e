"""The streaming merge engine: model folders on disk -> merged model folder on disk, one tensor at a time.

Everything is checked before any work (recipe against its method, models against each other, output folder),
so bad input never leaves an output folder behind; the output is written in a temporary sibling folder and
renamed when complete (:func:`evomerge.atomic.atomic_output_dir`).

Speed: a pool of worker threads (one per CPU thread torch would use) each reads a tensor's inputs with
``pread`` and runs the kernel on it single-threaded, while the main thread hands finished tensors, in order,
to the shard writer: reading, computing and writing overlap (torch and ``pread`` release the GIL), and the
parts of a kernel torch runs on one core (top-k selection, compaction) no longer leave the other cores idle.
Inputs stay in their stored dtype until the kernel converts them (float32 per tensor, never the whole model).
Memory: at most ``workers + 1`` tensors' inputs and work buffers are alive, plus whatever the shard writer
buffers for the current shard.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from evomerge import __version__
from evomerge.atomic import atomic_output_dir
from evomerge.errors import ConfigError, ModelError
from evomerge.merge.recipe import Recipe

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64,
}
DEFAULT_MAX_SHARD_SIZE = "5GB"
RECIPE_FILE = "evomerge_recipe.yaml"


def parse_dtype(value: str | torch.dtype | None, where: str = "dtype") -> torch.dtype | None:
    """A torch dtype from its name (float32, bfloat16, float16, and short forms); None passes through."""
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise ConfigError(f"{where}: unknown dtype {value!r} (choices: float32, bfloat16, float16)") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


# ------------------------------------------------------------------------------------------- planning


@dataclasses.dataclass
class MergePlan:
    """Everything checked and opened before any tensor is merged; shared by the disk and resident engines."""

    recipe: Recipe
    method: Any  # registry.MergeMethod
    base_key: str | None  # kernel base (None for methods without one)
    input_keys: tuple[str, ...]  # kernel inputs, in kernel order
    folders: dict[str, Any]  # key -> ModelFolder
    reference: Any  # ModelFolder whose config/layer map/tensor names rule (base, else first input)
    layer_map: Any
    tensor_names: list[str]
    vocab_slices: Mapping[str, Any]
    options: dict[str, Any]


def _open_folder(key: str) -> Any:
    from evomerge.models import ModelFolder

    return ModelFolder.open(key)


def plan_merge(recipe: Recipe, *, vocab_policy: str = "refuse", where: str = "recipe",
               open_folder: Callable[[str], Any] | None = None) -> MergePlan:
    """Validate the recipe, open its models and check them against each other; no tensor is read."""
    from evomerge.merge.registry import plan_inputs, resolve_options, validate_recipe
    from evomerge.models import LayerMap, check_compatible

    if vocab_policy not in ("refuse", "slice_to_base"):
        raise ConfigError(f"vocab_policy: {vocab_policy!r} is not one of ['refuse', 'slice_to_base']")
    method = validate_recipe(recipe, where)
    plan = plan_inputs(recipe, method)
    opener = open_folder or _open_folder
    keys = list(dict.fromkeys(([plan.base] if plan.base else []) + list(plan.models)))
    folders = {k: opener(k) for k in keys}
    ref_key = plan.base if plan.base is not None else plan.models[0]
    reference = folders[ref_key]
    others = [folders[k] for k in keys if k != ref_key]
    report = check_compatible(reference, others, vocab_policy=vocab_policy)
    layer_map = LayerMap.from_config(reference.config)
    options = dict(resolve_options(recipe, method))
    return MergePlan(
        recipe=recipe, method=method, base_key=plan.base, input_keys=tuple(plan.models), folders=folders,
        reference=reference, layer_map=layer_map, tensor_names=list(report.tensor_names),
        vocab_slices=dict(getattr(report, "vocab_slices", None) or {}), options=options,
    )


def read_input(folder: Any, name: str, plan: MergePlan, device: str) -> torch.Tensor:
    """One input tensor; under the opt-in vocabulary policy only the base vocabulary's rows are read."""
    return folder.get(name, device=device, rows=plan.vocab_slices.get(name))


def tensor_context(plan: MergePlan, name: str) -> tuple[int | None, str | None]:
    lm = plan.layer_map
    return lm.layer_of(name), lm.kind_of(name)


def kernel_args(plan: MergePlan, name: str) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-model and global numeric values for one tensor (per-layer lists and filters resolved)."""
    from evomerge.merge.registry import resolve_tensor_params

    layer, kind = tensor_context(plan, name)
    return resolve_tensor_params(plan.recipe, plan.method, name, layer, plan.layer_map.num_layers, kind)


def global_densities(plan: MergePlan) -> list[float]:
    """One density per kernel input (trim_scope: global needs one constant density per model)."""
    from evomerge.merge.registry import resolve_tensor_params

    model_params, _ = resolve_tensor_params(plan.recipe, plan.method, "", None, plan.layer_map.num_layers, None)
    return [float(mp.get("density", 1.0)) for mp in model_params]


def needs_global_trim(plan: MergePlan) -> bool:
    return plan.options.get("trim_scope") == "global"


def prepare_options(plan: MergePlan, device: str, cache: dict[str, Any] | None = None,
                    model_paths: Mapping[str, Any] | None = None, calibration: Any = None,
                    base_scores: Mapping[str, float] | None = None) -> Mapping[str, Mapping[str, Any]] | None:
    """Run the method's ``prepare`` hook once (calibration Grams and the like), if it has one."""
    hook = getattr(plan.method, "prepare", None)
    if hook is None:
        return None
    from evomerge.merge.registry import MethodContext

    paths = dict(model_paths) if model_paths is not None else {k: Path(k) for k in plan.folders}
    ctx = MethodContext(recipe=plan.recipe, model_paths=paths, device=device, calibration=calibration,
                        base_scores=base_scores, cache=cache if cache is not None else {})
    return hook(ctx)


# ------------------------------------------------------------------------------------------- the engine


def _delta_batches(plan: MergePlan, device: str) -> Callable[[], Iterator[Sequence[torch.Tensor]]]:
    """Task vectors tensor by tensor (for the global TIES thresholds), read again on each call."""
    def gen() -> Iterator[Sequence[torch.Tensor]]:
        assert plan.base_key is not None
        base = plan.folders[plan.base_key]
        for name in plan.tensor_names:
            b = read_input(base, name, plan, device).to(torch.float32)
            yield [read_input(plan.folders[k], name, plan, device).to(torch.float32).sub_(b)
                   for k in plan.input_keys]
    return gen


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
    calibration: Any = None,
) -> MergeSummary:
    """Merge the recipe's models into ``out_dir`` (sharded safetensors + config + tokenizer), streaming.

    ``dtype``: output dtype (else the recipe's, else each tensor's stored dtype); kernels compute in float32.
    ``seed`` overrides the recipe's seed (DARE masks come from (seed, tensor name), so they do not depend on
    the order tensors are merged in). ``workers``: tensors merged concurrently (default: torch's thread count
    on CPU, 1 on CUDA), each kernel then running single-threaded. The recipe YAML and evomerge's version go into the safetensors metadata
    and ``evomerge_recipe.yaml``. ``calibration``: the task rows of data-aware methods (qp, apl), keyed by
    the recipe's model folders, instead of the recipe's ``options.calibration`` file.
    """
    from evomerge.models import parse_size

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
    target = Path(out_dir)
    if target.exists() and not overwrite:
        raise ConfigError(f"output folder {target} already exists; pass --overwrite to replace it")
    plan = plan_merge(recipe, vocab_policy=vocab_policy, where=where)
    try:
        return _merge_planned(plan, target, t0, device=device, out_dtype=out_dtype, shard_bytes=shard_bytes,
                              overwrite=overwrite, progress=progress, n_workers=n_workers, where=where,
                              calibration=calibration)
    finally:
        for folder in plan.folders.values():
            folder.close()


def _merge_planned(plan: MergePlan, target: Path, t0: float, *, device: str, out_dtype: torch.dtype | None,
                   shard_bytes: int, overwrite: bool, progress: bool, n_workers: int, where: str,
                   calibration: Any = None) -> MergeSummary:
    from evomerge.merge.recipe_io import recipe_yaml
    from evomerge.merge.registry import prepared_options, tensor_generator
    from evomerge.models import ShardedWriter, copy_model_files

    recipe = plan.recipe
    files_from = recipe.tokenizer_source or plan.base_key or plan.input_keys[0]
    if not Path(files_from).is_dir():  # checked before any work
        raise ModelError(f"{where}.tokenizer_source: folder {files_from} does not exist")
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()

    prepared = prepare_options(plan, device, calibration=calibration)
    options = dict(plan.options)
    if needs_global_trim(plan):
        from evomerge.merge.methods_sparsify import global_trim_thresholds

        options["global_threshold"] = global_trim_thresholds(_delta_batches(plan, device), global_densities(plan))
    method = plan.method
    text = recipe_yaml(recipe)
    metadata = {"format": "pt", "evomerge_version": __version__, "evomerge_recipe": text}
    names = plan.tensor_names
    base_folder = plan.folders[plan.base_key] if plan.base_key else None
    in_folders = [plan.folders[k] for k in plan.input_keys]

    sources = ([base_folder] if base_folder is not None else []) + in_folders
    in_pieces = method.elementwise and not prepared and device == "cpu"

    def merge_in_pieces(name: str) -> torch.Tensor | None:
        """An elementwise kernel run piece by piece: each piece of every input is read into a small reused
        buffer and merged while it is in cache, straight into the output tensor (no full-size intermediates)."""
        from evomerge.models.folder import read_shape

        dtypes = [f.dtype(name) for f in sources]
        if not dtypes[0].is_floating_point:
            return None
        shape = read_shape(sources[0].info(name), plan.vocab_slices.get(name))
        out = torch.empty(shape, dtype=out_dtype if out_dtype is not None else dtypes[0])
        flat = out.view(-1)
        model_params, params = kernel_args(plan, name)
        buffers = _piece_buffers(dtypes)
        n = flat.numel()
        for begin in range(0, n, PIECE_ELEMS):
            count = min(PIECE_ELEMS, n - begin)
            pieces = [f.read_range(name, begin, buf[:count]) for f, buf in zip(sources, buffers)]
            base_p, inputs = (pieces[0], pieces[1:]) if base_folder is not None else (None, pieces)
            flat[begin:begin + count].copy_(method.fn(base_p, inputs, model_params, params, options, None))
        return out

    def merge_one(name: str) -> torch.Tensor:
        """Read one tensor's inputs, merge them, cast to the output dtype (runs in a worker thread)."""
        if in_pieces:
            merged = merge_in_pieces(name)
            if merged is not None:
                return merged
        base_t = read_input(base_folder, name, plan, device) if base_folder is not None else None
        tensors = [read_input(f, name, plan, device) for f in in_folders]
        ref = base_t if base_t is not None else tensors[0]
        if not ref.is_floating_point():
            out = ref  # integer buffers are copied, not merged
        else:
            model_params, params = kernel_args(plan, name)
            opts = {**options, **prepared_options(prepared, name)} if prepared else options
            gen = tensor_generator(recipe.seed, name, device) if method.uses_generator else None
            out = method.fn(base_t, tensors, model_params, params, opts, gen)
            if out.shape != ref.shape:
                raise ModelError(f"tensor {name}: method {method.name} returned shape "
                                 f"{tuple(out.shape)} for inputs of shape {tuple(ref.shape)}")
        want = out_dtype if out_dtype is not None else ref.dtype
        del base_t, tensors
        out = out.to(device="cpu", dtype=want)
        return out if out.is_contiguous() else out.contiguous()

    threads_before = torch.get_num_threads()
    written = 0
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        # every output tensor's shape and dtype is known now: shard headers go first and each merged tensor
        # streams to its place while the next ones merge (no shard held in memory, I/O overlaps compute)
        ref = plan.reference
        layout = [(n, ref.shape(n), out_dtype if out_dtype is not None else ref.dtype(n)) for n in names]
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
        copy_model_files(Path(files_from), tmp,
                         config_updates={"dtype": dtype_name(out_dtype)} if out_dtype is not None else None)
        (tmp / RECIPE_FILE).write_text(text, encoding="utf-8")
    return MergeSummary(
        out_dir=target.resolve(), tensors=len(names), bytes=written, seconds=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss_bytes(),
        peak_cuda_bytes=int(torch.cuda.max_memory_allocated()) if on_cuda else None, method=method.name,
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
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tensor", desc="merge", dynamic_ncols=True, mininterval=0.5)
