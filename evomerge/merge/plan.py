"""One recipe ready to merge, and the one per-tensor merge step every engine uses.

A :class:`MergePlan` is a recipe checked against its method, its kernel inputs planned (base and models in
kernel order), its options resolved, and what the method's ``prepare`` hook returned. ``merge_tensor`` is the
whole per-tensor step: per-layer parameter values -> kernel options (recipe, runtime, prepared) -> seeded
generator -> kernel -> shape check. The disk engine, the resident merger, the in-memory merge, the sequential
QP calibration and kinship's linear forms all go through it, so a merge means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.kernels.crossover import tensor_depth
from evomerge.merge.kernels.linear import LinearCoefficients
from evomerge.merge.kernels.pieces import Source
from evomerge.merge.kernels.sparsify import global_trim_thresholds
from evomerge.merge.methods.resolve import (
    check_recipe,
    plan_inputs,
    prepared_options,
    resolve_options,
    resolve_tensor_params,
    tensor_generator,
)
from evomerge.merge.methods.spec import MergeMethod, MethodContext, Prepared
from evomerge.merge.recipe import Recipe
from evomerge.models.layers import LayerMap


@dataclass
class MergePlan:
    """A checked recipe and everything its kernel needs per tensor (no tensor is read here).

    ``layer_map`` places each tensor (layer index, kind) for per-layer values and filters; ``options`` are
    the method's defaults overlaid with the recipe's; ``runtime`` the options the engine sets about its inputs
    (``inputs_are_deltas``, global TIES thresholds); ``prepared`` is the ``prepare`` hook's result.
    """

    recipe: Recipe
    method: MergeMethod
    base_key: str | None  # kernel base (None for methods without one)
    input_keys: tuple[str, ...]  # kernel inputs, in kernel order
    layer_map: LayerMap
    options: dict[str, Any]
    runtime: dict[str, Any] = field(default_factory=dict)
    prepared: Prepared | None = None

    @staticmethod
    def of(recipe: Recipe, method: MergeMethod, layer_map: LayerMap, where: str = "recipe") -> MergePlan:
        """Check ``recipe`` against ``method`` (ConfigError naming the field at fault), plan its kernel inputs."""
        check_recipe(recipe, method, where)
        inputs = plan_inputs(recipe, method)
        options: dict[str, Any] = dict(resolve_options(recipe, method))
        if method.base_optional:  # engines may pass a base only to rebuild task vectors (the resident merger)
            options["base_given"] = inputs.base is not None
        return MergePlan(recipe=recipe, method=method, base_key=inputs.base, input_keys=tuple(inputs.models),
                         layer_map=layer_map, options=options)

    @property
    def keys(self) -> list[str]:
        """Every model the kernel reads (base first), each once."""
        return list(dict.fromkeys(([self.base_key] if self.base_key else []) + list(self.input_keys)))

    # ------------------------------------------------------------------------------------ preparation

    def with_runtime_options(self, **options: Any) -> MergePlan:
        """The plan with engine-set kernel options added (``inputs_are_deltas``, ``compute_dtype``, ...)."""
        return dataclasses.replace(self, runtime={**self.runtime, **options})

    def for_full_tensors(self) -> MergePlan:
        """The recipe's plan for inputs that are whole model tensors (no engine options, nothing prepared)."""
        return dataclasses.replace(self, runtime={}, prepared=None)

    def prepare(self, model_paths: Mapping[str, Any], device: str, *, cache: dict[str, Any] | None = None,
                calibration: Any = None, base_scores: Mapping[str, float] | None = None,
                grams: str = "all") -> MergePlan:
        """Run the method's ``prepare`` hook once (calibration Grams, importance, base-score weights);
        ``grams="layer"``: hold one layer's activation statistics at a time (see :class:`MethodContext`)."""
        if self.method.prepare is None:
            return self
        if grams not in ("all", "layer"):
            raise ValueError(f"grams must be 'all' or 'layer', got {grams!r}")
        ctx = MethodContext(plan=self, model_paths=dict(model_paths), device=device,
                            calibration=calibration, base_scores=base_scores,
                            cache=cache if cache is not None else {}, grams=grams)
        return dataclasses.replace(self, prepared=self.method.prepare(ctx))

    @property
    def needs_global_trim(self) -> bool:
        """TIES with ``trim_scope: global`` needs model-wide magnitude thresholds before any tensor."""
        return self.options.get("trim_scope") == "global"

    def global_densities(self) -> list[float]:
        """One density per kernel input (``trim_scope: global`` allows one constant density per model)."""
        model_params, _ = resolve_tensor_params(self.recipe, self.method, "", None, self.layer_map.num_layers, None)
        return [float(mp.get("density", 1.0)) for mp in model_params]

    def with_global_trim(self, task_vectors: Callable[[], Iterator[Sequence[torch.Tensor]]]) -> MergePlan:
        """Thresholds of the model-wide TIES trim, from the task vectors tensor by tensor (read again per call)."""
        if not self.needs_global_trim:
            return self
        thresholds = global_trim_thresholds(task_vectors, self.global_densities())
        return self.with_runtime_options(global_threshold=thresholds)

    # ------------------------------------------------------------------------------------ per tensor

    def place(self, name: str) -> tuple[int | None, str | None]:
        """(layer index, kind) of a tensor."""
        return self.layer_map.layer_of(name), self.layer_map.kind_of(name)

    def tensor_args(self, name: str) -> tuple[list[dict[str, float]], dict[str, float]]:
        """Per-model and global numeric values for one tensor (per-layer lists and filters resolved)."""
        layer, kind = self.place(name)
        return resolve_tensor_params(self.recipe, self.method, name, layer, self.layer_map.num_layers, kind)

    def kernel_options(self, name: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options the kernel sees for one tensor: recipe + runtime, then prepared, then ``extra``."""
        if self.method.positional:
            layer, kind = self.place(name)
            extra = {"depth": tensor_depth(layer, self.layer_map.num_layers, kind), **(extra or {})}
        if not self.prepared and not extra and not self.runtime:
            return self.options
        return {**self.options, **self.runtime, **prepared_options(self.prepared, name), **(extra or {})}

    def generator(self, name: str, device: str | torch.device = "cpu") -> torch.Generator | None:
        """A generator seeded from (recipe seed, tensor name) for random methods, else None."""
        return tensor_generator(self.recipe.seed, name, device) if self.method.uses_generator else None

    def coefficients(self, name: str) -> LinearCoefficients | None:
        """``beta`` and ``c`` of ``beta * base + sum_t c_t tau_t`` for a linear, unprepared method; else None."""
        if self.method.coefficients is None or self.prepared or self.recipe.slices:
            return None
        model_params, params = self.tensor_args(name)
        return self.method.coefficients(model_params, params, self.kernel_options(name))

    def merge_tensor(self, name: str, base: torch.Tensor | Source | None, tensors: Sequence[torch.Tensor | Source],
                     extra_options: Mapping[str, Any] | None = None,
                     device: str | torch.device | None = None,
                     values: tuple[list[dict[str, float]], dict[str, float]] | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Merge one tensor: the kernel on (base, inputs) with this tensor's values, options and generator.

        Integer tensors (buffers) are not merged: the reference input (base, else the first input) is returned.
        ``values``: the per-model and global values when the caller resolved them itself (a layer stack
        resolves them per slice, :mod:`evomerge.merge.formats.layer_stack`); a recipe with slices needs them.
        Inputs may be :class:`~evomerge.merge.kernels.pieces.Source` s (read piece by piece) when the method
        ``streams``. ``out``: the buffer to write the merged tensor into (the tensor's shape, any float dtype;
        a streaming kernel writes it piece by piece, others' results are copied in), returned.
        """
        if values is None and self.recipe.slices:
            raise ConfigError(f"recipe.slices: tensor {name}: a layer stack changes the model's tensors and is "
                              "merged by the disk engine only (merge_to_disk, `evomerge merge`)")
        ref = base if base is not None else tensors[0]
        pieced = any(not isinstance(t, torch.Tensor) for t in [base, *tensors] if t is not None)
        if pieced and not self.method.streams:
            raise ModelError(f"tensor {name}: method {self.method.name} needs whole tensors, got piecewise sources")
        if not ref.dtype.is_floating_point:
            if not isinstance(ref, torch.Tensor):
                raise ModelError(f"tensor {name}: an integer tensor is copied, not merged; pass it whole")
            return ref if out is None else out.copy_(ref)
        model_params, params = values if values is not None else self.tensor_args(name)
        gen = self.generator(name, device if device is not None else ref.device)
        options = self.kernel_options(name, extra_options)
        if self.method.streams:
            merged = self.method.fn(base, list(tensors), model_params, params, options, gen, out=out)
        else:
            merged = self.method.fn(base, list(tensors), model_params, params, options, gen)
            if out is not None and merged.shape == out.shape:
                merged = out.copy_(merged)
        if tuple(merged.shape) != tuple(ref.shape):
            raise ModelError(f"tensor {name}: method {self.method.name} returned shape {tuple(merged.shape)} for "
                             f"inputs of shape {tuple(ref.shape)}")
        return merged
