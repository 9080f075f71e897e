"""Mergeability-weighted merging (seed c, "Will it Merge?", Rahamim et al.): weights from base-model knowledge.

- Mergeability of a fine-tune: its own-task score after merging it with ``M`` randomly chosen other models,
  averaged over ``N`` trials (paper: M = 50, N = 5; it depends on the merge method, a parameter here).
- Base-knowledge predictor: the base model's score on that fine-tune's task (the paper's dominant predictor).
- Method ``mergeability_weighted``: ``w_t = softmax_t((1 - s_t)/tau)`` with ``s_t`` the base score on task t,
  ``theta = theta_0 + sum_t w_t tau_t``; ``tau`` was not reported in the paper, so it is a parameter (a gene).
  Base scores come from the per-model parameter ``base_score`` or, when a model has none, from the
  ``prepare`` hook (the caller's cached ``ctx.base_scores``, else measured with the evaluator on the fitness
  spec named by option ``fitness``, task matched to the model key's last path component).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, work_dtype

# ------------------------------------------------------------------------------------------ method


def base_score_weights(scores: Sequence[float], tau: float) -> Tensor:
    """``softmax_t((1 - s_t)/tau)`` in float64 (the skill the base knows least gets the most weight)."""
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a positive finite number, got {tau}")
    s = torch.tensor([float(v) for v in scores], dtype=torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"non-finite base scores {list(scores)}")
    return torch.softmax((1.0 - s) / tau, dim=0)


def mergeability_weighted(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
                          params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """``base + sum_t softmax((1 - base_score_t)/tau)_t * tau_t``; base scores per model or from ``prepare``."""
    if base is None:
        raise ValueError("mergeability_weighted needs a base tensor")
    given = [m.get("base_score") for m in model_params]
    measured = options.get("base_scores")
    scores = []
    for i, g in enumerate(given):
        if g is not None:
            scores.append(float(g))
        elif measured is not None and i < len(measured):
            scores.append(float(measured[i]))
        else:
            raise ValueError(f"model {i} has no base_score (set it per model, or let prepare measure it)")
    w = base_score_weights(scores, float(params.get("tau", 0.1)))
    wd = work_dtype(base, options)
    b = base.to(torch.float64)
    out = b.clone()
    deltas = bool(options.get("inputs_are_deltas", False))
    for wi, t in zip(w.tolist(), tensors):
        out.add_(t.to(torch.float64) if deltas else t.to(torch.float64) - b, alpha=wi)
    return out.to(wd)
