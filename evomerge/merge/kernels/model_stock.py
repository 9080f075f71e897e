"""Model Stock: interpolate the base and the models' mean by the mean cosine of their task vectors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, stacked_deltas, work_dtype


def model_stock(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
                params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """Model Stock (mergekit's formula): ``t = N cos / (1 + (N-1) cos)``, ``theta = t * mean_t theta_t + (1-t) * base``.

    ``cos`` is the mean pairwise cosine of the task vectors (norm products clamped at 1e-6), over the whole
    tensor or, with ``filter_wise``, per row (1-D tensors count as one row). Where ``1 + (N-1) cos`` is
    below 1e-6 in magnitude the base is kept.
    """
    if base is None:
        raise ValueError("model_stock needs a base tensor")
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {len(tensors)}")
    check_inputs(base, tensors, model_params)
    wd = work_dtype(base, options)
    filter_wise = bool(options.get("filter_wise", False))
    shape = base.shape
    w0 = base.to(wd)
    deltas = stacked_deltas(base, tensors, options, wd)
    if filter_wise:
        if w0.dim() <= 1:
            w0 = w0.reshape(1, -1)
            deltas = deltas.reshape(deltas.shape[0], 1, -1)
    else:
        w0 = w0.reshape(-1)
        deltas = deltas.reshape(deltas.shape[0], -1)
    n = deltas.shape[0]
    norms = torch.linalg.vector_norm(deltas, dim=-1)
    cos_sum = None
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            c = ((deltas[i] * deltas[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            cos_sum = c if cos_sum is None else cos_sum + c
            pairs += 1
    assert cos_sum is not None
    cos = (cos_sum / pairs).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))
    mean_delta = deltas.mean(dim=0)
    return (w0 + t * mean_delta).reshape(shape)
