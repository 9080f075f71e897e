"""mergekit's generalized task arithmetic: task_arithmetic, TIES, DARE, Breadcrumbs and DELLA (linear and TIES forms).

Per model the task vector is sparsified (none, top-magnitude, random, magnitude with outliers), weighted, then
either summed (task arithmetic family) or combined by the TIES sign election and disjoint mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, work_dtype
from evomerge.merge.kernels.linear import LinearCoefficients
from evomerge.merge.kernels.magprune import magprune_
from evomerge.merge.kernels.sparsify import (
    dare_,
    keep_count,
    magnitude_,
    magnitude_outliers_,
    threshold_,
    topk_threshold_,
)


def elected_sign(
    deltas: Sequence[Tensor], sign_rule: str = "mass", zero_sign: str = "positive", majority_sign: float | None = None
) -> Tensor:
    """TIES sign election: a tensor of +1/-1 (0 only where no sign can be elected).

    ``sign_rule``: ``mass`` elects the sign of ``sum_t tau_t`` (TIES paper, mergekit ``sum``),
    ``majority_count`` the sign of ``sum_t sgn(tau_t)`` (mergekit ``count``). Where that sum is exactly 0:
    ``zero_sign: positive`` elects + (mergekit), ``global_majority`` elects the sign of the sum of all
    elected signs (official TIES code; over this tensor unless the caller passes ``majority_sign``
    computed over the model).
    """
    if sign_rule == "mass":
        total = deltas[0].clone()
        for d in deltas[1:]:
            total.add_(d)
    elif sign_rule == "majority_count":
        total = deltas[0].sign()
        for d in deltas[1:]:
            total.add_(d.sign())
    else:
        raise ValueError(f"unknown sign_rule {sign_rule!r} (choices: mass, majority_count)")
    if zero_sign == "positive":
        return total.ge_(0).mul_(2).sub_(1)
    if zero_sign == "global_majority":
        elected = total.sign_()
        source = elected.sum() if majority_sign is None else torch.tensor(float(majority_sign))
        return elected.masked_fill_(elected == 0, float(torch.sign(source)))
    raise ValueError(f"unknown zero_sign {zero_sign!r} (choices: positive, global_majority)")


def elect(
    deltas: Tensor, sign_rule: str = "mass", zero_sign: str = "positive", majority_sign: float | None = None
) -> Tensor:
    """Boolean mask (T, ...) of the entries whose sign equals the elected sign (zeros never agree)."""
    e = elected_sign(list(deltas.unbind(0)), sign_rule, zero_sign, majority_sign)
    return (deltas * e) > 0


def _sparsify_one(
    row: Tensor,
    i: int,
    kind: str | None,
    mp: Mapping[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None,
    default_rescale: str,
    defer: bool = False,
) -> float | None:
    """Sparsify ``row`` in place; with ``defer`` a magnitude trim only returns its threshold.

    A deferred threshold ``thr`` means ``row`` must still be multiplied by ``|row| >= thr`` (the caller does
    it chunk by chunk, in cache); None means nothing is left to do.
    """
    if kind is None:
        return None
    rescale = str(options.get("rescale", default_rescale))
    density = float(mp.get("density", 1.0))
    if kind == "magnitude":
        scope = str(options.get("trim_scope", "tensor"))
        if scope == "global":
            thresholds = options.get("global_threshold")
            if thresholds is None or i >= len(thresholds):
                raise ValueError(
                    "trim_scope: global needs options['global_threshold'] (one per model, from global_trim_thresholds)"
                )
            thr = float(thresholds[i])
            if defer and rescale != "l1_norm":
                return thr if thr > 0 else None
            threshold_(row, thr, rescale, density)
        elif scope == "tensor":
            if defer and rescale != "l1_norm" and density < 1:
                mag = row.abs()
                thr = topk_threshold_(row, mag, keep_count(density, row.numel()))
                del mag
                if thr is not None and math.isinf(thr):
                    return None  # row already zeroed
                return thr
            magnitude_(row, density, rescale)
        else:
            raise ValueError(f"unknown trim_scope {scope!r} (choices: tensor, global)")
    elif kind == "random":
        dare_(row, density, generator, rescale)
    elif kind == "magnitude_outliers":
        magnitude_outliers_(row, density, float(mp.get("gamma", 0.01)), rescale)
    elif kind == "magprune":
        magprune_(row, density, float(mp.get("epsilon", 0.15)), generator, rescale)
    else:
        raise ValueError(f"unknown sparsification {kind!r}")
    return None


# Elements per chunk of the elementwise TIES phase: a few buffers of this size stay in cache.
_CHUNK = 1 << 19


def generalized_task_arithmetic(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None,
    *,
    sparsify: str | None,
    consensus: bool,
    default_normalize: bool,
    default_rescale: str = "none",
) -> Tensor:
    """mergekit's generalized task arithmetic, the core of task_arithmetic, ties, dare_*, breadcrumbs.

    Per model: ``tau_t = theta_t - base`` sparsified (with its own density/gamma, then rescaled);
    ``variant: mergekit`` (default) multiplies by ``w_t`` before the sign election and, with ``normalize``,
    divides by the summed weights of the agreeing models (of all models without consensus; a divisor of
    0 counts as 1); ``variant: paper`` elects on the unweighted trimmed vectors and always divides by the
    count of agreeing entries (the TIES paper's disjoint mean; ``w_t`` then scales each agreeing term).
    Finally ``base + lambda * merged``.

    Speed: the sign election is computed without boolean masks, as ``e * sum_t max(e * tau_t, 0)`` with
    ``e = +-1`` the elected sign, chunk by chunk so that its dozen elementwise passes run in cache; only
    the top-k selection and the subtraction touch whole tensors. Memory: without consensus two
    tensor-sized buffers; with it the T task vectors plus the output.
    """
    if base is None:
        raise ValueError("this method needs a base tensor")
    check_inputs(base, tensors, model_params)
    wd = work_dtype(base, options)
    weights = [float(mp.get("weight", 1.0)) for mp in model_params]
    normalize = bool(options.get("normalize", default_normalize))
    variant = str(options.get("variant", "mergekit"))
    if variant not in ("mergekit", "paper"):
        raise ValueError(f"unknown variant {variant!r} (choices: mergekit, paper)")
    lam = float(params.get("lambda", 1.0))
    given = bool(options.get("inputs_are_deltas", False))
    b = base.to(wd)

    def delta_into(out: Tensor, i: int, defer: bool = False) -> float | None:
        if given:
            out.copy_(tensors[i])
        else:
            torch.sub(tensors[i], b, out=out)
        return _sparsify_one(out, i, sparsify, model_params[i], options, generator, default_rescale, defer)

    if not consensus:
        mixed = torch.empty(base.shape, dtype=wd, device=base.device)
        delta_into(mixed, 0)
        if weights[0] != 1.0:
            mixed.mul_(weights[0])
        if len(tensors) > 1:
            tmp = torch.empty_like(mixed)
            for i in range(1, len(tensors)):
                delta_into(tmp, i)
                mixed.add_(tmp, alpha=weights[i])
            del tmp
        if normalize:
            divisor = float(torch.tensor(weights, dtype=wd).sum())
            if abs(divisor) < 1e-8:
                divisor = 1.0
            mixed.div_(divisor)
        if lam != 1:
            mixed.mul_(lam)
        return mixed.add_(b)

    t_count = len(tensors)
    stacked = torch.empty((t_count, base.numel()), dtype=wd, device=base.device)
    thresholds = [delta_into(stacked[i].view(base.shape), i, defer=True) for i in range(t_count)]
    sign_rule = str(options.get("sign_rule", "mass"))
    zero_sign = str(options.get("zero_sign", "positive"))
    majority = options.get("majority_sign")
    prepared = False
    if zero_sign == "global_majority" and majority is None:
        # The majority over this tensor needs every elected sign first: one extra whole-tensor pass.
        _trim_weight(stacked, thresholds, weights, variant, None)
        prepared = True
        majority = float(elected_sign(list(stacked.unbind(0)), sign_rule, "global_majority", 0.0).sum())
    need_div = variant == "paper" or normalize
    out = torch.empty(base.numel(), dtype=wd, device=base.device)
    flat_b = b.reshape(-1)
    n = base.numel()
    size = min(_CHUNK, n) if n else 0
    tmp = torch.empty(size, dtype=wd, device=base.device)
    mix = torch.empty(size, dtype=wd, device=base.device)
    div = torch.empty(size, dtype=wd, device=base.device) if need_div else None
    for start in range(0, n, max(size, 1)):
        stop = min(n, start + size)
        m = stop - start
        rows = stacked[:, start:stop]
        if not prepared:
            _trim_weight(rows, thresholds, weights, variant, tmp[:m])
        e = elected_sign(list(rows.unbind(0)), sign_rule, zero_sign, majority)
        mx = mix[:m].zero_()
        dv = div[:m].zero_() if div is not None else None
        t = tmp[:m]
        for i in range(t_count):
            torch.mul(rows[i], e, out=t).clamp_min_(0)
            w = weights[i]
            if variant == "paper" and w != 1.0:
                mx.add_(t, alpha=w)
            else:
                mx.add_(t)
            if dv is not None:
                t.sign_()
                if variant == "mergekit" and w != 1.0:
                    dv.add_(t, alpha=w)
                else:
                    dv.add_(t)
        mx.mul_(e)
        if dv is not None:
            dv.masked_fill_(dv == 0, 1)
            mx.div_(dv)
        o = out[start:stop]
        if lam != 1:
            torch.add(flat_b[start:stop], mx, alpha=lam, out=o)
        else:
            torch.add(flat_b[start:stop], mx, out=o)
    del stacked
    return out.view(base.shape)


def _trim_weight(
    rows: Tensor, thresholds: Sequence[float | None], weights: Sequence[float], variant: str, scratch: Tensor | None
) -> None:
    """Apply deferred magnitude thresholds and (mergekit variant) weights to rows of task vectors, in place."""
    for i, thr in enumerate(thresholds):
        row = rows[i]
        if thr is not None:
            if scratch is None:
                keep = row.abs().ge_(thr)
            else:
                keep = torch.abs(row, out=scratch).ge_(thr)
            row.mul_(keep)
        if variant == "mergekit" and weights[i] != 1.0:
            row.mul_(weights[i])


def task_arithmetic(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """``base + lambda * sum_t w_t tau_t`` (divided by ``sum w_t`` when ``normalize``, default false)."""
    return generalized_task_arithmetic(
        base, tensors, model_params, params, options, generator, sparsify=None, consensus=False, default_normalize=False
    )


def ties(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """TIES: trim each tau_t to its top ``density`` magnitudes, elect signs, disjoint mean, scale by lambda.

    ``trim_scope: tensor`` trims per tensor (mergekit); ``global`` keeps ``|tau_t| >= options['global_threshold'][t]``
    computed over the whole model by :func:`evomerge.merge.kernels.sparsify.global_trim_thresholds`
    (official TIES code). Keep count ``max(1, int(density * n))``, exact top-k, ties by index.
    """
    return generalized_task_arithmetic(
        base, tensors, model_params, params, options, generator,
        sparsify="magnitude", consensus=True, default_normalize=True,
    )


def dare_linear(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE then task arithmetic: drop each delta entry with probability ``1 - density``, rescale, sum."""
    return generalized_task_arithmetic(
        base, tensors, model_params, params, options, generator,
        sparsify="random", consensus=False, default_normalize=False, default_rescale="inverse_density",
    )


def dare_ties(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE then TIES sign election and disjoint sum (mergekit's dare_ties; normalize default false)."""
    return generalized_task_arithmetic(
        base, tensors, model_params, params, options, generator,
        sparsify="random", consensus=True, default_normalize=False, default_rescale="inverse_density",
    )


def breadcrumbs(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest and the smallest magnitudes to keep ``density``, then sum."""
    return generalized_task_arithmetic(
        base, tensors, model_params, params, options, generator,
        sparsify="magnitude_outliers", consensus=False, default_normalize=False,
    )


def breadcrumbs_ties(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Breadcrumbs sparsification followed by the TIES sign election (mergekit's breadcrumbs_ties)."""
    return generalized_task_arithmetic(
        base, tensors, model_params, params, options, generator,
        sparsify="magnitude_outliers", consensus=True, default_normalize=False,
    )


def della(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA: MAGPRUNE each task vector (:mod:`evomerge.merge.kernels.magprune`), then the TIES sign election
    and disjoint mean (mergekit's della: normalize default true)."""
    return generalized_task_arithmetic(
        base, tensors, model_params, params, options, generator,
        sparsify="magprune", consensus=True, default_normalize=True, default_rescale="inverse_probability",
    )


def della_linear(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """MAGPRUNE then task arithmetic (mergekit's della_linear: normalize default false)."""
    return generalized_task_arithmetic(
        base, tensors, model_params, params, options, generator,
        sparsify="magprune", consensus=False, default_normalize=False, default_rescale="inverse_probability",
    )


def task_arithmetic_coefficients(model_params: list[dict[str, float]], params: dict[str, float],
                                 options: Mapping[str, Any]) -> LinearCoefficients:
    """``base + lambda * sum_t w_t tau_t / D`` (D = sum w_t when normalize, 1 when that sum is ~0): the kernel's algebra."""
    weights = [float(mp.get("weight", 1.0)) for mp in model_params]
    lam = float(params.get("lambda", 1.0))
    divisor = 1.0
    if bool(options.get("normalize", False)):
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    return LinearCoefficients(1.0, tuple(w * lam / divisor for w in weights))
