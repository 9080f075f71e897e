"""DELLA (arXiv 2406.11617): MAGPRUNE each task vector, then task arithmetic or the TIES election.

MAGPRUNE (:mod:`evomerge.merge.kernels.magprune`) drops each delta entry with a probability that falls with its
magnitude rank within its row, and rescales the survivors. The pruned task vectors then go through
generalized task arithmetic (:mod:`evomerge.merge.kernels.task_arithmetic`) as given task vectors. Draws are
made model after model over whole tensors from the tensor's seeded generator, as mergekit draws them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, work_dtype
from evomerge.merge.kernels.magprune import magprune_
from evomerge.merge.kernels.task_arithmetic import generalized_task_arithmetic


def _pruned(base: Tensor, tensors: list[Tensor], model_params: list[dict[str, float]],
            options: Mapping[str, Any], generator: torch.Generator | None) -> list[Tensor]:
    """Each model's task vector after MAGPRUNE (density and epsilon per model), in the compute dtype."""
    check_inputs(base, tensors, model_params)
    wd = work_dtype(base, options)
    given = bool(options.get("inputs_are_deltas", False))
    rescale = str(options.get("rescale", "inverse_probability"))
    b = base.to(wd)
    out = []
    for t, mp in zip(tensors, model_params):
        delta = t.to(wd, copy=True) if given else t.to(wd) - b
        out.append(magprune_(delta, float(mp.get("density", 1.0)), float(mp.get("epsilon", 0.15)), generator,
                             rescale))
    return out


def _della(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
           params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None,
           consensus: bool, default_normalize: bool) -> Tensor:
    if base is None:
        raise ValueError("DELLA needs a base tensor")
    deltas = _pruned(base, tensors, model_params, options, generator)
    given = {**options, "inputs_are_deltas": True, "rescale": "none"}
    return generalized_task_arithmetic(base.to(deltas[0].dtype), deltas, model_params, params, given, None,
                                       sparsify=None, consensus=consensus, default_normalize=default_normalize)


def della(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
          params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """DELLA: MAGPRUNE each task vector, then the TIES sign election and disjoint mean (mergekit's della:
    normalize default true)."""
    return _della(base, tensors, model_params, params, options, generator, consensus=True, default_normalize=True)


def della_linear(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
                 params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """MAGPRUNE then task arithmetic (mergekit's della_linear: normalize default false)."""
    return _della(base, tensors, model_params, params, options, generator, consensus=False,
                  default_normalize=False)
