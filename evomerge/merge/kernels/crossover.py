"""Split-point crossover of two models (M2N2's crossover with an evolving boundary, at layer granularity).

Tensors before the boundary mix ``w * A + (1 - w) * B``, tensors after it ``(1 - w) * A + w * B``: the child
takes mostly A's early layers and B's late ones (or the reverse), and the search moves both the boundary and
``w``. A tensor's place is its ``depth`` in the model (:func:`tensor_depth`: 0 for the embedding, the middle of
its layer for decoder layers, 1 for the final norm and head), given by the merge plan in ``options['depth']``.
Linear mixing (so the method is linear: the resident merger's fused path and kinship's exact forms apply).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, full_inputs, work_dtype
from evomerge.merge.kernels.linear import LinearCoefficients


def tensor_depth(layer: int | None, num_layers: int, kind: str | None) -> float:
    """Where a tensor sits in the model, in [0, 1]: the embedding at 0, decoder layer ``l`` of ``L`` at
    ``(l + 0.5) / L``, everything after the stack (final norm, head, other) at 1."""
    if layer is not None and num_layers > 0:
        return (layer + 0.5) / num_layers
    return 0.0 if kind == "embedding" else 1.0


def crossover_weight(depth: float, boundary: float, w: float) -> float:
    """The weight of model A at ``depth``: ``w`` at or before the boundary, ``1 - w`` after it."""
    return w if depth <= boundary else 1.0 - w


def _weight_of_a(params: Mapping[str, float], options: Mapping[str, Any]) -> float:
    depth = options.get("depth")
    if depth is None:
        raise ValueError("crossover: the tensor's depth is missing (options['depth'] is set by the merge plan)")
    return crossover_weight(float(depth), float(params.get("boundary", 0.5)), float(params.get("w", 0.5)))


def crossover(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
              params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None
              ) -> Tensor:
    """``a * A + (1 - a) * B`` with ``a = crossover_weight(depth, boundary, w)``."""
    if len(tensors) != 2:
        raise ValueError(f"crossover needs exactly 2 tensors, got {len(tensors)}")
    check_inputs(base, tensors, model_params)
    a = _weight_of_a(params, options)
    wd = work_dtype(tensors[0], options)
    ta, tb = full_inputs(base, tensors, options, wd)
    out = torch.mul(ta, a)
    out.add_(tb, alpha=1.0 - a)
    return out


def crossover_coefficients(model_params: list[dict[str, float]], params: dict[str, float],
                           options: Mapping[str, Any]) -> LinearCoefficients:
    """``a A + (1 - a) B = base + a tau_A + (1 - a) tau_B``."""
    a = _weight_of_a(params, options)
    return LinearCoefficients(1.0, (a, 1.0 - a))
