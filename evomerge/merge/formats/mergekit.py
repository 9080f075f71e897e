"""mergekit YAML <-> evomerge recipes, for the methods both share, so users can move between the two tools.

mergekit puts numbers and switches together under ``parameters``; evomerge keeps numbers (which may vary per
layer or tensor, and which the search tunes) in ``parameters`` and constant switches in ``options``. The
mapping, per mergekit key:

- ``weight``, ``density``, ``gamma``, ``t``, ``lambda``: numeric parameters (scalar, per-layer list, ``filter:``
  entries), per model or global, unchanged.
- ``normalize``, ``filter_wise``: options of the same name.
- ``rescale`` (bool, mergekit's L1-norm restore after sparsifying): option ``rescale: l1_norm | none``. mergekit
  rescales DARE by default, evomerge divides by the density by default; a mergekit config without ``rescale``
  on a DARE method is read as ``l1_norm`` so that both tools compute the same merge.
- ``int8_mask``: dropped (a mergekit memory switch that does not change the result).
- any other switch: an option of that name (the registry then accepts or rejects it for the method).

``slices:`` are accepted only in the form that equals ``models:``: one slice whose sources all cover the
same layer range starting at 0 (the loader checks that the range is the whole model, see
:func:`slice_layer_range`). LoRA references (``model+lora``) are read as evomerge's ``BASE+ADAPTER``
references (a PEFT adapter applied to that base), and a recipe model that is an adapter folder is written
in that form. Layer stacking (several slices), ``modules:``, ``tokenizer:``/``union`` vocabularies and chat
templates have no evomerge equivalent and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evomerge.errors import ConfigError
from evomerge.merge.methods.registry import get_method
from evomerge.merge.methods.resolve import resolve_options
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, OptionValue, Recipe
from evomerge.models.adapter import model_ref, split_ref

# Methods with the same name and semantics in mergekit 0.1.5 and evomerge.
SHARED_METHODS: tuple[str, ...] = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "breadcrumbs", "breadcrumbs_ties",
    "model_stock",
)
NUMERIC_PARAMS: frozenset[str] = frozenset({"weight", "density", "gamma", "t", "lambda"})
# mergekit's default for `rescale` per method (GeneralizedTaskArithmeticMerge.default_rescale).
_MERGEKIT_RESCALE_DEFAULT: dict[str, bool] = {
    "task_arithmetic": False, "ties": False, "dare_ties": True, "dare_linear": True,
    "breadcrumbs": False, "breadcrumbs_ties": False,
}
# evomerge options whose only mergekit-expressible value is this one (mergekit has no switch for them).
_FIXED_IN_MERGEKIT: dict[str, OptionValue] = {
    "trim_scope": "tensor", "sign_rule": "mass", "zero_sign": "positive", "variant": "mergekit",
}
_BOOL_OPTIONS: frozenset[str] = frozenset({"normalize", "filter_wise"})
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
    raw: Any, method: str, where: str, per_model: bool
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
        if _is_numeric_setting(spec) and name not in _BOOL_OPTIONS and name != "rescale":
            params[name] = ParamValue.parse(spec, at)
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
        elif name in _BOOL_OPTIONS:
            if not isinstance(spec, bool):
                raise ConfigError(f"{at}: expected true or false, got {spec!r}")
            options[name] = spec
        elif isinstance(spec, (str, int, float, bool)):
            options[name] = spec
        else:
            raise ConfigError(f"{at}: unsupported value {spec!r}")
    return params, options


def slice_layer_range(data: Mapping[str, Any]) -> tuple[int, int] | None:
    """The layer range of a ``slices:`` config (validated by :func:`from_mergekit`), None for ``models:``."""
    slices = data.get("slices")
    if not slices:
        return None
    rng = slices[0]["sources"][0]["layer_range"]
    return int(rng[0]), int(rng[1])


def from_mergekit(data: Mapping[str, Any], where: str = "mergekit config") -> Recipe:
    """A mergekit configuration (``models:`` or single-slice ``slices:`` form) as an evomerge :class:`Recipe`.

    Model references are kept as written (the loader resolves paths). Raises ConfigError naming the field
    for anything mergekit expresses that evomerge cannot (see the module docstring).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown mergekit keys {sorted(unknown)}")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError(f"{where}.merge_method: missing or not a string")
    if method not in SHARED_METHODS:
        raise ConfigError(
            f"{where}.merge_method: mergekit method {method!r} has no evomerge equivalent "
            f"(shared methods: {', '.join(SHARED_METHODS)})"
        )
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
    if has_models:
        raw_models = data["models"]
        if not isinstance(raw_models, list) or not raw_models:
            raise ConfigError(f"{where}.models: expected a non-empty list")
        for i, item in enumerate(raw_models):
            at = f"{where}.models[{i}]"
            if not isinstance(item, Mapping) or "model" not in item:
                raise ConfigError(f"{at}: expected {{model: PATH, parameters: {{...}}}}, got {item!r}")
            extra = set(item) - {"model", "parameters"}
            if extra:
                raise ConfigError(f"{at}: unknown keys {sorted(extra)}")
            mp, _ = _split_parameters(item.get("parameters"), method, f"{at}.parameters", per_model=True)
            models.append(ModelEntry(_model_ref(item["model"], f"{at}.model"), mp))
    else:
        slices = data["slices"]
        if not isinstance(slices, list) or not slices:
            raise ConfigError(f"{where}.slices: expected a non-empty list")
        if len(slices) != 1:
            raise ConfigError(
                f"{where}.slices: {len(slices)} slices stack layer ranges (a frankenmerge); evomerge merges whole "
                "models: use one slice covering every layer, or the models: form"
            )
        sl = slices[0]
        at = f"{where}.slices[0]"
        if not isinstance(sl, Mapping) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise ConfigError(f"{at}: expected {{sources: [...]}}")
        extra = set(sl) - {"sources", "parameters", "base_model"}
        if extra:
            raise ConfigError(f"{at}: unsupported keys {sorted(extra)}")
        if sl.get("base_model") is not None:
            sb = _model_ref(sl["base_model"], f"{at}.base_model")
            if base is not None and sb != base:
                raise ConfigError(f"{at}.base_model: {sb!r} differs from base_model {base!r}")
            base = sb
        sp, so = _split_parameters(sl.get("parameters"), method, f"{at}.parameters", per_model=False)
        params.update(sp)
        options.update(so)
        first_range = None
        for j, src in enumerate(sl["sources"]):
            sat = f"{at}.sources[{j}]"
            if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{sat}: expected {{model: PATH, layer_range: [START, END]}}, got {src!r}")
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise ConfigError(f"{sat}: unknown keys {sorted(extra)}")
            rng = src["layer_range"]
            if (not isinstance(rng, (list, tuple)) or len(rng) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)):
                raise ConfigError(f"{sat}.layer_range: expected [START, END] integers, got {rng!r}")
            rng = (int(rng[0]), int(rng[1]))
            if first_range is None:
                first_range = rng
            if rng != first_range or rng[0] != 0 or rng[1] <= 0:
                raise ConfigError(
                    f"{sat}.layer_range: {list(rng)}: every source must cover the same full layer range [0, L) "
                    f"(first source: {list(first_range)}); evomerge does not merge partial layer ranges"
                )
            mp, _ = _split_parameters(src.get("parameters"), method, f"{sat}.parameters", per_model=True)
            models.append(ModelEntry(_model_ref(src["model"], f"{sat}.model"), mp))

    if "rescale" not in options and _MERGEKIT_RESCALE_DEFAULT.get(method, False):
        options["rescale"] = "l1_norm"
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
        method=method, models=tuple(models), base_model=base, parameters=params, options=options,
        dtype=out_dtype, tokenizer_source=tok,
    )


def _check_expressible(value: ParamValue, where: str) -> None:
    for e in value.entries:
        if e.filter is not None and e.filter.startswith("kind:"):
            raise ConfigError(
                f"{where}: filter {e.filter!r} selects tensors by kind, which mergekit cannot express "
                "(use a tensor-name substring such as 'self_attn' or 'mlp')"
            )


def to_mergekit(recipe: Recipe) -> dict[str, Any]:
    """The mergekit configuration of ``recipe``; ConfigError when mergekit cannot compute the same merge.

    Not expressible: methods mergekit lacks, ``kind:`` filters, options other than their mergekit values
    (global trim scope, count sign rule, paper variant, DARE's divide-by-density rescale...). The recipe's
    seed is not part of mergekit's YAML (mergekit takes ``--random-seed``; its DARE masks differ anyway).
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
            if value == "inverse_density":
                raise ConfigError(
                    f"{at}: 'inverse_density' (DARE's divide by density) is not expressible in mergekit, which "
                    "restores the L1 norm instead; set rescale: l1_norm or none"
                )
            mk = value == "l1_norm"
            if name in recipe.options or mk != _MERGEKIT_RESCALE_DEFAULT.get(recipe.method, False):
                params_out["rescale"] = mk
        elif name in _BOOL_OPTIONS:
            if name in recipe.options:
                params_out[name] = bool(value)
        else:
            raise ConfigError(f"{at}: option {name!r} = {value!r} is evomerge-only; mergekit cannot express it")
    for name, value in sorted(recipe.parameters.items()):
        _check_expressible(value, f"{where}.parameters.{name}")
        params_out[name] = value.to_yaml()
    # mergekit requires a weight for every input of these methods; evomerge defaults it to 1.
    weight_spec = method.param("weight")
    needs_weight = weight_spec is not None and "weight" not in recipe.parameters
    models_out: list[dict[str, Any]] = []
    for i, entry in enumerate(recipe.models):
        item: dict[str, Any] = {"model": _mergekit_ref(entry.model, recipe.base_model)}
        params = {k: v.to_yaml() for k, v in sorted(entry.parameters.items())}
        for name, value in entry.parameters.items():
            _check_expressible(value, f"{where}.models[{i}].parameters.{name}")
        if needs_weight and "weight" not in params and not (method.needs_base and entry.model == recipe.base_model):
            params["weight"] = weight_spec.default
        if params:
            item["parameters"] = dict(sorted(params.items()))
        models_out.append(item)
    out: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base_model is not None:
        out["base_model"] = recipe.base_model
    out["models"] = models_out
    if params_out:
        out["parameters"] = params_out
    if recipe.dtype is not None:
        out["dtype"] = recipe.dtype
    if recipe.tokenizer_source is not None:
        out["tokenizer_source"] = recipe.tokenizer_source
    return out
