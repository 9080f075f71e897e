"""mergekit YAML <-> evomerge recipes, for every method of mergekit 0.1.5, so users can move between the two tools.

mergekit puts numbers and switches together under ``parameters``; evomerge keeps numbers (which may vary per
layer or tensor, and which the search tunes) in ``parameters`` and constant switches in ``options``. The
mapping, per mergekit key (the evomerge method's entry decides):

- a name that is an option of the evomerge method (``normalize``, ``filter_wise``, ``nuslerp_flatten``,
  ``normalize_weights``, karcher's ``max_iter`` and ``tol``, multislerp's ``eps``...): that option;
- ``rescale`` (bool, mergekit's L1-norm restore after sparsifying): option ``rescale: l1_norm | none``. mergekit
  rescales DARE and DELLA by default, evomerge divides by the keep probability by default; a mergekit config
  without ``rescale`` on those methods is read as ``l1_norm`` so that both tools compute the same merge;
- any other number (``weight``, ``density``, ``gamma``, ``epsilon``, ``t``, ``lambda``, ``select_topk``,
  ``scale``...): a numeric parameter (scalar, per-layer list, ``filter:`` entries), per model or global. Numbers
  written in YAML's exponent form without a dot (``1e-5``, a string to PyYAML) are read as numbers, as mergekit
  reads them;
- ``int8_mask``: dropped (a mergekit memory switch that does not change the result).

Defaults that differ are made explicit at the edge, so that both tools merge the same: a mergekit config
without ``density`` means mergekit's 1.0 (evomerge's defaults are lower), and a recipe relying on an evomerge
default that mergekit lacks or sets otherwise gets it written out (mergekit requires ``weight`` for most
methods and ``t`` for nearswap).

``slices:``: for a method that stacks layers (passthrough) each slice is one source whose ``layer_range`` is
kept (a slice's own ``parameters`` apply to its source after the source's own); for the other methods only
the form that equals ``models:`` is accepted, one slice whose sources all cover the same whole layer range
(the loader checks that the range is the whole model, see :func:`slice_layer_range`). LoRA references
(``model+lora``) are read as evomerge's ``BASE+ADAPTER`` references (a PEFT adapter applied to that base), and a
recipe model that is an adapter folder is written in that form. ``modules:``, ``tokenizer:``/``union``
vocabularies and chat templates have no evomerge equivalent and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evomerge.errors import ConfigError
from evomerge.files import refuse_unknown_keys
from evomerge.merge.methods.registry import get_method
from evomerge.merge.methods.resolve import resolve_options
from evomerge.merge.methods.spec import MergeMethod
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import LayerSlice, ModelEntry, OptionValue, Recipe, parse_layer_range
from evomerge.models.adapter import model_ref, split_ref

# Methods with the same name and semantics in mergekit 0.1.5 and evomerge (all of mergekit's).
SHARED_METHODS: tuple[str, ...] = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "breadcrumbs", "breadcrumbs_ties",
    "model_stock", "della", "della_linear", "sce", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion",
    "ram", "ramplus_tl", "passthrough",
)
# mergekit's default for `rescale` per method (GeneralizedTaskArithmeticMerge.default_rescale).
_MERGEKIT_RESCALE_DEFAULT: dict[str, bool] = {
    "task_arithmetic": False, "ties": False, "dare_ties": True, "dare_linear": True,
    "breadcrumbs": False, "breadcrumbs_ties": False, "della": True, "della_linear": True,
}
# mergekit's parameter defaults where evomerge's differ (None: mergekit has none and requires a value).
_MERGEKIT_DEFAULTS: dict[str, dict[str, float | None]] = {
    "ties": {"density": 1.0}, "dare_ties": {"density": 1.0}, "dare_linear": {"density": 1.0},
    "breadcrumbs": {"density": 1.0}, "breadcrumbs_ties": {"density": 1.0},
    "della": {"density": 1.0}, "della_linear": {"density": 1.0}, "nearswap": {"t": None},
}
# Methods whose every input needs a weight in mergekit (evomerge defaults it to 1).
_MERGEKIT_NEEDS_WEIGHT: frozenset[str] = frozenset({
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "nuslerp", "multislerp",
})
# evomerge options whose only mergekit-expressible value is this one (mergekit has no switch for them).
_FIXED_IN_MERGEKIT: dict[str, OptionValue] = {
    "trim_scope": "tensor", "sign_rule": "mass", "zero_sign": "positive", "variant": "mergekit",
    "uniform_below": 1e-6,
}
# evomerge options that are mergekit parameters of the same name and meaning.
_MERGEKIT_OPTIONS: frozenset[str] = frozenset({
    "normalize", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "eps", "max_iter", "tol",
})
_DROPPED: frozenset[str] = frozenset({"int8_mask"})
_TOP_KEYS: frozenset[str] = frozenset({
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "chat_template", "modules", "name",
})


def is_mergekit_config(data: Any) -> bool:
    """True for a mapping in mergekit's form (``merge_method``), False for evomerge's (``method``)."""
    return isinstance(data, Mapping) and "merge_method" in data and "method" not in data


def _model_ref(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model path string, got {value!r}")
    try:
        split_ref(value)  # one path, or MODEL+LORA
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return value


def _number(value: Any) -> Any:
    """``value`` with numeric strings (YAML's ``1e-5``) as floats, recursively through lists and filter entries."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return [_number(v) for v in value]
    if isinstance(value, Mapping):
        return {k: (_number(v) if k == "value" else v) for k, v in value.items()}
    return value


def _mergekit_ref(model: str, base: str | None) -> str:
    """mergekit's name for a recipe model: ``BASE+LORA`` for a PEFT adapter folder (mergekit applies it to
    that base), the path otherwise."""
    return model_ref(model, base) if base is not None else model


def _is_numeric_setting(spec: Any) -> bool:
    """Whether a mergekit parameter setting holds numbers (scalar, list, or filter entries with numbers)."""
    if isinstance(spec, bool):
        return False
    if isinstance(spec, (int, float)):
        return True
    if isinstance(spec, Mapping):
        return _is_numeric_setting(spec.get("value"))
    if isinstance(spec, list) and spec:
        return all(_is_numeric_setting(v) for v in spec)
    return False


def _split_parameters(
    raw: Any, method: MergeMethod, where: str, per_model: bool
) -> tuple[dict[str, ParamValue], dict[str, OptionValue]]:
    """mergekit ``parameters`` -> (evomerge numeric parameters, evomerge options)."""
    if raw is None:
        return {}, {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of parameter names to values, got {raw!r}")
    params: dict[str, ParamValue] = {}
    options: dict[str, OptionValue] = {}
    for key, spec in raw.items():
        name = str(key)
        at = f"{where}.{name}"
        if name in _DROPPED:
            continue
        opt = method.option(name)
        if name != "rescale" and opt is None and (method.param(name) is not None or _is_numeric_setting(spec)):
            params[name] = ParamValue.parse(_number(spec), at)
            continue
        if per_model:
            raise ConfigError(f"{at}: {spec!r} is a switch; evomerge takes switches for the whole merge only "
                              "(move it to the top-level parameters)")
        if isinstance(spec, (list, Mapping)):
            raise ConfigError(f"{at}: {spec!r}: a switch must be one constant (no lists or filters)")
        if name == "rescale":
            if not isinstance(spec, bool):
                raise ConfigError(f"{at}: expected true or false, got {spec!r}")
            options["rescale"] = "l1_norm" if spec else "none"
        elif opt is not None and isinstance(opt.default, bool):
            if not isinstance(spec, bool):
                raise ConfigError(f"{at}: expected true or false, got {spec!r}")
            options[name] = spec
        elif opt is not None and isinstance(opt.default, (int, float)) and opt.choices is None:
            options[name] = _number(spec)
        elif isinstance(spec, (str, int, float, bool)):
            options[name] = spec
        else:
            raise ConfigError(f"{at}: unsupported value {spec!r}")
    return params, options


def slice_layer_range(data: Mapping[str, Any]) -> tuple[int, int] | None:
    """The layer range of a ``slices:`` config read as ``models:`` (validated by :func:`from_mergekit`); None
    for ``models:`` and for layer stacks (their ranges are in the recipe's slices)."""
    slices = data.get("slices")
    if not slices or len(slices) != 1 or get_method(str(data["merge_method"])).stacks_layers:
        return None
    rng = slices[0]["sources"][0]["layer_range"]
    return int(rng[0]), int(rng[1])


def _source(src: Any, method: MergeMethod, at: str) -> tuple[str, tuple[int, int], dict[str, ParamValue]]:
    if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
        raise ConfigError(f"{at}: expected {{model: PATH, layer_range: [START, END]}}, got {src!r}")
    refuse_unknown_keys(src, ("model", "layer_range", "parameters"), at)
    rng = parse_layer_range(src["layer_range"], f"{at}.layer_range")
    mp, _ = _split_parameters(src.get("parameters"), method, f"{at}.parameters", per_model=True)
    return _model_ref(src["model"], f"{at}.model"), rng, mp


def _then(first: Mapping[str, ParamValue], fallback: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
    """Parameters of ``first``, falling back to ``fallback`` per name and per tensor (mergekit's precedence)."""
    out = dict(fallback)
    for name, value in first.items():
        out[name] = ParamValue(value.entries + fallback[name].entries) if name in fallback else value
    return out


def from_mergekit(data: Mapping[str, Any], where: str = "mergekit config") -> Recipe:
    """A mergekit configuration (``models:`` or ``slices:`` form) as an evomerge :class:`Recipe`.

    Model references are kept as written (the loader resolves paths). Raises ConfigError naming the field
    for anything mergekit expresses that evomerge cannot (see the module docstring).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown mergekit keys {sorted(unknown)}")
    name = data.get("merge_method")
    if not isinstance(name, str):
        raise ConfigError(f"{where}.merge_method: missing or not a string")
    if name not in SHARED_METHODS:
        raise ConfigError(
            f"{where}.merge_method: mergekit method {name!r} has no evomerge equivalent "
            f"(shared methods: {', '.join(SHARED_METHODS)})"
        )
    method = get_method(name)
    for key in ("modules", "tokenizer", "chat_template"):
        if data.get(key) is not None:
            raise ConfigError(f"{where}.{key}: not supported by evomerge (use a plain models: config)")
    base = data.get("base_model")
    base = _model_ref(base, f"{where}.base_model") if base is not None else None
    params, options = _split_parameters(data.get("parameters"), method, f"{where}.parameters", per_model=False)

    has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
    if has_models == has_slices:
        raise ConfigError(f"{where}: give exactly one of models: or slices:")
    models: list[ModelEntry] = []
    stacked: list[LayerSlice] = []
    if has_models:
        raw_models = data["models"]
        if not isinstance(raw_models, list) or not raw_models:
            raise ConfigError(f"{where}.models: expected a non-empty list")
        for i, item in enumerate(raw_models):
            at = f"{where}.models[{i}]"
            if not isinstance(item, Mapping) or "model" not in item:
                raise ConfigError(f"{at}: expected {{model: PATH, parameters: {{...}}}}, got {item!r}")
            refuse_unknown_keys(item, ("model", "parameters"), at)
            mp, _ = _split_parameters(item.get("parameters"), method, f"{at}.parameters", per_model=True)
            models.append(ModelEntry(_model_ref(item["model"], f"{at}.model"), mp))
    else:
        slices = data["slices"]
        if not isinstance(slices, list) or not slices:
            raise ConfigError(f"{where}.slices: expected a non-empty list")
        if len(slices) != 1 and not method.stacks_layers:
            raise ConfigError(
                f"{where}.slices: {len(slices)} slices stack layer ranges (a frankenmerge), which only passthrough "
                f"does in evomerge; merge with method {name} over one slice covering every layer, or models:"
            )
        for i, sl in enumerate(slices):
            at = f"{where}.slices[{i}]"
            if not isinstance(sl, Mapping) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
                raise ConfigError(f"{at}: expected {{sources: [...]}}")
            refuse_unknown_keys(sl, ("sources", "parameters", "base_model"), at)
            if sl.get("base_model") is not None:
                sb = _model_ref(sl["base_model"], f"{at}.base_model")
                if base is not None and sb != base:
                    raise ConfigError(f"{at}.base_model: {sb!r} differs from base_model {base!r}")
                base = sb
            sp, so = _split_parameters(sl.get("parameters"), method, f"{at}.parameters", per_model=False)
            options.update(so)
            sources = [_source(src, method, f"{at}.sources[{j}]") for j, src in enumerate(sl["sources"])]
            lengths = [rng[1] - rng[0] for _, rng, _ in sources]
            for j, (_, rng, _) in enumerate(sources):
                if lengths[j] != lengths[0]:
                    raise ConfigError(
                        f"{at}.sources[{j}].layer_range: {list(rng)} gives {lengths[j]} layers but sources[0] "
                        f"gives {lengths[0]} ({list(sources[0][1])}): every source of a slice must give the "
                        "same number of layers"
                    )
            if method.stacks_layers:
                if len(sources) != 1:
                    raise ConfigError(f"{at}.sources: method {name} takes one source per slice, got {len(sources)}")
                model, rng, mp = sources[0]
                stacked.append(LayerSlice(model, rng[0], rng[1], _then(mp, sp)))
                continue
            params.update(sp)
            for j, (model, rng, mp) in enumerate(sources):
                if rng[0] != 0:
                    raise ConfigError(
                        f"{at}.sources[{j}].layer_range: {list(rng)}: every source must cover the same full "
                        f"layer range [0, L); evomerge merges partial layer ranges only by stacking (passthrough)"
                    )
                models.append(ModelEntry(model, mp))
        if stacked:
            models = [ModelEntry(m) for m in dict.fromkeys(s.model for s in stacked)]

    if "rescale" not in options and _MERGEKIT_RESCALE_DEFAULT.get(name, False):
        options["rescale"] = "l1_norm"
    inputs = [m for m in models if not (_base_apart(method) and m.model == base)]
    for pname, mk_default in _MERGEKIT_DEFAULTS.get(name, {}).items():
        spec = method.param(pname)
        if mk_default is None or spec is None or pname in params:
            continue
        if not spec.per_model or any(pname not in m.parameters for m in inputs):
            params[pname] = ParamValue.constant(mk_default)
    out_dtype = data.get("out_dtype") or data.get("dtype")
    if out_dtype is not None and not isinstance(out_dtype, str):
        raise ConfigError(f"{where}.dtype: expected a dtype name, got {out_dtype!r}")
    tok = data.get("tokenizer_source")
    if tok is not None:
        if tok == "union":
            raise ConfigError(f"{where}.tokenizer_source: 'union' builds a new vocabulary; evomerge copies the "
                              "tokenizer of one model (base, or a model path)")
        tok = base if tok == "base" else _model_ref(tok, f"{where}.tokenizer_source")
    return Recipe(
        method=name, models=tuple(models), base_model=base, parameters=params, options=options,
        dtype=out_dtype, tokenizer_source=tok, slices=tuple(stacked),
    )


def _check_expressible(value: ParamValue, where: str) -> None:
    for e in value.entries:
        if e.filter is not None and e.filter.startswith("kind:"):
            raise ConfigError(
                f"{where}: filter {e.filter!r} selects tensors by kind, which mergekit cannot express "
                "(use a tensor-name substring such as 'self_attn' or 'mlp')"
            )


def _base_apart(method: MergeMethod) -> bool:
    """Whether a base listed among the models is the kernel's base rather than one of its inputs."""
    return method.needs_base or method.base_optional


def _uses_base(method: MergeMethod, recipe: Recipe) -> bool:
    """Whether mergekit, given the recipe's base_model, merges what evomerge does (it adds an unlisted base as
    an input to methods that take no base: evomerge ignores the base there, so it is left out)."""
    if recipe.slices:
        return True  # the config and tokenizer source of a stack
    if method.needs_base or method.base_as_input or method.base_optional:
        return True
    return any(m.model == recipe.base_model for m in recipe.models)


def to_mergekit(recipe: Recipe) -> dict[str, Any]:
    """The mergekit configuration of ``recipe``; ConfigError when mergekit cannot compute the same merge.

    Not expressible: ``kind:`` filters, options other than their mergekit values (global trim scope, count
    sign rule, paper variant, DARE's divide-by-density and DELLA's divide-by-probability rescale...), per-model
    karcher weights. The recipe's seed is not part of mergekit's YAML (mergekit takes ``--random-seed``; its
    DARE and DELLA masks come from its global generator anyway). A base_model that a base-free method
    (linear, passthrough without slices) ignores is left out.
    """
    where = "recipe"
    if recipe.method not in SHARED_METHODS:
        raise ConfigError(
            f"{where}.method: {recipe.method!r} has no mergekit equivalent (shared: {', '.join(SHARED_METHODS)})"
        )
    method = get_method(recipe.method)
    opts = resolve_options(recipe, method)
    params_out: dict[str, Any] = {}
    for name, value in sorted(opts.items()):
        at = f"{where}.options.{name}"
        if name in _FIXED_IN_MERGEKIT:
            if value != _FIXED_IN_MERGEKIT[name]:
                raise ConfigError(f"{at}: {value!r} is not expressible in mergekit (it only does "
                                  f"{_FIXED_IN_MERGEKIT[name]!r})")
        elif name == "rescale":
            if value not in ("l1_norm", "none"):
                raise ConfigError(
                    f"{at}: {value!r} (divide by the keep probability) is not expressible in mergekit, which "
                    "restores the L1 norm instead; set rescale: l1_norm or none"
                )
            mk = value == "l1_norm"
            if name in recipe.options or mk != _MERGEKIT_RESCALE_DEFAULT.get(recipe.method, False):
                params_out["rescale"] = mk
        elif name in _MERGEKIT_OPTIONS:
            if name in recipe.options:
                params_out[name] = value
        else:
            raise ConfigError(f"{at}: option {name!r} = {value!r} is evomerge-only; mergekit cannot express it")
    if method.name == "karcher":
        own = [i for i, m in enumerate(recipe.models) if "weight" in m.parameters]
        if own:
            raise ConfigError(f"{where}.models[{own[0]}].parameters.weight: mergekit's karcher weights every model "
                              "equally; give no per-model weights (a global weight is the same for all)")
    for name, value in sorted(recipe.parameters.items()):
        _check_expressible(value, f"{where}.parameters.{name}")
        params_out[name] = value.to_yaml()
    inputs = [m for m in recipe.models if not (_base_apart(method) and m.model == recipe.base_model)]
    for pname in _MERGEKIT_DEFAULTS.get(recipe.method, {}):
        spec = method.param(pname)
        if spec is None or pname in recipe.parameters:
            continue
        if not spec.per_model or (not recipe.slices and any(pname not in m.parameters for m in inputs)):
            params_out[pname] = spec.default  # evomerge's default, which mergekit lacks or sets otherwise
    weight_spec = method.param("weight")
    needs_weight = (recipe.method in _MERGEKIT_NEEDS_WEIGHT and weight_spec is not None
                    and "weight" not in recipe.parameters)
    out: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base_model is not None and _uses_base(method, recipe):
        out["base_model"] = recipe.base_model
    if recipe.slices:
        out["slices"] = [_slice_out(sl, f"{where}.slices[{i}]") for i, sl in enumerate(recipe.slices)]
    else:
        models_out: list[dict[str, Any]] = []
        for i, entry in enumerate(recipe.models):
            item: dict[str, Any] = {"model": _mergekit_ref(entry.model, recipe.base_model)}
            params = {k: v.to_yaml() for k, v in sorted(entry.parameters.items())}
            for name, value in entry.parameters.items():
                _check_expressible(value, f"{where}.models[{i}].parameters.{name}")
            if needs_weight and "weight" not in params and not (_base_apart(method) and entry.model == recipe.base_model):
                assert weight_spec is not None
                params["weight"] = weight_spec.default
            if params:
                item["parameters"] = dict(sorted(params.items()))
            models_out.append(item)
        out["models"] = models_out
    if params_out:
        out["parameters"] = params_out
    if recipe.dtype is not None:
        out["dtype"] = recipe.dtype
    if recipe.tokenizer_source is not None:
        out["tokenizer_source"] = recipe.tokenizer_source
    return out


def _slice_out(sl: LayerSlice, where: str) -> dict[str, Any]:
    source: dict[str, Any] = {"model": sl.model, "layer_range": [sl.start, sl.end]}
    for name, value in sl.parameters.items():
        _check_expressible(value, f"{where}.parameters.{name}")
    if sl.parameters:
        source["parameters"] = {k: v.to_yaml() for k, v in sorted(sl.parameters.items())}
    return {"sources": [source]}
