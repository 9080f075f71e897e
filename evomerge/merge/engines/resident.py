"""The resident merger: base weights and task vectors kept in memory, merged states written into a live model.

The search merges thousands of candidates from the same few models, so the inputs are read from disk once:
the base ``theta_0`` and, per tensor, the task vectors ``tau_t = theta_t - theta_0`` of every model stacked
into one ``(T, *shape)`` tensor on the chosen device, in the chosen dtype. ``apply(recipe, into=model)`` then
writes the merged state straight into the model's parameters:

- linear / task arithmetic (and DARE-free, filter-free relatives) are one fused ``addmm`` per tensor:
  ``param = beta * theta_0 + c^T tau`` with the per-layer coefficients ``c`` of this tensor, computed
  directly into the parameter's storage (no temporary, one pass over the resident memory);
- every other method calls its registered kernel with ``inputs_are_deltas``, writing into the parameter
  (streaming kernels, e.g. TIES and DARE, piece by piece with piece-sized temporaries; others copy their result).

Nothing full-model-sized is allocated per candidate and nothing touches the disk. Results equal
:func:`evomerge.merge.engines.disk.merge_to_disk` of the same recipe in float32 to rounding (the tests check every
method). Recipes name models by the keys given at construction (``base_key`` for the base).
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.dtypes import parse_dtype
from evomerge.errors import ConfigError, ModelError
from evomerge.merge.calibration.rows import CalibrationSet
from evomerge.merge.methods.registry import get_method
from evomerge.merge.plan import MergePlan
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
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


class ResidentMerger:
    """Base + stacked task vectors resident on ``device``; merges written in place into a model.

    ``models`` maps recipe keys to model folders (the base is ``base_key``). Memory: the base plus one task
    vector per model, in ``dtype`` (a 250M-parameter model with 3 fine-tunes in float32: ~4 GB).
    ``workers``: tensors merged at once on CPU (default: torch's thread count), each single-threaded.
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
        self.base_path = Path(base_path)
        self._base_folder = ModelFolder.open(base_path)
        folders = {k: ModelFolder.open(p) for k, p in models.items()}
        report = check_compatible(self._base_folder, list(folders.values()), vocab_policy=vocab_policy)
        self._vocab_slices = dict(getattr(report, "vocab_slices", None) or {})
        self.layer_map = LayerMap.from_config(self._base_folder.config)
        self.tensor_names: list[str] = list(report.tensor_names)
        self._paths: dict[str, Path] = {base_key: self.base_path}
        self._base: dict[str, torch.Tensor] = {}
        for name in self.tensor_names:
            self._base[name] = self._read(self._base_folder, name).to(self.dtype)
        self._keys: list[str] = list(folders)
        self._targets: dict[int, tuple[weakref.ref[torch.nn.Module], dict[str, torch.Tensor]]] = {}
        self._thresholds: dict[tuple[Any, ...], list[float]] = {}
        self._prepare_cache: dict[str, Any] = {}
        # data for methods with a prepare hook (qp, apl: task rows; mergeability_weighted: base scores),
        # set by the caller (a search worker passes its fitness data); None: the recipe's options say
        self.calibration: CalibrationSet | None = None
        self.base_scores: dict[str, float] | None = None
        # one (T, *shape) allocation per tensor, filled row by row (no concatenation copies)
        self._stack: dict[str, torch.Tensor] = {}
        for name, b in self._base.items():
            stack = torch.empty((len(folders), *b.shape), dtype=self.dtype, device=self.device)
            for row, folder in enumerate(folders.values()):
                stack[row].copy_(self._delta(folder, name))
            self._stack[name] = stack
        for key, folder in folders.items():
            self._paths[key] = Path(folder.path)
            folder.close()

    # ----------------------------------------------------------------------------------- models

    @property
    def keys(self) -> list[str]:
        """Model keys in stack order (the base excluded)."""
        return list(self._keys)

    def _read(self, folder: Any, name: str) -> torch.Tensor:
        return folder.get(name, device=self.device, rows=self._vocab_slices.get(name))

    def _delta(self, folder: Any, name: str) -> torch.Tensor:
        """``theta_t - theta_0`` of one tensor, computed in float32 (float64 for float64), then in ``dtype``."""
        t = self._read(folder, name)
        b = self._base[name]
        if not t.is_floating_point():
            return torch.zeros_like(b)
        if self.dtype in (torch.float32, torch.float64):
            return t.to(self.dtype).sub_(b)
        # Task vectors of low-precision residents are taken in float32, then rounded once.
        return t.to(torch.float32).sub_(self._read(self._base_folder, name).to(torch.float32)).to(self.dtype)

    def _append(self, key: str, folder: Any) -> None:
        if key == self.base_key or key in self._keys:
            raise ConfigError(f"model key {key!r} is already used")
        deltas = {name: self._delta(folder, name) for name in self.tensor_names}
        for name, d in deltas.items():
            self._stack[name] = torch.cat([self._stack[name], d.unsqueeze(0)], dim=0)
        self._keys.append(key)
        self._paths[key] = Path(folder.path)

    def add_model(self, key: str, path: str | Path) -> None:
        """Make another model (e.g. a materialized merged parent) available to recipes as ``key``."""
        if key == self.base_key or key in self._keys:
            raise ConfigError(f"model key {key!r} is already used")
        folder = ModelFolder.open(path)
        report = check_compatible(self._base_folder, [folder], vocab_policy=self.vocab_policy)
        missing = set(self.tensor_names) - set(report.tensor_names)
        if missing:
            folder.close()
            raise ModelError(f"model {path}: tensors {sorted(missing)[:5]} of the resident base are missing")
        try:
            self._append(key, folder)
        finally:
            folder.close()

    def remove_model(self, key: str) -> None:
        """Drop a model's task vectors (frees its memory)."""
        if key not in self._keys:
            raise ConfigError(f"model key {key!r} is not resident (keys: {self._keys})")
        i = self._keys.index(key)
        keep = [j for j in range(len(self._keys)) if j != i]
        for name, s in self._stack.items():
            self._stack[name] = s[keep].clone() if keep else s[:0].clone()
        self._keys.pop(i)
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
                targets[name].copy_(self._base[name])
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
            if tuple(t.shape) != tuple(self._base[name].shape):
                raise ModelError(f"parameter {name}: model shape {tuple(t.shape)}, resident {tuple(self._base[name].shape)}")
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
            self._by_size = sorted(self.tensor_names, key=lambda k: -self._base[k].numel())
        return self._pool

    def copy_floor(self, into: torch.nn.Module) -> float:
        """Seconds to copy every resident tensor (base and task vectors) once into ``into``, threaded as
        :meth:`apply` is: the memory-traffic floor a merge of all resident models cannot beat by much."""
        targets = self._targets_of(into)

        def copy_one(name: str) -> None:
            dst = targets[name]
            dst.copy_(self._base[name])
            for row in self._stack[name]:
                dst.copy_(row)

        t0 = time.perf_counter()
        with torch.no_grad():
            pool = self._worker_pool()
            if pool is None:
                for name in self.tensor_names:
                    copy_one(name)
            else:
                threads_before = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    for fut in [pool.submit(copy_one, n) for n in self._by_size]:
                        fut.result()
                finally:
                    torch.set_num_threads(threads_before)
        seconds = time.perf_counter() - t0
        self.apply(Recipe("linear", (ModelEntry(self.base_key),)), into=into)  # leave the base in the model
        return seconds

    @property
    def resident_bytes(self) -> int:
        """Memory held by the base and the task vectors."""
        return sum(t.numel() * t.element_size() for t in [*self._base.values(), *self._stack.values()])

    def last_diagnostics(self, recipe: Recipe) -> dict[str, float]:
        """What the last :meth:`apply` of ``recipe`` measured about itself (qp: the residual-energy rho)."""
        diagnostics = get_method(recipe.method).diagnostics
        return {} if diagnostics is None else diagnostics(self._prepare_cache)

    def close(self) -> None:
        """Stop the worker threads (the merger frees its memory when dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

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
            def batches() -> Any:
                for name in self.tensor_names:
                    s = self._stack[name]
                    yield [s[r] if r is not None else torch.zeros_like(self._base[name]) for r in rows]

            self._thresholds[key] = plan.with_global_trim(batches).runtime["global_threshold"]
        return plan.with_runtime_options(global_threshold=self._thresholds[key])

    def apply(self, recipe: Recipe, into: torch.nn.Module) -> ApplyStats:
        """Write the merged state of ``recipe`` into ``into``'s parameters, in place (no disk I/O)."""
        return self._merge_into(recipe, self._targets_of(into))

    def state_dict(self, recipe: Recipe) -> dict[str, torch.Tensor]:
        """The merged tensors as a new dict (for tests and export; allocates a full model)."""
        out = {n: torch.empty_like(b) for n, b in self._base.items()}
        self._merge_into(recipe, out)
        return out

    def _merge_into(self, recipe: Recipe, targets: Mapping[str, torch.Tensor]) -> ApplyStats:
        t0 = time.perf_counter()
        plan = self._plan(recipe)
        rows = self._rows(plan.input_keys)
        plan = self._global_trim(plan, rows)
        plan = plan.prepare(self._paths, str(self.device), cache=self._prepare_cache, calibration=self.calibration,
                            base_scores=self.base_scores)
        fused = plan.method.is_linear and not plan.prepared
        used = sorted(r for r in rows if r is not None)

        def merge_one(name: str) -> None:
            with torch.no_grad():
                base = self._base[name]
                target = targets[name]
                if not base.is_floating_point():
                    target.copy_(base)
                    return
                if fused:
                    form = plan.coefficients(name)
                    assert form is not None
                    by_row = {r: w for r, w in zip(rows, form.coefficients) if r is not None}
                    _fused_into(target, base, self._stack[name], used, by_row, form.beta)
                    return
                tensors = [self._stack[name][r] if r is not None else torch.zeros_like(base) for r in rows]
                plan.merge_tensor(name, base, tensors, device=self.device, out=target)  # written in place

        pool = self._worker_pool()
        if pool is None:
            for name in self.tensor_names:
                merge_one(name)
        else:
            threads_before = torch.get_num_threads()
            torch.set_num_threads(1)  # tensor-level parallelism: one single-threaded kernel per worker
            try:
                for fut in [pool.submit(merge_one, n) for n in self._by_size]:
                    fut.result()
            finally:
                torch.set_num_threads(threads_before)
        return ApplyStats(method=plan.method.name, tensors=len(self.tensor_names),
                          seconds=time.perf_counter() - t0, fused=fused)


def _fused_into(
    target: torch.Tensor, base: torch.Tensor, stack: torch.Tensor, used: list[int], coef: dict[int, float],
    beta: float,
) -> None:
    """``target = beta * base + sum_r coef[r] * stack[r]`` in one pass over the rows it needs.

    Contiguous used rows (the usual case: a recipe over all resident models) are one ``addmm`` on a view of
    the stack, written straight into ``target``; rows scattered among many unused ones are added one by one.
    """
    n = base.numel()
    direct = target.dtype == base.dtype and target.device == base.device and target.is_contiguous()
    out = target if direct else torch.empty_like(base)
    if not used:
        out.copy_(base)
        if beta != 1.0:
            out.mul_(beta)
    elif used == list(range(used[0], used[-1] + 1)) or 2 * len(used) >= (used[-1] - used[0] + 1):
        lo, hi = used[0], used[-1] + 1
        c = torch.tensor([coef.get(r, 0.0) for r in range(lo, hi)], dtype=stack.dtype, device=stack.device)
        torch.addmm(base.view(1, n), c.view(1, hi - lo), stack[lo:hi].view(hi - lo, n), beta=beta, out=out.view(1, n))
    else:
        torch.mul(base, beta, out=out)
        for r in used:
            out.add_(stack[r], alpha=coef[r])
    if not direct:
        target.copy_(out)
