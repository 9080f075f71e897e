"""Passthrough: one model's tensor, optionally scaled (with layer slices, the building block of layer stacking)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, full_inputs, work_dtype


def passthrough(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
                params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """``scale * theta`` of the one input (``scale`` per model, default 1: the tensor unchanged)."""
    if len(tensors) != 1:
        raise ValueError(f"passthrough takes exactly 1 tensor, got {len(tensors)}")
    check_inputs(None, tensors, model_params)
    (x,) = full_inputs(base, tensors, options, work_dtype(tensors[0], options))
    return x.mul(float(model_params[0].get("scale", 1.0)))
