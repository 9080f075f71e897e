"""Base-versus-one-model merges that choose, entry by entry, how much of the fine-tune to take: NearSwap and
Arcee Fusion (mergekit 0.1.5, which is their reference: neither has a paper)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, work_dtype
from evomerge.merge.kernels.sparsify import select_rank


def _pair(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
          options: Mapping[str, Any], method: str) -> tuple[Tensor, Tensor, torch.dtype]:
    """(base, fine-tune) as full tensors in the compute dtype."""
    if base is None:
        raise ValueError(f"{method} needs a base tensor")
    if len(tensors) != 1:
        raise ValueError(f"{method} merges the base with exactly 1 model, got {len(tensors)}")
    check_inputs(base, tensors, model_params)
    wd = work_dtype(base, options)
    a = base.to(wd)
    b = a + tensors[0].to(wd) if options.get("inputs_are_deltas", False) else tensors[0].to(wd)
    return a, b, wd


def nearswap(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
             params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """NearSwap: take the fine-tune where it is near the base. ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` per
    entry and ``w b + (1 - w) a`` (a = base, b = the model): entries closer than ``t`` become the model's,
    farther ones move ``t`` towards it."""
    a, b, _ = _pair(base, tensors, model_params, options, "nearswap")
    t = float(params.get("t", 1e-4))
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


def quartiles(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """First quartile, median and third quartile at mergekit's sorted indices ``floor(k (n - 1) / 4)``
    (exact selection, no sort)."""
    flat = values.reshape(-1)
    n = flat.numel()
    q1, q2, q3 = (select_rank(flat, k * (n - 1) // 4)[0] for k in (1, 2, 3))
    return q1, q2, q3


def arcee_fusion(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
                 params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """Arcee Fusion: take the model's change only where it matters most.

    Importance ``|b - a| * KL(softmax(b) || softmax(a))`` (softmax and KL per row of the last dimension, 1e-8
    added to both distributions); the change is kept where the importance reaches ``median + 1.5 IQR`` of the
    tensor's importances (quartiles at sorted indices ``floor(q (n - 1))``). Difference from mergekit: for
    tensors above 1M entries mergekit estimates the quartiles from 1M entries drawn with replacement from the
    unseeded global RNG (so its result changes between runs); evomerge takes the exact order statistics,
    which equal mergekit's below that size.
    """
    a, b, _ = _pair(base, tensors, model_params, options, "arcee_fusion")
    eps = 1e-8
    p = torch.softmax(b, dim=-1) + eps
    q = torch.softmax(a, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = (b - a).abs() * kl
    q1, median, q3 = quartiles(importance)
    threshold = median + 1.5 * (q3 - q1)
    return a + (b - a) * (importance >= threshold)
