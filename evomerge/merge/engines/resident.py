"""The resident merger: base weights and task vectors kept ready, merged states written into a live model.

The search merges thousands of candidates from the same few models, so the inputs are prepared once: the base
``theta_0`` and, per tensor, the task vectors ``tau_t = theta_t - theta_0`` of every full fine-tune stacked into
one ``(T, *shape)`` tensor in the chosen dtype; a LoRA adapter fine-tune keeps only its factors ``A`` and ``B``
(``N`` adapters of rank ``r`` cost ``N * r * (d_in + d_out)`` per target, not ``N`` models), and its task vector
``scale * B @ A`` is materialized for one tensor at a time, only while that tensor merges.

Where that store lives is the **tier** (``resident``):

- ``device``: on the worker's device (fastest; needs room for the base and every task vector);
- ``cpu``: in CPU memory (pinned when the device is a GPU) and streamed to the device tensor by tensor while
  merging (on a CPU device this is the same as ``device``);
- ``disk``: nothing resident: each tensor is read from the memory-mapped safetensors files of the base and the
  fine-tunes (the page cache holds what fits) and its task vectors are computed while merging.

Every tier hands the merge step the same tensors computed by the same operations on the same device, so the
merged weights are bit-identical across tiers (a test checks it). ``apply(recipe, into=model)`` writes the
merged state straight into the model's parameters:

- linear / task arithmetic are fused: ``param = beta * theta_0 + c^T tau`` is one ``addmm`` per tensor over the
  dense stack, computed into the parameter's storage, plus one ``addmm`` over the concatenated LoRA factors
  ``[c_1 s_1 B_1 | ... ] @ [A_1; ...]`` (the adapters' task vectors are never formed);
- every other method calls its registered kernel with ``inputs_are_deltas`` on this tensor's task vectors
  (per-tensor temporaries only), then copies the result into the parameter.

Nothing full-model-sized is allocated per candidate. Results equal
:func:`evomerge.merge.engines.disk.merge_to_disk` of the same recipe in float32 to rounding (the tests check every
method). Recipes name models by the keys given at construction (``base_key`` for the base).
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.dtypes import parse_dtype
from evomerge.errors import ConfigError, ModelError
from evomerge.merge.calibration.rows import CalibrationSet
from evomerge.merge.engines.tiers import RESIDENT_CHOICES, plan_resident
from evomerge.merge.methods.registry import get_method
from evomerge.merge.plan import MergePlan
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.models.adapter import AdapterFolder, Source, open_weights, source_ref
from evomerge.models.compat import check_compatible
from evomerge.models.folder import ModelFolder
from evomerge.models.layers import LayerMap


@dataclasses.dataclass(frozen=True)
class ApplyStats:
    """One ``apply``: how many tensors were written, how long it took, and whether the fused path ran."""

    method: str
    tensors: int
    seconds: float
    fused: bool


@dataclass
class _Lora:
    """One adapter fine-tune, factored: per target tensor ``(A, B, scale, transpose)`` (float32), and the
    task vectors of the tensors it stores in full (``own``, resident dtype). ``source`` stays open in the
    disk tier (its own tensors are read while merging)."""

    key: str
    path: Path
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = field(default_factory=dict)
    own: dict[str, torch.Tensor] = field(default_factory=dict)
    own_names: frozenset[str] = frozenset()
    source: AdapterFolder | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _, _ in self.factors.values()) \
            + sum(t.numel() * t.element_size() for t in self.own.values())


class ResidentMerger:
    """Base + task vectors (dense stacks, LoRA factors) kept in a memory tier; merges written into a model.

    ``models`` maps recipe keys to model folders or LoRA adapter folders (over this base); the base is
    ``base_key``. ``resident``: ``device``, ``cpu`` or ``disk`` (see the module docstring; ``auto`` asks
    :func:`evomerge.merge.engines.tiers.plan_resident` with the device memory found). Memory in the device and cpu
    tiers: the base plus one task vector per full fine-tune in ``dtype`` (a 250M-parameter model with 3
    fine-tunes in float32: ~4 GB), plus the adapters' factors. ``workers``: tensors merged at once on CPU
    (default: torch's thread count), each single-threaded.
    """

    def __init__(
        self,
        base_path: str | Path,
        models: Mapping[str, str | Path],
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        base_key: str = BASE_KEY,
        vocab_policy: str = "refuse",
        workers: int | None = None,
        resident: str = "device",
    ) -> None:
        self.device = torch.device(device)
        resolved = parse_dtype(dtype, "dtype")
        assert resolved is not None
        self.dtype = resolved
        self.base_key = base_key
        self.vocab_policy = vocab_policy
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._by_size: list[str] = []
        if base_key in models:
            raise ConfigError(f"model key {base_key!r} is reserved for the base model")
        if resident not in RESIDENT_CHOICES:
            raise ConfigError(f"resident: {resident!r} is not one of {list(RESIDENT_CHOICES)}")
        self.base_path = Path(base_path)
        if resident == "auto":  # decided from the headers, before anything is read
            resident = plan_resident(self.base_path, {k: str(p) for k, p in models.items()}, device=str(self.device),
                                     dtype=self.dtype).require_fit("resident: auto")
        self._base_folder = ModelFolder.open(base_path)
        sources: dict[str, Source] = {}
        try:
            for k, p in models.items():
                sources[k] = open_weights(p, base=self._base_folder)
            report = check_compatible(self._base_folder, list(sources.values()), vocab_policy=vocab_policy)
        except BaseException:
            for src in sources.values():
                src.close()
            self._base_folder.close()
            raise
        self.tier = resident
        # where the store lives: "device" (the device tier, and the cpu tier on a CPU device), "host", "disk"
        self._where = "device" if resident == "device" or (resident == "cpu" and self.device.type == "cpu") \
            else ("host" if resident == "cpu" else "disk")
        self._pin = self._where == "host" and self.device.type == "cuda"
        self._vocab_slices = dict(getattr(report, "vocab_slices", None) or {})
        self.layer_map = LayerMap.from_config(self._base_folder.config)
        self.tensor_names: list[str] = list(report.tensor_names)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._floating: dict[str, bool] = {}
        for name in self.tensor_names:
            shape = tuple(self._base_folder.shape(name))
            rows = self._vocab_slices.get(name)
            self._shapes[name] = (min(rows, shape[0]), *shape[1:]) if rows is not None and shape else shape
            self._floating[name] = self._base_folder.dtype(name).is_floating_point
        self._paths: dict[str, str] = {base_key: str(self.base_path)}
        self._keys: list[str] = []  # every model key, in recipe-row order
        self._dense_keys: list[str] = []  # full fine-tunes, in stack order
        self._dense_folders: dict[str, ModelFolder] = {}  # disk tier: kept open and mapped
        self._loras: dict[str, _Lora] = {}
        self._targets: dict[int, tuple[weakref.ref[torch.nn.Module], dict[str, torch.Tensor]]] = {}
        self._thresholds: dict[tuple[Any, ...], list[float]] = {}
        self._prepare_cache: dict[str, Any] = {}
        # data for methods with a prepare hook (qp, apl: task rows; mergeability_weighted: base scores),
        # set by the caller (a search worker passes its fitness data); None: the recipe's options say
        self.calibration: CalibrationSet | None = None
        self.base_scores: dict[str, float] | None = None
        # "layer": qp holds one layer's Grams per model at a time (the memory plan decides; "all" caches them)
        self.gram_mode = "all"
        self._base: dict[str, torch.Tensor] = {}
        if self._where != "disk":
            for name in self.tensor_names:
                self._base[name] = self._store(self._load_base(name))
        self._stack: dict[str, torch.Tensor] = {}
        dense = {k: s for k, s in sources.items() if isinstance(s, ModelFolder)}
        try:
            if self._where != "disk":
                # one (D, *shape) allocation per tensor, filled row by row (no concatenation copies)
                for name in self.tensor_names:
                    stack = self._alloc((len(dense), *self._shapes[name]))
                    for row, folder in enumerate(dense.values()):
                        stack[row].copy_(self._dense_delta(folder, name, self._compute_base(name)))
                    self._stack[name] = stack
            for key, src in sources.items():
                self._keys.append(key)
                self._paths[key] = source_ref(src)
                if isinstance(src, AdapterFolder):
                    self._loras[key] = self._load_lora(key, src)
                else:
                    self._dense_keys.append(key)
                    if self._where == "disk":
                        self._dense_folders[key] = src
        finally:
            for key, src in sources.items():
                keep = key in self._dense_folders or (key in self._loras and self._loras[key].source is src)
                if not keep:
                    src.close()

    # ----------------------------------------------------------------------------------- the store

    @property
    def keys(self) -> list[str]:
        """Model keys in recipe-row order (the base excluded)."""
        return list(self._keys)

    @property
    def adapter_keys(self) -> list[str]:
        """The keys of LoRA adapter fine-tunes (kept factored)."""
        return [k for k in self._keys if k in self._loras]

    def _alloc(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Storage for the store in this tier (device, or CPU memory pinned for a GPU)."""
        if self._where == "device":
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        return torch.empty(shape, dtype=self.dtype, pin_memory=self._pin)

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (computed on the device) moved to the tier's storage."""
        if self._where == "device" or t.device.type == "cpu" and not self._pin:
            return t
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self._pin)
        out.copy_(t)
        return out

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A stored tensor on the compute device (pinned host memory copies without blocking)."""
        return t if t.device == self.device else t.to(self.device, non_blocking=self._pin)

    def _read(self, folder: Any, name: str) -> torch.Tensor:
        """One stored tensor of a folder on the compute device, in its stored dtype (mapped in the disk tier)."""
        rows = self._vocab_slices.get(name)
        if self._where == "disk":
            return folder.mapped(name, rows).to(self.device)
        return folder.get(name, device=self.device, rows=rows)

    def _load_base(self, name: str) -> torch.Tensor:
        # from a mapped file always a copy: nothing downstream may write into the file's pages
        return self._read(self._base_folder, name).to(self.dtype, copy=self._where == "disk")

    def _compute_base(self, name: str) -> torch.Tensor:
        """The base tensor on the compute device in the resident dtype (from whichever tier)."""
        if self._where == "disk":
            return self._load_base(name)
        return self._to_device(self._base[name])

    def _dense_delta(self, folder: Any, name: str, base: torch.Tensor) -> torch.Tensor:
        """``theta_t - theta_0`` of one tensor, computed in float32 (float64 for float64), then in ``dtype``; the
        same operations on the same device in every tier (so every tier merges bit-identical inputs)."""
        t = self._read(folder, name)
        if not t.is_floating_point():
            return torch.zeros_like(base)
        mapped = self._where == "disk"  # never write into a mapped file's pages
        if self.dtype in (torch.float32, torch.float64):
            return t.to(self.dtype, copy=mapped).sub_(base)
        # Task vectors of low-precision residents are taken in float32, then rounded once.
        return t.to(torch.float32, copy=mapped).sub_(self._read(self._base_folder, name).to(torch.float32)
                                                     ).to(self.dtype)

    def _dense_block(self, name: str, lo: int, hi: int, base: torch.Tensor) -> torch.Tensor:
        """Rows ``lo:hi`` of the dense stack of one tensor, on the compute device."""
        if self._where == "disk":
            out = torch.empty((hi - lo, *self._shapes[name]), dtype=self.dtype, device=self.device)
            for row, key in enumerate(self._dense_keys[lo:hi]):
                out[row].copy_(self._dense_delta(self._dense_folders[key], name, base))
            return out
        return self._to_device(self._stack[name][lo:hi])

    def _load_lora(self, key: str, src: AdapterFolder) -> _Lora:
        """An adapter's factors (and its own full tensors' task vectors) in the tier's storage."""
        entry = _Lora(key, Path(src.path))
        own: list[str] = []
        for name in self.tensor_names:
            kind = src.delta_kind(name)
            if kind == "zero" or not self._floating[name]:
                continue
            rows = self._vocab_slices.get(name)
            if kind == "factor":
                factor = src.factor(name)
                assert factor is not None
                a, b = src.factor_tensors(name, device="cpu", dtype=torch.float32)
                if rows is not None:  # vocabulary rows of an embedding/head under slice_to_base
                    a, b = (a[:, :rows], b) if factor.transpose else (a, b[:rows])
                if self._where == "device":
                    a, b = a.to(self.device), b.to(self.device)
                elif self._pin:
                    a, b = a.pin_memory(), b.pin_memory()
                entry.factors[name] = (a.contiguous(), b.contiguous(), float(factor.scale), bool(factor.transpose))
            if src.base.resolve(name) in src.layout.replaced:
                if self._where == "disk":
                    own.append(name)
                    continue
                delta = self._own_delta(src, name)
                if bool(delta.any()):  # a saved base layer equal to the base adds nothing
                    own.append(name)
                    entry.own[name] = self._store(delta)
        entry.own_names = frozenset(own)
        if self._where == "disk" and own:
            entry.source = src
        return entry

    def _own_delta(self, src: AdapterFolder, name: str) -> torch.Tensor:
        """Stored minus base of a tensor the adapter stores in full, as a dense model's task vector is taken."""
        t = src.stored(name, "cpu", self._vocab_slices.get(name)).to(self.device)
        base = self._compute_base(name)
        if self.dtype in (torch.float32, torch.float64):
            return t.to(self.dtype).sub_(base)
        return t.to(torch.float32).sub_(self._read(self._base_folder, name).to(torch.float32)).to(self.dtype)

    def _lora_parts(self, entry: _Lora, name: str) -> tuple[tuple[torch.Tensor, torch.Tensor, float, bool] | None,
                                                            torch.Tensor | None]:
        """(factors on the compute device, own task vector on the compute device) of one adapter for a tensor."""
        factor = entry.factors.get(name)
        if factor is not None:
            a, b, scale, transpose = factor
            factor = (self._to_device(a), self._to_device(b), scale, transpose)
        own = None
        if name in entry.own_names:
            if entry.source is not None:
                own = self._own_delta(entry.source, name)
            else:
                own = self._to_device(entry.own[name])
        return factor, own

    def _lora_delta(self, entry: _Lora, name: str, base: torch.Tensor) -> torch.Tensor:
        """The adapter's task vector of one tensor in the resident dtype (zeros where it has none)."""
        factor, own = self._lora_parts(entry, name)
        if factor is None:
            return own if own is not None else torch.zeros_like(base)
        a, b, scale, transpose = factor
        prod = (b @ a).T if transpose else b @ a
        delta = prod.mul_(scale).contiguous().to(self.dtype)
        return delta.add_(own) if own is not None else delta

    def _input_deltas(self, name: str, rows: Sequence[int | None], base: torch.Tensor) -> list[torch.Tensor]:
        """The task vector of each recipe row for one tensor (zeros for the base), on the compute device."""
        dense_rows = sorted({self._dense_keys.index(self._keys[r]) for r in rows
                             if r is not None and self._keys[r] not in self._loras})
        block = None
        if dense_rows and self._where != "disk":  # a view of the stack (a copy from host memory)
            block = self._dense_block(name, dense_rows[0], dense_rows[-1] + 1, base)
        out: list[torch.Tensor] = []
        for r in rows:
            if r is None:
                out.append(torch.zeros_like(base))
                continue
            key = self._keys[r]
            if key in self._loras:
                out.append(self._lora_delta(self._loras[key], name, base))
            elif block is None:  # disk tier: only the rows this recipe reads
                i = self._dense_keys.index(key)
                out.append(self._dense_block(name, i, i + 1, base)[0])
            else:
                out.append(block[self._dense_keys.index(key) - dense_rows[0]])
        return out

    # ----------------------------------------------------------------------------------- models

    def add_model(self, key: str, path: str | Path) -> None:
        """Make another model (e.g. a materialized merged parent, or an adapter) available to recipes as ``key``."""
        if key == self.base_key or key in self._keys:
            raise ConfigError(f"model key {key!r} is already used")
        src = open_weights(path, base=self._base_folder)
        keep = False
        try:
            report = check_compatible(self._base_folder, [src], vocab_policy=self.vocab_policy)
            missing = set(self.tensor_names) - set(report.tensor_names)
            if missing:
                raise ModelError(f"model {path}: tensors {sorted(missing)[:5]} of the resident base are missing")
            if isinstance(src, AdapterFolder):
                entry = self._load_lora(key, src)
                self._loras[key] = entry
                keep = entry.source is src
            elif self._where == "disk":
                self._dense_folders[key] = src
                keep = True
            else:
                for name in self.tensor_names:
                    old = self._stack[name]
                    new = self._alloc((old.shape[0] + 1, *old.shape[1:]))
                    new[:-1].copy_(old)
                    new[-1].copy_(self._dense_delta(src, name, self._compute_base(name)))
                    self._stack[name] = new
            if not isinstance(src, AdapterFolder):
                self._dense_keys.append(key)
            self._keys.append(key)
            self._paths[key] = source_ref(src)
            self._thresholds.clear()
        finally:
            if not keep:
                src.close()

    def remove_model(self, key: str) -> None:
        """Drop a model's task vectors (frees its memory)."""
        if key not in self._keys:
            raise ConfigError(f"model key {key!r} is not resident (keys: {self._keys})")
        if key in self._loras:
            entry = self._loras.pop(key)
            if entry.source is not None:
                entry.source.close()
        else:
            i = self._dense_keys.index(key)
            if self._where == "disk":
                self._dense_folders.pop(key).close()
            else:
                keep = [j for j in range(len(self._dense_keys)) if j != i]
                for name, s in self._stack.items():
                    new = self._alloc((len(keep), *s.shape[1:]))
                    if keep:
                        new.copy_(s[keep])
                    self._stack[name] = new
            self._dense_keys.pop(i)
        self._keys.remove(key)
        self._paths.pop(key, None)
        self._thresholds.clear()

    # ------------------------------------------------------------------------------------- model

    def new_model(self) -> torch.nn.Module:
        """A causal LM built from the base config and holding the base weights, on the device, in the dtype.

        Build it once and pass it to every :meth:`apply`; it runs no code from the model folder.
        """
        config = AutoConfig.from_pretrained(str(self.base_path), trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        model.to(self.device).eval()
        targets = self._targets_of(model)
        with torch.no_grad():
            for name in self.tensor_names:
                targets[name].copy_(self._compute_base(name))
        return model

    def _targets_of(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's tensor for each resident tensor name (tied weights appear under both names)."""
        cached = self._targets.get(id(model))
        if cached is not None and cached[0]() is model:
            return cached[1]
        found: dict[str, torch.Tensor] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            found[n] = p.data
        for n, b in model.named_buffers(remove_duplicate=False):
            found.setdefault(n, b)
        targets = {}
        for name in self.tensor_names:
            t = found.get(name)
            if t is None:
                raise ModelError(f"model has no parameter {name!r} (the resident tensors come from {self.base_path})")
            if tuple(t.shape) != self._shapes[name]:
                raise ModelError(f"parameter {name}: model shape {tuple(t.shape)}, resident {self._shapes[name]}")
            targets[name] = t
        self._targets[id(model)] = (weakref.ref(model), targets)
        return targets

    # ------------------------------------------------------------------------------------- merge

    def _worker_pool(self) -> ThreadPoolExecutor | None:
        """Threads that merge different tensors at once on CPU (None: one thread, e.g. on a GPU)."""
        n = self.workers if self.workers is not None else (
            max(1, min(torch.get_num_threads(), 8)) if self.device.type == "cpu" else 1)
        if n <= 1:
            return None
        if self._pool is None or self._pool_size != n:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="evomerge-resident")
            self._pool_size = n
            # largest tensors first, so no worker is left with a big one at the end
            self._by_size = sorted(self.tensor_names, key=lambda k: -_numel(self._shapes[k]))
        return self._pool

    def _each_tensor(self, fn: Callable[[str], None]) -> None:
        """``fn(name)`` for every tensor: on the CPU pool (single-threaded kernels), else in order."""
        with torch.no_grad():
            pool = self._worker_pool()
            if pool is None:
                for name in self.tensor_names:
                    fn(name)
                return
            threads_before = torch.get_num_threads()
            torch.set_num_threads(1)  # tensor-level parallelism: one single-threaded kernel per worker
            try:
                for fut in [pool.submit(fn, n) for n in self._by_size]:
                    fut.result()
            finally:
                torch.set_num_threads(threads_before)

    def copy_floor(self, into: torch.nn.Module) -> float:
        """Seconds to copy every resident tensor (base and task vectors) once into ``into``, threaded as
        :meth:`apply` is: the memory-traffic floor a merge of all resident models cannot beat by much. In the
        disk tier the tensors copied are the mapped base and fine-tunes; adapters count by their factors."""
        targets = self._targets_of(into)

        def copy_one(name: str) -> None:
            dst = targets[name]
            if self._where == "disk":
                dst.copy_(self._read(self._base_folder, name))
                for key in self._dense_keys:
                    dst.copy_(self._read(self._dense_folders[key], name))
            else:
                dst.copy_(self._base[name])
                for row in self._stack[name]:
                    dst.copy_(row)
            for entry in self._loras.values():
                _, own = self._lora_parts(entry, name)  # factors reach the device (from host memory: a copy)
                if own is not None:
                    dst.copy_(own)

        t0 = time.perf_counter()
        self._each_tensor(copy_one)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.apply(Recipe("linear", (ModelEntry(self.base_key),)), into=into)  # leave the base in the model
        return seconds

    @property
    def resident_bytes(self) -> int:
        """Memory held by the store (base, dense task vectors, adapter factors) in its tier (0 for mapped files)."""
        dense = sum(t.numel() * t.element_size() for t in [*self._base.values(), *self._stack.values()])
        return dense + sum(e.nbytes for e in self._loras.values())

    def store_bytes(self) -> dict[str, int]:
        """Bytes of the store by where they live: ``device``, ``host`` (CPU memory) and ``mapped`` (files)."""
        out = {"device": 0, "host": 0, "mapped": 0}
        held = self.resident_bytes
        if self._where == "disk":
            out["host"] = held
            out["mapped"] = self._base_folder.total_bytes + sum(f.total_bytes for f in self._dense_folders.values())
        else:
            out["device" if self._where == "device" and self.device.type != "cpu" else "host"] = held
        return out

    def last_diagnostics(self, recipe: Recipe) -> dict[str, float]:
        """What the last :meth:`apply` of ``recipe`` measured about itself (qp: the residual-energy rho)."""
        diagnostics = get_method(recipe.method).diagnostics
        return {} if diagnostics is None else diagnostics(self._prepare_cache)

    def close(self) -> None:
        """Stop the worker threads and close the files the disk tier maps (memory is freed when dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for folder in self._dense_folders.values():
            folder.close()
        for entry in self._loras.values():
            if entry.source is not None:
                entry.source.close()

    def _rows(self, keys: tuple[str, ...]) -> list[int | None]:
        out: list[int | None] = []
        for k in keys:
            if k == self.base_key:
                out.append(None)
            elif k in self._keys:
                out.append(self._keys.index(k))
            else:
                raise ConfigError(f"recipe model {k!r} is not resident (keys: {[self.base_key, *self._keys]})")
        return out

    def _plan(self, recipe: Recipe) -> MergePlan:
        method = get_method(recipe.method)
        if recipe.base_model is not None and recipe.base_model != self.base_key:
            raise ConfigError(f"recipe.base_model: {recipe.base_model!r}; this resident merger's base is "
                              f"{self.base_key!r}")
        return MergePlan.of(recipe, method, self.layer_map).with_runtime_options(inputs_are_deltas=True)

    def _global_trim(self, plan: MergePlan, rows: list[int | None]) -> MergePlan:
        """The plan with model-wide TIES thresholds (cached per input rows and densities)."""
        if not plan.needs_global_trim:
            return plan
        key = (tuple(rows), tuple(plan.global_densities()))
        if key not in self._thresholds:
            def batches() -> Iterator[list[torch.Tensor]]:
                with torch.no_grad():
                    for name in self.tensor_names:
                        base = self._compute_base(name)
                        yield self._input_deltas(name, rows, base)

            self._thresholds[key] = plan.with_global_trim(batches).runtime["global_threshold"]
        return plan.with_runtime_options(global_threshold=self._thresholds[key])

    def apply(self, recipe: Recipe, into: torch.nn.Module) -> ApplyStats:
        """Write the merged state of ``recipe`` into ``into``'s parameters, in place (no disk I/O but the disk
        tier's mapped reads)."""
        return self._merge_into(recipe, self._targets_of(into))

    def state_dict(self, recipe: Recipe) -> dict[str, torch.Tensor]:
        """The merged tensors as a new dict (for tests and export; allocates a full model)."""
        out = {n: torch.empty(self._shapes[n], dtype=self.dtype if self._floating[n] else self._base_folder.dtype(n),
                              device=self.device) for n in self.tensor_names}
        self._merge_into(recipe, out)
        return out

    def _merge_into(self, recipe: Recipe, targets: Mapping[str, torch.Tensor]) -> ApplyStats:
        t0 = time.perf_counter()
        plan = self._plan(recipe)
        rows = self._rows(plan.input_keys)
        plan = self._global_trim(plan, rows)
        plan = plan.prepare(self._paths, str(self.device), cache=self._prepare_cache, calibration=self.calibration,
                            base_scores=self.base_scores, grams=self.gram_mode)
        fused = plan.method.is_linear and not plan.prepared

        def merge_one(name: str) -> None:
            base = self._compute_base(name)
            target = targets[name]
            if not base.is_floating_point():
                target.copy_(base)
                return
            if fused:
                form = plan.coefficients(name)
                assert form is not None
                self._fused_into(name, target, base, rows, list(form.coefficients), float(form.beta))
                return
            tensors = self._input_deltas(name, rows, base)
            plan.merge_tensor(name, base, tensors, device=self.device, out=target)  # written in place

        self._each_tensor(merge_one)
        if self.device.type == "cuda":  # the kernels run asynchronously: time what they took
            torch.cuda.synchronize(self.device)
        return ApplyStats(method=plan.method.name, tensors=len(self.tensor_names),
                          seconds=time.perf_counter() - t0, fused=fused)

    def _fused_into(self, name: str, target: torch.Tensor, base: torch.Tensor, rows: Sequence[int | None],
                    coefficients: Sequence[float], beta: float) -> None:
        """``target = beta * base + sum_t c_t tau_t``: one addmm over the dense stack's rows, one over the
        adapters' concatenated factors, plus the adapters' own full tensors."""
        dense: dict[int, float] = {}
        loras: list[tuple[_Lora, float]] = []
        for r, c in zip(rows, coefficients):
            if r is None or c == 0.0:
                continue
            key = self._keys[r]
            if key in self._loras:
                loras.append((self._loras[key], float(c)))
            else:
                i = self._dense_keys.index(key)
                dense[i] = dense.get(i, 0.0) + float(c)
        n = base.numel()
        direct = target.dtype == base.dtype and target.device == base.device and target.is_contiguous()
        out = target if direct else torch.empty_like(base)
        used = sorted(dense)
        if not used:
            out.copy_(base)
            if beta != 1.0:
                out.mul_(beta)
        else:
            # contiguous used rows (the usual case: a recipe over all resident models) are one addmm on a view of
            # the stack, written straight into ``out``; rows scattered among many unused ones are added one by one
            lo, hi = used[0], used[-1] + 1
            if used == list(range(lo, hi)) or 2 * len(used) >= hi - lo:
                block = self._dense_block(name, lo, hi, base)
                c = torch.tensor([dense.get(r, 0.0) for r in range(lo, hi)], dtype=block.dtype, device=block.device)
                torch.addmm(base.view(1, n), c.view(1, hi - lo), block.view(hi - lo, n), beta=beta,
                            out=out.view(1, n))
            else:
                torch.mul(base, beta, out=out)
                for r in used:
                    out.add_(self._dense_block(name, r, r + 1, base)[0], alpha=dense[r])
        if loras:
            self._add_factored(name, out, loras)
        if not direct:
            target.copy_(out)

    def _add_factored(self, name: str, out: torch.Tensor, loras: Sequence[tuple[_Lora, float]]) -> None:
        """``out += sum_k c_k tau_k`` over adapters: ``[c_k s_k B_k] @ [A_k]`` as one addmm per orientation."""
        plain: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        flipped: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for entry, c in loras:
            factor, own = self._lora_parts(entry, name)
            if factor is not None:
                a, b, scale, transpose = factor
                if transpose:  # delta = (B @ A).T = A.T @ B.T
                    flipped[0].append(a.T * (c * scale))
                    flipped[1].append(b.T)
                else:
                    plain[0].append(b * (c * scale))
                    plain[1].append(a)
            if own is not None:
                out.add_(own, alpha=c)
        for left, right in (plain, flipped):
            if left:
                out.addmm_(torch.cat(left, dim=1).to(out.dtype), torch.cat(right, dim=0).to(out.dtype))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
