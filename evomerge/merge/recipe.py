"""The recipe: the unit that crosses every boundary (search -> executor -> worker -> archive -> export).

Small, serializable and content-hashed; models are referred to by a key (a path for standalone recipes,
a name from the search space inside a search), never carried as weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import ConfigError
from evomerge.merge.params import ParamValue

OptionValue = str | int | float | bool
# The key a search's recipes give the base model (its fine-tunes go by their names in the search space).
BASE_KEY = "base"


@dataclass(frozen=True)
class ModelEntry:
    """One input model and its per-model numeric parameters (weight, density, ...)."""

    model: str
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """What to merge and how.

    ``parameters`` are numeric and may vary per layer/tensor (see :mod:`evomerge.merge.params`);
    per-model values in ``ModelEntry.parameters`` take precedence over global ones of the same name.
    ``options`` are constants that select behaviour (``trim_scope``, ``sign_rule``, ``normalize``, ...).
    """

    method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None = None
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)
    options: Mapping[str, OptionValue] = field(default_factory=dict)
    dtype: str | None = None
    seed: int = 0
    tokenizer_source: str | None = None

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
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any], where: str = "recipe") -> Recipe:
        """Parse the evomerge form (structure only; method-level checks live in the registry)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        known = {"method", "base_model", "models", "parameters", "options", "dtype", "seed", "tokenizer_source"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        method = data.get("method")
        if not isinstance(method, str) or not method:
            raise ConfigError(f"{where}.method: missing or not a string")
        raw_models = data.get("models")
        if not isinstance(raw_models, list) or not raw_models:
            raise ConfigError(f"{where}.models: expected a non-empty list of models")
        models = []
        for i, item in enumerate(raw_models):
            if isinstance(item, str):
                item = {"model": item}
            if not isinstance(item, Mapping) or not isinstance(item.get("model"), str):
                raise ConfigError(f"{where}.models[{i}]: expected {{model: PATH, parameters: {{...}}}}, got {item!r}")
            extra = set(item) - {"model", "parameters"}
            if extra:
                raise ConfigError(f"{where}.models[{i}]: unknown keys {sorted(extra)}")
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
        )

    def content_hash(self) -> str:
        """sha256 of the canonical JSON form: identical recipes hash identically (the archive's dedup key)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=repr)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def model_keys(self) -> list[str]:
        keys = [m.model for m in self.models]
        if self.base_model is not None and self.base_model not in keys:
            keys.insert(0, self.base_model)
        return keys


def _parse_params(raw: Any, where: str) -> dict[str, ParamValue]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of parameter names to values")
    return {str(k): ParamValue.parse(v, f"{where}.{k}") for k, v in raw.items()}
