"""The recipe: the unit that crosses every boundary (search -> executor -> worker -> archive -> export).

Small, serializable and content-hashed; models are referred to by a key (a path for standalone recipes,
a name from the search space inside a search), never carried as weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import ConfigError
from evomerge.files import refuse_unknown_keys
from evomerge.merge.params import ParamValue

OptionValue = str | int | float | bool
# The key a search's recipes give the base model (its fine-tunes go by their names in the search space).
BASE_KEY = "base"


ROWS_OPTION = "rows"  # the recipe option of data-aware methods that names the tasks each model is calibrated on
ROWS_OPTION_DOC = ("the tasks each model is calibrated on, 'key=task,task;key=task' (unnamed models: their own "
                   "task, a merged model its originals' tasks; the population's competence rows)")


def format_model_rows(rows: Mapping[str, Sequence[str]]) -> str:
    """``{"g2.1": ("add", "rev")}`` as the ``rows`` option's text (keys in order, so recipes hash the same)."""
    for key, tasks in rows.items():
        bad = [x for x in (key, *tasks) if not x or any(c in x for c in "=;,")]
        if bad or not tasks:
            raise ConfigError(f"options.rows: model {key!r}: names without '=', ';' or ',' and at least one task "
                              f"expected, got {list(tasks)}")
    return ";".join(f"{key}={','.join(tasks)}" for key, tasks in sorted(rows.items()))


def parse_model_rows(text: str, where: str = "options.rows") -> dict[str, tuple[str, ...]]:
    """The ``rows`` option's text as model key -> tasks (empty text: none named)."""
    out: dict[str, tuple[str, ...]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, tasks = part.partition("=")
        names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        if not sep or not key.strip() or not names or key.strip() in out:
            raise ConfigError(f"{where}: {part!r}: expected 'model=task,task' once per model (in {text!r})")
        out[key.strip()] = names
    return out


@dataclass(frozen=True)
class ModelEntry:
    """One input model and its per-model numeric parameters (weight, density, ...)."""

    model: str
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerSlice:
    """Layers ``[start, end)`` of one model; a recipe's slices are stacked in order (layer stacking).

    ``parameters`` are that source's values (passthrough's ``scale``); per-layer lists are interpolated over
    the slice's own layers, as mergekit does.
    """

    model: str
    start: int
    end: int
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "layer_range": [self.start, self.end],
                "parameters": {k: v.to_yaml() for k, v in sorted(self.parameters.items())}}


@dataclass(frozen=True)
class Recipe:
    """What to merge and how.

    ``parameters`` are numeric and may vary per layer/tensor (see :mod:`evomerge.merge.params`);
    per-model values in ``ModelEntry.parameters`` take precedence over global ones of the same name.
    ``options`` are constants that select behaviour (``trim_scope``, ``sign_rule``, ``normalize``, ...).
    ``slices`` (layer stacking, for methods that stack layers): the output's layers are these ranges of the
    models, in order; ``models`` then lists each sliced model once, without parameters (they are per slice).
    """

    method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None = None
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)
    options: Mapping[str, OptionValue] = field(default_factory=dict)
    dtype: str | None = None
    seed: int = 0
    tokenizer_source: str | None = None
    slices: tuple[LayerSlice, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "base_model": self.base_model,
            "models": [
                {"model": m.model, "parameters": {k: v.to_yaml() for k, v in sorted(m.parameters.items())}}
                for m in self.models
            ],
            "parameters": {k: v.to_yaml() for k, v in sorted(self.parameters.items())},
            "options": dict(sorted(self.options.items())),
            "seed": self.seed,
        }
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        if self.slices:  # only when present, so recipes without slices keep their hashes
            out["slices"] = [s.to_dict() for s in self.slices]
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any], where: str = "recipe") -> Recipe:
        """Parse the evomerge form (structure only; method-level checks live in the registry)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        known = {"method", "base_model", "models", "parameters", "options", "dtype", "seed", "tokenizer_source",
                 "slices"}
        refuse_unknown_keys(data, known, where)
        method = data.get("method")
        if not isinstance(method, str) or not method:
            raise ConfigError(f"{where}.method: missing or not a string")
        slices = _parse_slices(data.get("slices"), where)
        raw_models = data.get("models")
        if raw_models is None and slices:  # each sliced model once (the registry checks a given list)
            raw_models = list(dict.fromkeys(s.model for s in slices))
        if not isinstance(raw_models, list) or not raw_models:
            raise ConfigError(f"{where}.models: expected a non-empty list of models")
        models = []
        for i, item in enumerate(raw_models):
            if isinstance(item, str):
                item = {"model": item}
            if not isinstance(item, Mapping) or not isinstance(item.get("model"), str):
                raise ConfigError(f"{where}.models[{i}]: expected {{model: PATH, parameters: {{...}}}}, got {item!r}")
            refuse_unknown_keys(item, ("model", "parameters"), f"{where}.models[{i}]")
            params = _parse_params(item.get("parameters") or {}, f"{where}.models[{i}].parameters")
            models.append(ModelEntry(item["model"], params))
        base = data.get("base_model")
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"{where}.base_model: expected a path string, got {base!r}")
        options = data.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}.options: expected a mapping")
        for k, v in options.items():
            if not isinstance(v, (str, int, float, bool)):
                raise ConfigError(f"{where}.options.{k}: expected a scalar, got {v!r}")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{where}.seed: expected an integer, got {seed!r}")
        return Recipe(
            method=method,
            models=tuple(models),
            base_model=base,
            parameters=_parse_params(data.get("parameters") or {}, f"{where}.parameters"),
            options=dict(options),
            dtype=data.get("dtype"),
            seed=seed,
            tokenizer_source=data.get("tokenizer_source"),
            slices=slices,
        )

    def content_hash(self) -> str:
        """sha256 of the canonical JSON form: identical recipes hash identically (the archive's dedup key)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=repr)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def map_models(self, ref: Callable[[str], str]) -> Recipe:
        """The recipe with every model reference (base, models, slices) replaced by ``ref(reference)``."""
        return dataclasses.replace(
            self,
            base_model=ref(self.base_model) if self.base_model is not None else None,
            models=tuple(ModelEntry(ref(m.model), dict(m.parameters)) for m in self.models),
            slices=tuple(dataclasses.replace(s, model=ref(s.model)) for s in self.slices),
            options=self.options if not self.options.get(ROWS_OPTION) else {
                **self.options, ROWS_OPTION: format_model_rows(
                    {ref(k): v for k, v in parse_model_rows(str(self.options[ROWS_OPTION])).items()})},
        )

    def model_keys(self) -> list[str]:
        keys = [m.model for m in self.models]
        if self.base_model is not None and self.base_model not in keys:
            keys.insert(0, self.base_model)
        return keys


def _parse_params(raw: Any, where: str) -> dict[str, ParamValue]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of parameter names to values")
    return {str(k): ParamValue.parse(v, f"{where}.{k}") for k, v in raw.items()}


def _parse_slices(raw: Any, where: str) -> tuple[LayerSlice, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.slices: expected a non-empty list of {{model, layer_range: [START, END]}}")
    out = []
    for i, item in enumerate(raw):
        at = f"{where}.slices[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("model"), str) or not item["model"]:
            raise ConfigError(f"{at}: expected {{model: PATH, layer_range: [START, END]}}, got {item!r}")
        refuse_unknown_keys(item, ("model", "layer_range", "parameters"), at)
        start, end = parse_layer_range(item.get("layer_range"), f"{at}.layer_range")
        out.append(LayerSlice(item["model"], start, end,
                              _parse_params(item.get("parameters") or {}, f"{at}.parameters")))
    return tuple(out)


def parse_layer_range(rng: Any, where: str) -> tuple[int, int]:
    """``[START, END]`` as two integers with ``0 <= START < END`` (ConfigError naming ``where`` otherwise)."""
    if (not isinstance(rng, (list, tuple)) or len(rng) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)):
        raise ConfigError(f"{where}: expected [START, END] integers, got {rng!r}")
    start, end = int(rng[0]), int(rng[1])
    if start < 0 or end <= start:
        raise ConfigError(f"{where}: {[start, end]} is empty or negative (need 0 <= START < END)")
    return start, end
