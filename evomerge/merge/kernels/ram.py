"""RAM (Reinforced Agent Merging, arXiv 2601.13572) in mergekit 0.1.5's tensor-local form: ram and ramplus_tl.

Per entry, the models whose task vector is "active" there (``|tau_t| > epsilon``) are counted. An entry only
one model changes keeps that model's change whole; an entry several models change gets their mean; inactive
changes are dropped. ``ramplus_tl`` also scales each model's unique entries by
``1 + r * clamp(rho_t, 0, alpha)``, ``rho_t`` being the ratio of its shared to its unique active entries in
this tensor (counted per tensor, not over the model: mergekit's "tensor-local" variant, which this follows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, stacked_deltas, work_dtype


def _ram(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
         params: dict[str, float], options: Mapping[str, Any], plus: bool) -> Tensor:
    if base is None:
        raise ValueError("ram needs a base tensor")
    check_inputs(base, tensors, model_params)
    wd = work_dtype(base, options)
    eps = float(params.get("epsilon", 1e-5))
    tv = stacked_deltas(base, tensors, options, wd).reshape(len(tensors), -1)
    active = tv.abs() > eps
    counts = active.sum(dim=0, keepdim=True)
    shared = counts > 1
    unique = counts == 1
    tv.mul_(active)
    own = tv * unique
    if plus:
        n_shared = (active & shared).sum(dim=1).to(wd)
        n_unique = (active & unique).sum(dim=1).to(wd)
        rho = n_shared / n_unique.clamp(min=eps)
        scale = 1 + float(params.get("r", 0.1)) * rho.clamp(min=0, max=float(params.get("alpha", 0.2)))
        own.mul_(scale.unsqueeze(-1))
    merged = (own + tv * shared / counts.clamp(min=1)).sum(dim=0)
    return base.to(wd) + merged.reshape(base.shape)


def ram(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
        params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """RAM: unique active changes whole, shared active changes averaged (see the module docstring)."""
    return _ram(base, tensors, model_params, params, options, plus=False)


def ramplus_tl(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
               params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """RAM+ (tensor-local): RAM with each model's unique changes scaled up by its share of overlap."""
    return _ram(base, tensors, model_params, params, options, plus=True)
