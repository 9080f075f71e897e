"""Merge plans prepared the way the engines prepare them (for tests of data-aware methods), and naive references
of kernels to check them against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.methods.registry import plan_recipe
from evomerge.merge.plan import MergePlan
from evomerge.merge.recipe import Recipe
from evomerge.method_data import MethodDataProvider
from evomerge.models.folder import ModelFolder
from evomerge.models.layers import LayerMap


def layer_map_of(path: str) -> LayerMap:
    with ModelFolder.open(path) as folder:
        return LayerMap.from_config(folder.config)


def prepared_plan(recipe: Recipe, paths: Mapping[str, str], cache: dict[str, Any] | None = None,
                  provider: MethodDataProvider | None = None, model_tasks: Mapping[str, Any] | None = None
                  ) -> MergePlan:
    """``recipe`` planned over its base's layer map and prepared with the data a provider gives it (by default
    a provider with no fitness: the recipe's own ``options.calibration`` / ``options.fitness``)."""
    base = paths[recipe.base_model] if recipe.base_model else paths[recipe.models[0].model]
    provider = provider or MethodDataProvider(None, base)
    data = provider.for_recipe(recipe, model_tasks)
    plan = plan_recipe(recipe, layer_map_of(base))
    return plan.prepare(paths, "cpu", cache=cache if cache is not None else {}, calibration=data.calibration,
                        base_scores=data.base_scores)


def dare_linear_reference(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                          model_params: Sequence[Mapping[str, float]], seed: int) -> torch.Tensor:
    """DARE (linear) by its definition: model after model, a whole-tensor ``torch.rand`` mask from one generator
    seeded ``seed`` keeps each delta with probability ``density``, rescaled by ``1 / density``; lambda 1."""
    g = torch.Generator().manual_seed(seed)
    ref = base.clone()
    for t, p in zip(tensors, model_params):
        keep = torch.rand(base.shape, generator=g) < p["density"]
        ref += p["weight"] * (t - base) * keep / p["density"]
    return ref
