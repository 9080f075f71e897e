"""What a merge method is: its kernel, parameters, options, input rules and what it needs from the caller.

A :class:`MergeMethod` is data: engines, the search's workers, the parent cache, export and kinship ask it
what it needs (:class:`Need`), whether it is linear (``coefficients``), what it reports about itself
(``diagnostics``), instead of testing its name. The registry (:mod:`evomerge.merge.methods.registry`) is one
explicit list of configured entries.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from evomerge.errors import ConfigError
from evomerge.merge.kernels.linear import LinearCoefficients
from evomerge.merge.recipe import OptionValue, Recipe

if TYPE_CHECKING:  # annotations only: the plan is built from these specs
    from evomerge.merge.plan import MergePlan

Kernel = Callable[..., torch.Tensor]
# per-tensor extra kernel options a prepare hook returns ("*" applies to every tensor)
Prepared = Mapping[str, Mapping[str, Any]]

# Options the engines pass to kernels at run time; a recipe may not set them.
RUNTIME_OPTIONS = frozenset({"compute_dtype", "inputs_are_deltas", "global_threshold", "majority_sign", "base_given",
                             "memory_budget", "piece_elems", "part_elems", "cpu_share", "kernel_threads",
                             "depth"})


class Need(str, enum.Enum):
    """What a method needs beyond the per-tensor inputs."""

    GENERATOR = "generator"  # a seeded generator per tensor (random masks)
    CALIBRATION = "calibration"  # task rows per model (a CalibrationSet), for activation statistics
    BASE_SCORES = "base_scores"  # the base model's score on each model's task


@dataclass(frozen=True)
class ParamSpec:
    """A numeric parameter: scalar, per-layer list or filters; per model too when ``per_model``.

    ``lower``/``upper`` bound every value a recipe may give (None: unbounded). ``default`` None: no default; the
    recipe gives it or the caller supplies it (a method's ``needs``), and the kernel sees no value until then.
    """

    name: str
    default: float | None
    lower: float | None = None
    upper: float | None = None
    per_model: bool = False
    doc: str = ""

    def check(self, value: float, where: str, method: str) -> None:
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {self.name} = {value!r} is not a finite number (method {method})")
        if (self.lower is not None and value < self.lower) or (self.upper is not None and value > self.upper):
            raise ConfigError(
                f"{where}: {self.name} = {value!r} outside {self.range_text()} (method {method})"
            )

    def range_text(self) -> str:
        lo = "-inf" if self.lower is None else f"{self.lower:g}"
        hi = "inf" if self.upper is None else f"{self.upper:g}"
        return f"[{lo}, {hi}]"


@dataclass(frozen=True)
class OptionSpec:
    """A constant behaviour switch. ``choices`` None: any value of the default's type (bool, int, float)."""

    name: str
    default: OptionValue
    choices: tuple[str, ...] | None = None
    doc: str = ""

    def check(self, value: Any, where: str, method: str) -> None:
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(
                    f"{where}: {self.name} = {value!r} is not one of {list(self.choices)} (method {method})"
                )
            return
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {self.name} = {value!r} must be true or false (method {method})")
        elif isinstance(self.default, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: {self.name} = {value!r} must be a number (method {method})")


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its kernel and its contract.

    ``min_models``/``max_models`` count the kernel's ``tensors`` (non-base inputs for methods that need a
    base). ``base_as_input``: a recipe's ``base_model`` becomes the first input (slerp, as mergekit).
    ``base_optional``: a recipe's ``base_model``, when given, is the kernel's base (not an input) and the
    kernel merges task vectors against it (nuslerp, multislerp); plans tell the kernel through the runtime
    option ``base_given``, since the resident merger passes a base to every kernel. ``stacks_layers``: the
    method takes ``slices`` (layer stacking, which changes the layer count; each slice is one kernel input).
    ``elementwise``: each output element depends only on the same element of the inputs, so an engine may
    merge a tensor in pieces that stay in cache. ``streams``: the kernel takes
    :class:`~evomerge.merge.kernels.pieces.Source` inputs (read piece by piece) and an ``out`` keyword (the
    buffer it writes, any float dtype), and holds only piece-sized temporaries within
    ``options['memory_budget']``: an engine may hand it inputs it never loads whole.
    ``coefficients``: for linear methods, the per-tensor ``beta * base + sum_t c_t tau_t`` form of the kernel
    (the resident merger's fused path; kinship's exact forms of merged models). ``needs``: what the caller must provide; ``needs_of(recipe)`` narrows it for one
    recipe (a qp recipe that names its own calibration file needs no rows from the caller). ``prepare``: run
    once per recipe before any tensor with a :class:`MethodContext`; it returns per-tensor kernel options.
    ``diagnostics``: what the last prepared merge measured about itself (qp: the residual-energy rho), read
    from the prepare cache.
    """

    name: str
    fn: Kernel
    params: tuple[ParamSpec, ...] = ()
    options: tuple[OptionSpec, ...] = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    doc: str = ""
    base_as_input: bool = False
    base_optional: bool = False
    stacks_layers: bool = False
    elementwise: bool = False
    streams: bool = False
    needs: frozenset[Need] = frozenset()
    coefficients: Callable[[list[dict[str, float]], dict[str, float], Mapping[str, Any]], LinearCoefficients] | None = None
    prepare: Callable[[MethodContext], Prepared] | None = None
    needs_of: Callable[[Recipe], frozenset[Need]] | None = None
    diagnostics: Callable[[Mapping[str, Any]], dict[str, float]] | None = None
    # the kernel needs each tensor's place in the model: the plan passes ``options['depth']`` in [0, 1]
    # (:func:`evomerge.merge.kernels.crossover.tensor_depth`)
    positional: bool = False

    def __post_init__(self) -> None:
        names = [p.name for p in self.params] + [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name}: duplicate parameter/option names {names}")
        if sum((self.needs_base, self.base_as_input, self.base_optional)) > 1:
            raise ValueError(f"method {self.name}: needs_base, base_as_input and base_optional exclude each other")
        data_needs = self.needs - {Need.GENERATOR}
        if data_needs and self.prepare is None:
            raise ValueError(f"method {self.name}: needs {sorted(n.value for n in data_needs)} but has no prepare hook")

    @property
    def uses_generator(self) -> bool:
        return Need.GENERATOR in self.needs

    @property
    def is_linear(self) -> bool:
        return self.coefficients is not None

    def needs_for(self, recipe: Recipe) -> frozenset[Need]:
        """The data the caller must give for this recipe (the generator excluded: engines make it)."""
        declared = self.needs - {Need.GENERATOR}
        return declared if self.needs_of is None else declared & self.needs_of(recipe)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def option(self, name: str) -> OptionSpec | None:
        return next((o for o in self.options if o.name == name), None)

    def default_options(self) -> dict[str, OptionValue]:
        return {o.name: o.default for o in self.options}

    def describe(self) -> dict[str, Any]:
        """Plain-data description (for ``evomerge methods --json`` and documentation)."""
        return {
            "name": self.name,
            "doc": self.doc,
            "needs_base": self.needs_base,
            "base_as_input": self.base_as_input,
            "base_optional": self.base_optional,
            "stacks_layers": self.stacks_layers,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "uses_generator": self.uses_generator,
            "needs": sorted(n.value for n in self.needs - {Need.GENERATOR}),
            "linear": self.is_linear,
            "positional": self.positional,
            "parameters": [
                {"name": p.name, "default": p.default, "lower": p.lower, "upper": p.upper,
                 "per_model": p.per_model, "doc": p.doc}
                for p in self.params
            ],
            "options": [
                {"name": o.name, "default": o.default, "choices": list(o.choices) if o.choices else None,
                 "doc": o.doc}
                for o in self.options
            ],
        }


@dataclass
class MethodContext:
    """What a method's ``prepare`` hook may use: the plan being prepared, where its models live, caller data.

    ``plan``: the recipe checked and its inputs planned. ``model_paths``: recipe model key -> folder (base
    included). ``calibration``: a
    :class:`~evomerge.merge.calibration.rows.CalibrationSet` (None: the method reads its ``calibration``
    option). ``base_scores``: model key -> the base model's score on that model's task. ``cache``: kept by the
    caller across recipes (e.g. by a resident merger) so that recipe-independent work (Grams, importance) is
    done once. ``grams``: ``"all"`` (activation statistics of every layer may be held at once, and cached) or
    ``"layer"`` (memory allows one layer's per model: collect a layer, merge it, drop it; the memory plan says).
    """

    plan: MergePlan
    model_paths: Mapping[str, Any]
    device: str = "cpu"
    calibration: Any = None
    base_scores: Mapping[str, float] | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    grams: str = "all"

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe


class Registry:
    """Name -> method, from one explicit list; a name given twice raises (methods never shadow each other)."""

    def __init__(self, methods: Iterable[MergeMethod] = ()) -> None:
        self._methods: dict[str, MergeMethod] = {}
        for m in methods:
            self.register(m)

    def register(self, method: MergeMethod) -> MergeMethod:
        if method.name in self._methods:
            raise ValueError(f"merge method {method.name!r} is already registered")
        self._methods[method.name] = method
        return method

    def get(self, name: str) -> MergeMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise ConfigError(f"unknown merge method {name!r} (known: {', '.join(self.names())})") from None

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[MergeMethod]:
        return iter(self._methods[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._methods)
