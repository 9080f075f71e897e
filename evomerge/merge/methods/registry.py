"""The registry: every merge method evomerge knows, as one explicit list of configured entries.

Adding a method means adding its entry to ``METHODS`` (and its kernel to :mod:`evomerge.merge.kernels`);
names are unique (a duplicate raises when this module is imported). Callers look methods up here and ask the
entry what it needs; nothing else registers methods.
"""

from __future__ import annotations

from evomerge.merge.methods import apl, builtin, extended, mergeability, qp
from evomerge.merge.methods.resolve import check_recipe
from evomerge.merge.methods.spec import MergeMethod, Registry
from evomerge.merge.plan import MergePlan
from evomerge.merge.recipe import Recipe
from evomerge.models.layers import LayerMap

METHODS: tuple[MergeMethod, ...] = (*builtin.METHODS, *extended.METHODS, qp.METHOD, apl.METHOD, mergeability.METHOD)

REGISTRY = Registry(METHODS)


def get_method(name: str) -> MergeMethod:
    """The registered method, or ConfigError listing the known names."""
    return REGISTRY.get(name)


def validate_recipe(recipe: Recipe, where: str = "recipe") -> MergeMethod:
    """Check a recipe against its method before any work (ConfigError naming the field at fault); the method."""
    return check_recipe(recipe, get_method(recipe.method), where)


def plan_recipe(recipe: Recipe, layer_map: LayerMap, where: str = "recipe") -> MergePlan:
    """The recipe's method looked up, the recipe checked against it and its inputs planned."""
    return MergePlan.of(recipe, get_method(recipe.method), layer_map, where)
