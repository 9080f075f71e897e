"""Layer stacking (a recipe with ``slices``): which source tensor each output tensor is, and the output config.

The output's decoder layers are the slices' layer ranges in order: output layer ``j`` is layer
``start + offset`` of its slice's model, its tensors renamed to index ``j``. Tensors outside the layer stack
come, as in mergekit, from the first slice's model for the embeddings (kind ``embedding``) and from the last
slice's model for everything else (final norm, head). Per-layer parameter lists are interpolated over each
slice's own layers (``u = offset / (len - 1)``, 1 for a one-layer slice, 0 outside the stack) and filters match
the source tensor's name, as mergekit resolves them. The output config gets the new layer count, and a
per-layer ``layer_types`` list (when the config has one) is rebuilt from the source layers (mergekit keeps
the source's list, which then no longer matches the layer count).

The disk engine (:mod:`evomerge.merge.engines.disk`) asks this module for the output tensor list, their
shapes and values; nothing here reads a tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.files import read_json_object
from evomerge.merge.methods.resolve import resolve_tensor_params
from evomerge.merge.plan import MergePlan
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.models.layers import LAYER_COUNT_KEYS, LayerMap

# Per-layer config lists rebuilt from the source layers.
PER_LAYER_CONFIG_KEYS: tuple[str, ...] = ("layer_types",)


def check_slice_ranges(recipe: Recipe, layer_counts: Mapping[str, int], where: str = "recipe") -> None:
    """Every slice's ``[start, end)`` inside its model's layers (models missing from ``layer_counts`` skipped)."""
    for i, sl in enumerate(recipe.slices):
        n = layer_counts.get(sl.model)
        if n is not None and sl.end > n:
            raise ConfigError(
                f"{where}.slices[{i}].layer_range: [{sl.start}, {sl.end}] of model {sl.model} exceeds its {n} "
                f"layers (ranges are [START, END) with END <= {n})"
            )


def config_layer_counts(recipe: Recipe) -> dict[str, int]:
    """Layer count of each sliced model from its ``config.json`` (models without a readable one are left out)."""
    out: dict[str, int] = {}
    for model in dict.fromkeys(sl.model for sl in recipe.slices):
        cfg = Path(model) / "config.json"
        try:
            out[model] = LayerMap.from_config(json.loads(cfg.read_text(encoding="utf-8"))).num_layers
        except (OSError, ValueError, ModelError):
            continue  # the engine reports an unusable folder with its own message
    return out


@dataclass(frozen=True)
class StackedTensor:
    """One output tensor: ``source`` of model ``model``; ``offset`` its layer within slice ``slice_index``."""

    name: str
    model: str
    source: str
    slice_index: int
    offset: int | None
    slice_layers: int


@dataclass
class LayerStack:
    """The output tensors of a layer stack, in file order, and the output config's changes."""

    tensors: tuple[StackedTensor, ...]
    num_layers: int
    sources: tuple[tuple[str, int], ...]  # (model, source layer) of each output layer
    layer_map: LayerMap
    _recipes: tuple[Recipe, ...] = ()
    _by_name: dict[str, StackedTensor] = dataclasses.field(default_factory=dict)

    @staticmethod
    def of(recipe: Recipe, tensor_names: Sequence[str], layer_map: LayerMap,
           configs: Mapping[str, Mapping[str, Any]], where: str = "recipe") -> LayerStack:
        """Plan the stack of ``recipe`` over models sharing ``tensor_names`` (their compatibility checked)."""
        check_slice_ranges(recipe, {m: LayerMap.from_config(c).num_layers for m, c in configs.items()}, where)
        by_layer: dict[int, list[str]] = {}
        outside: list[str] = []
        for name in tensor_names:
            layer = layer_map.layer_of(name)
            (outside if layer is None else by_layer.setdefault(layer, [])).append(name)
        pattern = re.compile(layer_map.family.layer_regex)
        first, last = 0, len(recipe.slices) - 1
        pre = [n for n in outside if layer_map.kind_of(n) == "embedding"]
        post = [n for n in outside if layer_map.kind_of(n) != "embedding"]
        out: list[StackedTensor] = []
        for name in pre:
            out.append(StackedTensor(name, recipe.slices[first].model, name, first, None,
                                     recipe.slices[first].num_layers))
        sources: list[tuple[str, int]] = []
        for i, sl in enumerate(recipe.slices):
            for offset in range(sl.num_layers):
                src_layer = sl.start + offset
                for name in by_layer.get(src_layer, []):
                    out.append(StackedTensor(_renamed(pattern, name, len(sources)), sl.model, name, i, offset,
                                             sl.num_layers))
                sources.append((sl.model, src_layer))
        for name in post:
            out.append(StackedTensor(name, recipe.slices[last].model, name, last, None,
                                     recipe.slices[last].num_layers))
        recipes = tuple(dataclasses.replace(recipe, models=(ModelEntry(sl.model, dict(sl.parameters)),), slices=())
                        for sl in recipe.slices)
        stack = LayerStack(tuple(out), len(sources), tuple(sources), layer_map, recipes)
        stack._by_name = {t.name: t for t in out}
        return stack

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def source(self, name: str) -> StackedTensor:
        return self._by_name[name]

    def values(self, plan: MergePlan, entry: StackedTensor) -> tuple[list[dict[str, float]], dict[str, float]]:
        """Per-model and global values of one output tensor: its slice's parameters at its place in the slice."""
        return resolve_tensor_params(self._recipes[entry.slice_index], plan.method, entry.source, entry.offset,
                                     entry.slice_layers, self.layer_map.kind_of(entry.source))

    def merge(self, plan: MergePlan, read: Callable[[str, str, str], torch.Tensor], name: str,
              device: str) -> torch.Tensor:
        """The output tensor ``name``: the method's kernel on its source tensor (``read(model, tensor, device)``)."""
        entry = self._by_name[name]
        return plan.merge_tensor(name, None, [read(entry.model, entry.source, device)], device=device,
                                 values=self.values(plan, entry))

    def config_updates(self, folder: Path, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Top-level keys to set in the output ``config.json`` copied from ``folder`` (a nested text config is
        replaced whole); ``configs``: each sliced model's config, for per-layer lists."""
        cfg_file = folder / "config.json"
        config = read_json_object(cfg_file, "model config", ModelError)

        def update(cfg: Mapping[str, Any], part: Callable[[Mapping[str, Any]], Mapping[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key in LAYER_COUNT_KEYS:
                if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool):
                    out[key] = self.num_layers
                    break
            for key in PER_LAYER_CONFIG_KEYS:
                if isinstance(cfg.get(key), list):
                    out[key] = [_per_layer(part(configs[m]).get(key), layer) for m, layer in self.sources]
            return out

        top = update(config, lambda c: c)
        if any(k in top for k in LAYER_COUNT_KEYS):
            return top
        text = config.get("text_config")
        if isinstance(text, Mapping):
            return {**top, "text_config": {**text, **update(text, lambda c: c.get("text_config") or {})}}
        raise ModelError(f"model config has no layer count ({', '.join(LAYER_COUNT_KEYS)}) to set for the stack")

    def layout(self, folders: Mapping[str, Any], out_dtype: torch.dtype | None) -> list[tuple[str, Any, torch.dtype]]:
        """(name, shape, dtype) of every output tensor, for the shard writer's headers (``folders``: model key ->
        :class:`~evomerge.models.folder.ModelFolder`)."""
        return [(t.name, folders[t.model].shape(t.source),
                 out_dtype if out_dtype is not None else folders[t.model].dtype(t.source)) for t in self.tensors]


def _renamed(pattern: re.Pattern[str], name: str, layer: int) -> str:
    m = pattern.search(name)
    assert m is not None
    return f"{name[:m.start(1)]}{layer}{name[m.end(1):]}"


def _per_layer(values: Any, layer: int) -> Any:
    if not isinstance(values, list) or layer >= len(values):
        raise ModelError(f"config per-layer list {values!r} has no entry for layer {layer}")
    return values[layer]
