"""From a recipe to kernel arguments: input planning, validation, per-tensor parameter values, generators.

Engines check a recipe once (:func:`check_recipe`), plan its inputs once (:func:`plan_inputs`), then for every
tensor resolve its per-layer values (:func:`resolve_tensor_params`) and, for random methods, a generator
seeded from (recipe seed, tensor name) (:func:`tensor_generator`), so every engine draws the same masks.
:class:`evomerge.merge.plan.MergePlan` does all of this for one recipe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.spec import RUNTIME_OPTIONS, MergeMethod, ParamSpec, Prepared
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import OptionValue, Recipe


@dataclass(frozen=True)
class InputPlan:
    """Which recipe models feed the kernel: ``base`` (or None) and ``models`` in kernel order.

    ``indices[i]`` is the position of ``models[i]`` in ``recipe.models`` (None for a base used as input).
    Methods that need a base drop entries equal to ``base_model`` from the inputs (mergekit does too).
    """

    base: str | None
    models: tuple[str, ...]
    indices: tuple[int | None, ...] = field(default=())


def plan_inputs(recipe: Recipe, m: MergeMethod) -> InputPlan:
    """The kernel's inputs for this recipe (no validation).

    A recipe with ``slices`` has each sliced model as an input (one of them per output tensor, see
    :mod:`evomerge.merge.formats.layer_stack`).
    """
    if recipe.slices:
        keys = tuple(dict.fromkeys(sl.model for sl in recipe.slices))
        pos = {e.model: i for i, e in enumerate(recipe.models)}
        return InputPlan(None, keys, tuple(pos.get(k) for k in keys))
    if m.needs_base or (m.base_optional and recipe.base_model is not None):
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


def resolve_options(recipe: Recipe, m: MergeMethod) -> dict[str, OptionValue]:
    """The method's option defaults overlaid with the recipe's options."""
    out = m.default_options()
    out.update(recipe.options)
    return out


def _check_per_model(m: MergeMethod, values: Mapping[str, ParamValue], where: str, known: str) -> None:
    """One model's (or one slice's) own parameters: known, per-model, in range."""
    for name, value in values.items():
        at = f"{where}.{name}"
        spec = m.param(name)
        if spec is None:
            raise ConfigError(f"{at}: unknown parameter for method {m.name} (known: {known})")
        if not spec.per_model:
            raise ConfigError(f"{at}: {name} is a global parameter of {m.name}; set it under parameters")
        _check_values(spec, value, at, m.name)


def check_recipe(recipe: Recipe, m: MergeMethod, where: str = "recipe") -> MergeMethod:
    """Check a recipe against its method before any work; returns the method.

    Unknown parameter or option names, out-of-range values (every value of per-layer lists and filter
    entries), missing base model, wrong model counts: each a ConfigError naming field and value.
    """
    if m.needs_base and not recipe.base_model:
        raise ConfigError(f"{where}.base_model: method {m.name} needs a base model")
    plan = plan_inputs(recipe, m)
    n = 1 if recipe.slices else len(plan.models)  # a stack merges one slice (one input) per output tensor
    if recipe.slices:
        _check_slices(recipe, m, where)
    if n < m.min_models or (m.max_models is not None and n > m.max_models):
        if m.max_models == m.min_models:
            want = f"exactly {m.min_models}"
        elif m.max_models is None:
            want = f"at least {m.min_models}"
        else:
            want = f"{m.min_models} to {m.max_models}"
        what = "models besides the base" if m.needs_base or plan.base is not None else "input models"
        if recipe.slices:
            raise ConfigError(f"{where}.slices: method {m.name} needs {want} {what} per tensor; a slice is one")
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
        _check_per_model(m, entry.parameters, f"{where}.models[{i}].parameters", known_params)
    known_opts = ", ".join(o.name for o in m.options) or "none"
    for name, value in recipe.options.items():
        spec_o = m.option(name)
        if spec_o is None:
            extra = " (set by the merge engine, not by recipes)" if name in RUNTIME_OPTIONS else ""
            raise ConfigError(
                f"{where}.options.{name}: unknown option for method {m.name}{extra} (known: {known_opts})"
            )
        spec_o.check(value, f"{where}.options.{name}", m.name)
    for i, sl in enumerate(recipe.slices):
        _check_per_model(m, sl.parameters, f"{where}.slices[{i}].parameters", known_params)
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


def _check_slices(recipe: Recipe, m: MergeMethod, where: str) -> None:
    """Structure of a layer stack (ranges against the models' layer counts: formats.layer_stack)."""
    if not m.stacks_layers:
        raise ConfigError(f"{where}.slices: method {m.name} does not stack layers (only methods that do, such as "
                          "passthrough, take slices); merge whole models with models:")
    sliced = list(dict.fromkeys(sl.model for sl in recipe.slices))
    if [e.model for e in recipe.models] != sliced or any(e.parameters for e in recipe.models):
        raise ConfigError(
            f"{where}.models: with slices, models lists each sliced model once, in order of first use, without "
            f"parameters (set them per slice): expected {sliced}, got {[e.model for e in recipe.models]}"
        )
    for i, sl in enumerate(recipe.slices):
        if sl.start < 0 or sl.end <= sl.start:
            raise ConfigError(f"{where}.slices[{i}].layer_range: {[sl.start, sl.end]} is empty or negative "
                              "(need 0 <= START < END)")


# ---------------------------------------------------------------------------------------- per-tensor values


def resolve_tensor_params(
    recipe: Recipe,
    m: MergeMethod,
    tensor_name: str,
    layer: int | None,
    num_layers: int,
    kind: str | None = None,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Numeric values for one tensor: (one dict per kernel input, in ``plan_inputs`` order; global dict).

    Precedence per model: the model's own value, then the recipe's global value, then the default. A list
    is interpolated at ``u = layer/(L-1)``; filters match substrings or ``kind:NAME`` (see params.py).
    """
    glob: dict[str, float] = {}
    for spec in m.params:
        pv = recipe.parameters.get(spec.name)
        v = pv.resolve(tensor_name, layer, num_layers, kind) if pv is not None else None
        if v is not None or spec.default is not None:
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
            if v is not None or spec.name in glob:
                d[spec.name] = glob[spec.name] if v is None else v
        out.append(d)
    return out, glob


def tensor_generator(seed: int, tensor_name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from (recipe seed, tensor name): same masks in every engine, any tensor order."""
    digest = hashlib.sha256(f"{int(seed)}:{tensor_name}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g




def prepared_options(prepared: Prepared | None, tensor_name: str) -> dict[str, Any]:
    """The extra kernel options a ``prepare`` result gives one tensor (its own entry over the ``"*"`` entry)."""
    if not prepared:
        return {}
    out = dict(prepared.get("*", {}))
    out.update(prepared.get(tensor_name, {}))
    return out
