"""The one place nevergrad optimizers are named, checked and built, for the plain search and the pair searches.

- :func:`optimizer_class`: a name from nevergrad's registry, or a :class:`ConfigError` naming the field and the
  closest names (the search space checks its ``optimizer.name`` through it at load time);
- :func:`build_optimizer`: an optimizer over a given parametrization, its budget and ``num_workers`` (how many
  candidates are asked before results come back); ``bounded`` keeps its archive of told points small, for an
  optimizer that is pickled with every checkpoint;
- :func:`array_parametrization`: a seeded, bounded array starting at ``x0`` (the pair genome and the bench's
  CMA-ES baseline); the plain search's parametrization is :meth:`evomerge.search.genome.Genome.parametrization`.

Every random choice comes from the parametrization's own ``random_state`` (seeded), never from a global RNG.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from typing import Any

import nevergrad as ng
import numpy as np
from nevergrad.optimization.utils import Pruning

from evomerge.errors import ConfigError

try:  # nevergrad asks CMA one candidate at a time; cma warns about it, harmlessly
    from cma.evolution_strategy import InjectionWarning
except ImportError:  # cma is optional in nevergrad
    InjectionWarning = None

EXAMPLES = "CMA, TwoPointsDE, PSO, OnePlusOne, NGOpt"


def optimizer_class(name: str, where: str = "optimizer") -> Any:
    """The registered nevergrad optimizer ``name``; an unknown name is a ConfigError with the closest names."""
    registry = ng.optimizers.registry
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else f" (e.g. {EXAMPLES})"
    raise ConfigError(f"{where}: unknown nevergrad optimizer {name!r}{hint}")


def build_optimizer(name: str, parametrization: Any, *, budget: int, num_workers: int = 1,
                    where: str = "optimizer", bounded: bool = False) -> Any:
    """Optimizer ``name`` over ``parametrization`` (seeded by its ``random_state``).

    ``num_workers`` is clamped to at least 1. ``bounded``: keep the optimizer's own archive small (see
    :func:`bound_archives`), for optimizers that live in a checkpoint.
    """
    cls = optimizer_class(name, where)
    if InjectionWarning is not None:
        warnings.filterwarnings("ignore", category=InjectionWarning)
    optimizer = cls(parametrization=parametrization, budget=budget, num_workers=max(1, int(num_workers)))
    if bounded:
        bound_archives(optimizer)
    return optimizer


def array_parametrization(x0: Sequence[float] | np.ndarray, lower: float, upper: float, sigma: float,
                          seed: int) -> Any:
    """A bounded array starting at ``x0`` with mutation scale ``sigma``, its random state seeded by ``seed``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "bounds are k sigma away": intended for small per-pair budgets
        param = ng.p.Array(init=np.asarray(x0, float)).set_bounds(lower, upper)
        param.set_mutation(sigma=sigma)
    param.random_state = np.random.RandomState(seed)
    return param


def bound_archives(optimizer: Any) -> None:
    """Keep nevergrad's own archive of told points small (up to 1000 by default, pickled with every checkpoint;
    evomerge's archive is the record), so a checkpoint stays bounded however long the run."""
    keep = max(32, 4 * max(1, int(getattr(optimizer, "num_workers", 1))))
    _limit_archives(optimizer, Pruning(min_len=keep, max_len=2 * keep), set())


def _limit_archives(optimizer: Any, pruning: Any, seen: set[int]) -> None:
    """Set ``pruning`` on an optimizer and the ones it wraps (configured and portfolio optimizers)."""
    if optimizer is None or id(optimizer) in seen or not hasattr(optimizer, "pruning"):
        return
    seen.add(id(optimizer))
    if not isinstance(optimizer.pruning, type(pruning)) or optimizer.pruning.max_len != pruning.max_len:
        optimizer.pruning = pruning
    _limit_archives(getattr(optimizer, "_optim", None), pruning, seen)
    for inner in getattr(optimizer, "optims", None) or []:
        _limit_archives(inner, pruning, seen)
