"""Spherical interpolation of two models."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, full_inputs, work_dtype

SLERP_DOT_THRESHOLD = 0.9995


def slerp(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
          params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """Spherical interpolation from ``tensors[0]`` (t = 0) to ``tensors[1]`` (t = 1) over the whole tensor.

    As mergekit: ``d = <v0/|v0|, v1/|v1|>`` (a norm below 1e-8 counts as 1), linear interpolation when
    ``|d| > 0.9995``, else ``sin((1-t)W)/sin W * v0 + sin(tW)/sin W * v1`` with ``W = arccos d`` on the
    unnormalized tensors. Reductions run in float64.
    """
    if len(tensors) != 2:
        raise ValueError(f"slerp needs exactly 2 tensors, got {len(tensors)}")
    check_inputs(base, tensors, model_params)
    wd = work_dtype(tensors[0], options)
    a, b = full_inputs(base, tensors, options, wd)
    t = float(params.get("t", 0.5))
    if a.numel() == 0:
        return a * (1 - t) + b * t
    fa = a.reshape(-1)
    fb = b.reshape(-1)
    na = float(torch.linalg.vector_norm(fa, dtype=torch.float64))
    nb = float(torch.linalg.vector_norm(fb, dtype=torch.float64))
    na = na if na > 1e-8 else 1.0
    nb = nb if nb > 1e-8 else 1.0
    dot = float(torch.dot(fa.double(), fb.double())) / (na * nb)
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        ca, cb = 1.0 - t, t
    else:
        omega = math.acos(dot)
        so = math.sin(omega)
        ca, cb = math.sin((1 - t) * omega) / so, math.sin(t * omega) / so
    out = torch.mul(a, ca)
    out.add_(b, alpha=cb)
    return out
