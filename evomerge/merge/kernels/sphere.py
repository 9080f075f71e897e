"""Interpolation on the sphere beyond two-model SLERP: NuSLERP, Multi-SLERP and the Karcher mean (mergekit 0.1.5).

All three work on the tensors' directions and put a norm back afterwards; with a base (nuslerp, multislerp)
they act on task vectors and add the base at the end. Semantics are mergekit's (which has no paper for
nuslerp and multislerp); each docstring names where evomerge differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, full_inputs, work_dtype


def _semantic_base(base: Tensor | None, options: Mapping[str, Any]) -> bool:
    """Whether ``base`` is the recipe's base (merge task vectors) or only there to rebuild full inputs."""
    return bool(options.get("base_given", base is not None)) and base is not None


def _inputs(base: Tensor | None, tensors: list[Tensor], options: Mapping[str, Any], wd: torch.dtype,
            deltas: bool) -> list[Tensor]:
    """The inputs as task vectors (``deltas``) or as full tensors, in ``wd``."""
    if not deltas:
        return full_inputs(base, tensors, options, wd)
    assert base is not None
    if options.get("inputs_are_deltas", False):
        return [t.to(wd) for t in tensors]
    b = base.to(wd)
    return [t.to(wd) - b for t in tensors]


def nuslerp_pair(t: float, v0: Tensor, v1: Tensor, row_wise: bool = False, flatten: bool = True,
                 eps: float = 1e-8) -> Tensor:
    """SLERP of ``v0`` (t = 0) and ``v1`` (t = 1) over the whole tensor (``flatten``), else per row of the last
    dimension, or per column (``row_wise``: along dimension 0, mergekit's naming). Directions are normalized
    with norms clamped at 1e-7; (anti)parallel vectors (``1 - cos^2 <= eps^2``) interpolate linearly."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
            params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """NuSLERP of two models at ``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to ~0, as mergekit).

    With a base: ``base + slerp(tau_0, tau_1)``. Options ``nuslerp_flatten`` (default true: one angle for the
    whole tensor) and ``nuslerp_row_wise`` (without flatten: one angle per column instead of per row).
    """
    if len(tensors) != 2:
        raise ValueError(f"nuslerp needs exactly 2 tensors, got {len(tensors)}")
    check_inputs(base, tensors, model_params)
    wd = work_dtype(tensors[0], options)
    w0, w1 = (float(mp.get("weight", 1.0)) for mp in model_params)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    with_base = _semantic_base(base, options)
    v0, v1 = _inputs(base, tensors, options, wd, with_base)
    out = nuslerp_pair(t, v0, v1, bool(options.get("nuslerp_row_wise", False)),
                       bool(options.get("nuslerp_flatten", True)))
    if with_base:
        assert base is not None
        out = base.to(wd) + out
    return out


def multislerp(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
               params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """Multi-SLERP (mergekit): barycentric interpolation of several tensors on the hypersphere.

    The directions ``u_t`` are averaged with the weights into ``m`` (normalized), projected onto the tangent
    space at ``m`` (``u_t - <u_t, m> m``), averaged there and mapped back with the exponential map; the
    result gets the weighted mean norm. With a base it acts on task vectors. One model is returned as is;
    two opposite directions that cancel fall back to linear interpolation. Options: ``normalize_weights``
    (default true), ``eps`` (1e-8). evomerge raises a ValueError naming the weights where they sum to 0
    under ``normalize_weights`` (mergekit divides by 0) and where more than two directions cancel; where no
    input has a direction (every task vector zero on this tensor, as on the weights LoRA adapters leave alone)
    the result is the base, where mergekit raises.
    """
    check_inputs(base, tensors, model_params)
    wd = work_dtype(tensors[0], options)
    with_base = _semantic_base(base, options)
    if len(tensors) == 1:
        return full_inputs(base, tensors, options, wd)[0].clone()
    eps = float(options.get("eps", 1e-8))
    xs = torch.stack(_inputs(base, tensors, options, wd, with_base))
    flat = xs.reshape(xs.shape[0], -1)
    raw = [float(mp.get("weight", 1.0)) for mp in model_params]
    weights = torch.tensor(raw, dtype=wd, device=xs.device)
    if bool(options.get("normalize_weights", True)):
        if abs(sum(raw)) < 1e-12:
            raise ValueError(f"multislerp: weights {raw} sum to 0 with normalize_weights: true")
        weights = weights / weights.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if xs.shape[0] != 2 and bool((norms > eps).any()):
            raise ValueError(f"multislerp: the weighted directions cancel (weights {raw}); use other weights")
        # two opposite directions, or no direction at all (no model changed this tensor: an adapter's untouched
        # weights): the weighted sum, which for zero task vectors is the base
        out = (xs * weights.view(-1, *([1] * (xs.dim() - 1)))).sum(0)
    else:
        mean = mean / mean_norm
        tangent = units - (units * mean).sum(-1, keepdim=True) * mean
        step = (tangent * weights.view(-1, 1)).sum(0)
        step_norm = torch.linalg.vector_norm(step) + eps
        out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
        out = (out * (norms.squeeze(-1) * weights).sum()).reshape(xs.shape[1:])
    if with_base:
        assert base is not None
        out = out + base.to(wd)
    return out


def karcher_mean(tensors: list[Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Weighted Karcher (Frechet) mean of the directions, scaled by ``sum_t alpha_t |x_t|`` (mergekit's iteration).

    Start at the normalized weighted mean of the unit vectors (the first direction if that mean is ~0), then
    up to ``max_iter`` Riemannian gradient steps ``m <- exp_m(sum_t a_t log_m(u_t))``, stopping when the step
    is below ``tol``; inputs with norm <= ``tol`` are left out of the direction (all of them: a zero tensor).
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = u[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        step = torch.linalg.vector_norm(tangent.to(dtype))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * n for alpha, n in zip(alphas, norms))
    return scale * mean


def karcher(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
            params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """Karcher mean of the models (the base, if given, is one of them, as in mergekit).

    ``alpha_t = w_t / sum_t w_t`` from the per-model ``weight`` (default equal: mergekit's karcher, which has
    no weights). Options ``max_iter`` (10) and ``tol`` (1e-5).
    """
    check_inputs(base, tensors, model_params)
    wd = work_dtype(tensors[0], options)
    xs = full_inputs(base, tensors, options, wd)
    weights = [float(mp.get("weight", 1.0)) for mp in model_params]
    total = sum(weights)
    if any(w < 0 for w in weights) or not total > 0 or not math.isfinite(total):
        raise ValueError(f"karcher: weights {weights} must be >= 0 with a positive sum")
    max_iter = int(options.get("max_iter", 10))
    if max_iter < 0:
        raise ValueError(f"karcher: max_iter = {max_iter} must be >= 0")
    return karcher_mean(xs, [w / total for w in weights], max_iter, float(options.get("tol", 1e-5)))
