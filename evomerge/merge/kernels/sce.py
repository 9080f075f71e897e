"""SCE (FuseChat 2.0, arXiv 2408.07990): select, calculate, erase, as mergekit 0.1.5 computes it.

1. Select: with ``select_topk < 1``, keep only the entries whose variance across the task vectors is among
   the top ``int(select_topk * (number of entries with non-zero variance))`` (ties by index), in every task
   vector.
2. Calculate: model t's weight is the mean of its selected task vector's squares, normalized over models.
3. Erase: per entry, only the task vectors whose sign equals the sign of their sum (>= 0 counts as +) stay.
4. ``theta = base + sum_t w_t tau_t / sum_t w_t`` over the remaining entries.

Where the weights' sum is below ``uniform_below`` the weights are uniform. mergekit's threshold is 1e-6 (the
default), which the mean squared deltas of real fine-tunes (typically 1e-4..1e-3 per entry) often fall under,
making its SCE an unweighted mean there; ``uniform_below: 0`` weights by the squares as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, stacked_deltas, work_dtype
from evomerge.merge.kernels.sparsify import topk_mask
from evomerge.merge.kernels.task_arithmetic import elected_sign


def variance_mask(deltas: Tensor, select_topk: float) -> Tensor | None:
    """Entries kept by SCE's select step (None: all of them)."""
    if select_topk >= 1:
        return None
    if select_topk <= 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * select_topk)  # in torch's arithmetic, as mergekit (float32 product)
    return topk_mask(var, k)


def sce(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Kernel of method ``sce`` (see the module docstring)."""
    if base is None:
        raise ValueError("sce needs a base tensor")
    check_inputs(base, tensors, model_params)
    wd = work_dtype(base, options)
    deltas = stacked_deltas(base, tensors, options, wd)
    mask = variance_mask(deltas, float(params.get("select_topk", 1.0)))
    if mask is not None:
        deltas.mul_(mask)
    t_count = deltas.shape[0]
    weights = deltas.square().reshape(t_count, -1).mean(dim=1)
    total = float(weights.sum())
    if abs(total) < float(options.get("uniform_below", 1e-6)) or total == 0:
        weights = torch.full((t_count,), 1.0 / t_count, dtype=wd, device=base.device)
    else:
        weights = weights / total
    agree = deltas.sign() == elected_sign(list(deltas.unbind(0)), "mass", "positive")
    w = weights.view(-1, *([1] * (deltas.dim() - 1))) * agree
    merged = (deltas * w).sum(dim=0)
    return base.to(wd) + merged / w.sum(dim=0).clamp(min=1e-6)
