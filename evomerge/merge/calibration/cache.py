"""Model states kept across recipes by data-aware methods (bounded LRU sections of a caller's cache dict)."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from evomerge.models.adapter import resolve_ref
from evomerge.models.hf import load_causal_lm
from evomerge.paths import resolve_path

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


def model_state(model: torch.nn.Module) -> StateDict:
    """Detached copy of the parameters (tied duplicates appear under each name)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


MAX_CACHED = 8  # model states / Gram sets a prepare cache keeps (a population run meets many merged parents)


def lru_get(cache: dict[str, Any], section: str, key: Any, make: Callable[[], Any], limit: int = MAX_CACHED) -> Any:
    """``cache[section][key]``, made on a miss; the least recently used entries beyond ``limit`` are dropped."""
    entries = cache.setdefault(section, OrderedDict())
    if key in entries:
        entries.move_to_end(key)
        return entries[key]
    value = entries[key] = make()
    while len(entries) > limit:
        entries.popitem(last=False)
    return value


def cached_state(cache: dict[str, Any], path: str | os.PathLike[str]) -> StateDict:
    """Load a model's state once per ``cache`` (the prepare context's cross-recipe cache; bounded LRU); a
    ``BASE+ADAPTER`` reference loads the adapted base."""
    resolved = resolve_ref(path)
    return lru_get(cache, "states", resolved, lambda: model_state(load_causal_lm(resolved)))


def probe_model(cache: dict[str, Any], base_path: str | os.PathLike[str]) -> torch.nn.Module:
    """One loaded copy of the base architecture per cache, reused by every recipe (its weights get overwritten)."""
    probe = cache.get("probe_model")
    if probe is None:
        probe = cache["probe_model"] = load_causal_lm(resolve_path(base_path))
    return probe
