"""The merge-method registry: what each method accepts, recipe validation, per-tensor parameter resolution.

Kernels (``evomerge.merge.methods``) are pure tensor functions; this module holds their contracts:
numeric parameters (:class:`ParamSpec`, may vary per layer/tensor and, when ``per_model``, per model),
behaviour options (:class:`OptionSpec`, constants), and input rules (base, model counts). Engines call
:func:`validate_recipe` once, :func:`plan_inputs` once, then :func:`resolve_tensor_params` and the kernel
for every tensor, with :func:`tensor_generator` for random methods so every engine draws the same masks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.merge import methods as K
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import OptionValue, Recipe

Kernel = Callable[..., torch.Tensor]

# Options the engines pass to kernels at run time; a recipe may not set them.
RUNTIME_OPTIONS = frozenset({"compute_dtype", "inputs_are_deltas", "global_threshold", "majority_sign"})


@dataclass(frozen=True)
class ParamSpec:
    """A numeric parameter: scalar, per-layer list or filters; per model too when ``per_model``.

    ``lower``/``upper`` bound every value a recipe may give (None: unbounded).
    """

    name: str
    default: float
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
    """One merge method: its kernel and contract.

    ``min_models``/``max_models`` count the kernel's ``tensors`` (non-base inputs for methods that need a
    base). ``base_as_input``: a recipe's ``base_model`` becomes the first input (slerp, as mergekit).
    ``uses_generator``: the kernel draws random masks and needs a seeded generator.
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
    uses_generator: bool = False
    # The kernel computes each element from the same element of its inputs (linear, task arithmetic): the disk
    # engine may run it on pieces of a tensor that stay in cache, which is exact and never allocates full-size
    # intermediates.
    elementwise: bool = False
    # Hook for methods that need more than per-tensor inputs (qp: calibration Grams; apl: importance;
    # mergeability_weighted: base scores). Engines call it once per recipe, before any tensor, with a
    # MethodContext; it returns {tensor_name: {option: value}} ("*" applies to every tensor) and the engine
    # merges prepared_options(result, name) into that tensor's kernel options. Added by the qp/apl work.
    prepare: Callable[[MethodContext], Mapping[str, Mapping[str, Any]]] | None = None

    def __post_init__(self) -> None:
        names = [p.name for p in self.params] + [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name}: duplicate parameter/option names {names}")

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
            "min_models": self.min_models,
            "max_models": self.max_models,
            "uses_generator": self.uses_generator,
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
    """What a method's ``prepare`` hook may use: the recipe, where its models live, and caller-provided data.

    ``model_paths``: recipe model key -> folder (base included). ``calibration``: a
    :class:`evomerge.merge.calibration.CalibrationSet` (or None: the method reads its ``calibration`` option).
    ``base_scores``: model key -> the base model's score on that model's task (measured by the caller, e.g.
    cached in the search archive). ``cache``: kept by the caller across recipes (e.g. by a resident merger)
    so that expensive, recipe-independent work (Grams, importance) is done once.
    """

    recipe: Recipe
    model_paths: Mapping[str, Any]
    device: str = "cpu"
    calibration: Any = None
    base_scores: Mapping[str, float] | None = None
    cache: dict[str, Any] = field(default_factory=dict)


def prepared_options(prepared: Mapping[str, Mapping[str, Any]] | None, tensor_name: str) -> dict[str, Any]:
    """The extra kernel options a ``prepare`` result gives one tensor (its own entry over the ``"*"`` entry)."""
    if not prepared:
        return {}
    out = dict(prepared.get("*", {}))
    out.update(prepared.get(tensor_name, {}))
    return out


class Registry:
    """Name -> method; registering a name twice raises (two methods must never shadow each other)."""

    def __init__(self) -> None:
        self._methods: dict[str, MergeMethod] = {}

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


REGISTRY = Registry()


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the global registry (raises ValueError on a duplicate name)."""
    return REGISTRY.register(method)


def get_method(name: str) -> MergeMethod:
    """The registered method, or ConfigError listing the known names."""
    return REGISTRY.get(name)


def _method(method: MergeMethod | str) -> MergeMethod:
    return method if isinstance(method, MergeMethod) else get_method(method)


# ---------------------------------------------------------------------------------------- input planning


@dataclass(frozen=True)
class InputPlan:
    """Which recipe models feed the kernel: ``base`` (or None) and ``models`` in kernel order.

    ``indices[i]`` is the position of ``models[i]`` in ``recipe.models`` (None for a base used as input).
    Methods that need a base drop entries equal to ``base_model`` from the inputs (mergekit does too).
    """

    base: str | None
    models: tuple[str, ...]
    indices: tuple[int | None, ...] = field(default=())


def plan_inputs(recipe: Recipe, method: MergeMethod | str | None = None) -> InputPlan:
    """The kernel's inputs for this recipe (no validation beyond the method lookup)."""
    m = _method(method if method is not None else recipe.method)
    if m.needs_base:
        keep = [(i, e.model) for i, e in enumerate(recipe.models) if e.model != recipe.base_model]
        return InputPlan(recipe.base_model, tuple(k for _, k in keep), tuple(i for i, _ in keep))
    if m.base_as_input and recipe.base_model is not None:
        rest = [(i, e.model) for i, e in enumerate(recipe.models) if e.model != recipe.base_model]
        base_idx = next((i for i, e in enumerate(recipe.models) if e.model == recipe.base_model), None)
        return InputPlan(
            None, (recipe.base_model,) + tuple(k for _, k in rest), (base_idx,) + tuple(i for i, _ in rest)
        )
    return InputPlan(None, tuple(e.model for e in recipe.models), tuple(range(len(recipe.models))))


# -------------------------------------------------------------------------------------------- validation


def _check_values(spec: ParamSpec, value: ParamValue, where: str, method: str) -> None:
    for j, entry in enumerate(value.entries):
        for k, v in enumerate(entry.values):
            at = where
            if len(value.entries) > 1 or entry.filter is not None:
                at += f"[{j}]" + (f" (filter {entry.filter!r})" if entry.filter is not None else "")
            if len(entry.values) > 1:
                at += f"[{k}]"
            spec.check(v, at, method)


def resolve_options(recipe: Recipe, method: MergeMethod | str | None = None) -> dict[str, OptionValue]:
    """The method's option defaults overlaid with the recipe's options."""
    m = _method(method if method is not None else recipe.method)
    out = m.default_options()
    out.update(recipe.options)
    return out


def validate_recipe(recipe: Recipe, where: str = "recipe") -> MergeMethod:
    """Check a recipe against its method before any work; returns the method.

    Unknown method, parameter or option names, out-of-range values (every value of per-layer lists and
    filter entries), missing base model, wrong model counts: each a ConfigError naming field and value.
    """
    m = get_method(recipe.method)
    if m.needs_base and not recipe.base_model:
        raise ConfigError(f"{where}.base_model: method {m.name} needs a base model")
    plan = plan_inputs(recipe, m)
    n = len(plan.models)
    if n < m.min_models or (m.max_models is not None and n > m.max_models):
        if m.max_models == m.min_models:
            want = f"exactly {m.min_models}"
        elif m.max_models is None:
            want = f"at least {m.min_models}"
        else:
            want = f"{m.min_models} to {m.max_models}"
        what = "models besides the base" if m.needs_base else "input models"
        raise ConfigError(f"{where}.models: method {m.name} needs {want} {what}, got {n} ({list(plan.models)})")
    if len(set(plan.models)) != len(plan.models):
        raise ConfigError(f"{where}.models: a model is listed twice ({list(plan.models)})")
    known_params = ", ".join(p.name for p in m.params) or "none"
    for name, value in recipe.parameters.items():
        spec = m.param(name)
        if spec is None:
            raise ConfigError(
                f"{where}.parameters.{name}: unknown parameter for method {m.name} (known: {known_params})"
            )
        _check_values(spec, value, f"{where}.parameters.{name}", m.name)
    for i, entry in enumerate(recipe.models):
        for name, value in entry.parameters.items():
            at = f"{where}.models[{i}].parameters.{name}"
            spec = m.param(name)
            if spec is None:
                raise ConfigError(f"{at}: unknown parameter for method {m.name} (known: {known_params})")
            if not spec.per_model:
                raise ConfigError(f"{at}: {name} is a global parameter of {m.name}; set it under parameters")
            _check_values(spec, value, at, m.name)
    known_opts = ", ".join(o.name for o in m.options) or "none"
    for name, value in recipe.options.items():
        spec_o = m.option(name)
        if spec_o is None:
            extra = " (set by the merge engine, not by recipes)" if name in RUNTIME_OPTIONS else ""
            raise ConfigError(
                f"{where}.options.{name}: unknown option for method {m.name}{extra} (known: {known_opts})"
            )
        spec_o.check(value, f"{where}.options.{name}", m.name)
    opts = resolve_options(recipe, m)
    if opts.get("trim_scope") == "global":
        for i, entry in enumerate(recipe.models):
            dv = entry.parameters.get("density", recipe.parameters.get("density"))
            if dv is not None and (len(dv.entries) != 1 or len(dv.entries[0].values) != 1):
                raise ConfigError(
                    f"{where}.models[{i}].parameters.density: trim_scope global needs one constant density "
                    f"per model, got {dv.to_yaml()!r}"
                )
    return m


# ---------------------------------------------------------------------------------------- per-tensor values


def resolve_tensor_params(
    recipe: Recipe,
    method: MergeMethod | str | None,
    tensor_name: str,
    layer: int | None,
    num_layers: int,
    kind: str | None = None,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Numeric values for one tensor: (one dict per kernel input, in ``plan_inputs`` order; global dict).

    Precedence per model: the model's own value, then the recipe's global value, then the default. A list
    is interpolated at ``u = layer/(L-1)``; filters match substrings or ``kind:NAME`` (see params.py).
    """
    m = _method(method if method is not None else recipe.method)
    glob: dict[str, float] = {}
    for spec in m.params:
        pv = recipe.parameters.get(spec.name)
        v = pv.resolve(tensor_name, layer, num_layers, kind) if pv is not None else None
        glob[spec.name] = spec.default if v is None else v
    per_model_specs = [p for p in m.params if p.per_model]
    plan = plan_inputs(recipe, m)
    out: list[dict[str, float]] = []
    for idx in plan.indices:
        own = recipe.models[idx].parameters if idx is not None else {}
        d: dict[str, float] = {}
        for spec in per_model_specs:
            pv = own.get(spec.name)
            v = pv.resolve(tensor_name, layer, num_layers, kind) if pv is not None else None
            d[spec.name] = glob[spec.name] if v is None else v
        out.append(d)
    return out, glob


def tensor_generator(seed: int, tensor_name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from (recipe seed, tensor name): same masks in every engine, any tensor order."""
    digest = hashlib.sha256(f"{int(seed)}:{tensor_name}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


# ------------------------------------------------------------------------------------------ built-ins

_WEIGHT = ParamSpec("weight", 1.0, None, None, True, "per-model weight (mergekit 'weight'; negative allowed)")
_LAMBDA = ParamSpec("lambda", 1.0, None, None, False, "scale of the merged task vector: base + lambda * merged")


def _density(default: float, doc: str) -> ParamSpec:
    return ParamSpec("density", default, 0.0, 1.0, True, doc)


_NORMALIZE_T = OptionSpec("normalize", True, None, "divide by the summed weights (of the agreeing models for TIES)")
_NORMALIZE_F = OptionSpec("normalize", False, None, "divide by the summed weights (of the agreeing models for TIES)")
_SIGN_RULE = OptionSpec(
    "sign_rule", "mass", ("mass", "majority_count"), "elect sgn(sum tau) (mass) or the majority of signs (count)"
)
_ZERO_SIGN = OptionSpec(
    "zero_sign", "positive", ("positive", "global_majority"),
    "elected sign where the sum is exactly 0: + (mergekit) or the majority sign (official TIES code)",
)
_VARIANT = OptionSpec(
    "variant", "mergekit", ("mergekit", "paper"),
    "mergekit: weight before the election, normalize by agreeing weights; paper: elect unweighted, mean by count",
)
_RESCALE_CHOICES = ("none", "inverse_density", "l1_norm")


def _rescale(default: str) -> OptionSpec:
    return OptionSpec(
        "rescale", default, _RESCALE_CHOICES,
        "after sparsifying: divide by density (DARE paper), restore the L1 norm (mergekit rescale), or none",
    )


def _register_builtins() -> None:
    register(MergeMethod(
        "linear", K.linear, (_WEIGHT,), (_NORMALIZE_T,), needs_base=False, min_models=1, elementwise=True,
        doc="weighted average of the models (model soup); base_model is not an input",
    ))
    register(MergeMethod(
        "task_arithmetic", K.task_arithmetic, (_WEIGHT, _LAMBDA), (_NORMALIZE_F,), needs_base=True, elementwise=True,
        doc="base + lambda * sum_t w_t (theta_t - base)",
    ))
    register(MergeMethod(
        "ties", K.ties,
        (_WEIGHT, _density(0.2, "fraction of each task vector KEPT (top magnitudes; mergekit default 1.0)"), _LAMBDA),
        (
            _NORMALIZE_T,
            OptionSpec("trim_scope", "tensor", ("tensor", "global"),
                       "top-k per tensor (mergekit) or over the whole model (official TIES; needs a prepass)"),
            _SIGN_RULE, _ZERO_SIGN, _VARIANT, _rescale("none"),
        ),
        needs_base=True,
        doc="TIES: trim to top-density magnitudes, elect signs, disjoint mean",
    ))
    register(MergeMethod(
        "dare_linear", K.dare_linear,
        (_WEIGHT, _density(0.5, "keep probability of each delta entry (1 - DARE's drop rate p)"), _LAMBDA),
        (_NORMALIZE_F, _rescale("inverse_density")),
        needs_base=True, uses_generator=True,
        doc="DARE random drop and rescale, then task arithmetic",
    ))
    register(MergeMethod(
        "dare_ties", K.dare_ties,
        (_WEIGHT, _density(0.5, "keep probability of each delta entry (1 - DARE's drop rate p)"), _LAMBDA),
        (_NORMALIZE_F, _rescale("inverse_density"), _SIGN_RULE, _ZERO_SIGN, _VARIANT),
        needs_base=True, uses_generator=True,
        doc="DARE random drop and rescale, then TIES sign election",
    ))
    gamma = ParamSpec("gamma", 0.01, 0.0, 1.0, True, "fraction of the LARGEST magnitudes dropped as outliers")
    bc_density = _density(0.9, "fraction kept after dropping outliers and the smallest magnitudes")
    register(MergeMethod(
        "breadcrumbs", K.breadcrumbs, (_WEIGHT, bc_density, gamma, _LAMBDA), (_NORMALIZE_F, _rescale("none")),
        needs_base=True,
        doc="Model Breadcrumbs: drop outliers and small deltas, then task arithmetic",
    ))
    register(MergeMethod(
        "breadcrumbs_ties", K.breadcrumbs_ties, (_WEIGHT, bc_density, gamma, _LAMBDA),
        (_NORMALIZE_F, _rescale("none"), _SIGN_RULE, _ZERO_SIGN, _VARIANT),
        needs_base=True,
        doc="Model Breadcrumbs sparsification, then TIES sign election",
    ))
    register(MergeMethod(
        "slerp", K.slerp,
        (ParamSpec("t", 0.5, 0.0, 1.0, False, "interpolation position: 0 = first model (the base), 1 = second"),),
        (), needs_base=False, min_models=2, max_models=2, base_as_input=True,
        doc="spherical interpolation of two models (base_model, if given, is the t = 0 end)",
    ))
    register(MergeMethod(
        "model_stock", K.model_stock, (),
        (OptionSpec("filter_wise", False, None, "cosines per row instead of per tensor"),),
        needs_base=True, min_models=2,
        doc="Model Stock: interpolate base and the models' mean by their task vectors' mean cosine",
    ))


_register_builtins()

# The methods defined here (other modules register more into REGISTRY on import).
BUILTIN_METHODS: tuple[str, ...] = tuple(REGISTRY.names())


def all_methods() -> list[MergeMethod]:
    """Every registered method, by name."""
    return list(REGISTRY)


def _register_extensions() -> None:
    """Methods defined outside this module (seed-paper methods); each registers itself on import."""
    import importlib

    for mod in ("evomerge.merge.qp", "evomerge.merge.apl", "evomerge.merge.mergeability"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a module not written yet
            if exc.name != mod:
                raise


_register_extensions()
