"""Linear merges: the model soup, and the coefficients every linear method reduces to.

A linear method's merged tensor is ``beta * base + sum_t c_t tau_t`` with per-tensor numbers ``beta`` and ``c``.
The resident merger's fused path and kinship's exact forms of merged models use :class:`LinearCoefficients`
from the method's ``coefficients`` function, so the algebra lives next to the kernel it describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, work_dtype


@dataclass(frozen=True)
class LinearCoefficients:
    """``merged = beta * base + sum_t coefficients[t] * tau_t`` for one tensor (kernel input order)."""

    beta: float
    coefficients: tuple[float, ...]


def linear(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
           params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """Model soup: ``sum_t w_t theta_t``, divided by ``sum_t w_t`` when ``normalize`` (default true, as mergekit)."""
    check_inputs(base, tensors, model_params)
    wd = work_dtype(tensors[0], options)
    weights = [float(mp.get("weight", 1.0)) for mp in model_params]
    normalize = bool(options.get("normalize", True))
    denom = float(torch.tensor(weights, dtype=wd).sum()) if normalize else 1.0
    if normalize and abs(denom) < 1e-12:
        raise ValueError(f"linear: weights {weights} sum to 0 with normalize: true")
    if options.get("inputs_are_deltas", False):
        if base is None:
            raise ValueError("inputs_are_deltas needs the base tensor")
        # sum w (b + d) / D = b * (sum w / D) + sum w d / D
        out = base.to(wd, copy=True)
        wsum = sum(weights)
        if wsum / denom != 1.0:
            out.mul_(wsum / denom)
        for t, w in zip(tensors, weights):
            out.add_(t, alpha=w / denom)  # mixed dtypes are cast inside the kernel: no widened copy
        return out
    out = torch.zeros(tensors[0].shape, dtype=wd, device=tensors[0].device)
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w)
    if normalize:
        out.div_(denom)
    return out


def linear_coefficients(model_params: list[dict[str, float]], params: dict[str, float],
                        options: Mapping[str, Any]) -> LinearCoefficients:
    """``sum_t w_t theta_t / D = (sum_t w_t / D) base + sum_t (w_t / D) tau_t`` (D = sum w_t when normalize)."""
    weights = [float(mp.get("weight", 1.0)) for mp in model_params]
    normalize = bool(options.get("normalize", True))
    denom = sum(weights) if normalize else 1.0
    if normalize and abs(denom) < 1e-12:
        raise ValueError(f"linear: weights {weights} sum to 0 with normalize: true")
    return LinearCoefficients(sum(weights) / denom, tuple(w / denom for w in weights))
