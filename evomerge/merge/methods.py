"""Merge kernels: pure tensor functions, one output tensor per call, no name parsing, no I/O.

Every kernel has the signature (see docs/ARCHITECTURE.md)::

    fn(base, tensors, model_params, params, options, generator) -> Tensor

``base`` is the base model's tensor (None for methods without a base), ``tensors`` the input models'
tensors in recipe order (base excluded for methods that need one), ``model_params[i]`` the resolved
numeric per-model values for ``tensors[i]`` (weight, density, gamma...), ``params`` the resolved global
values (lambda, t...), ``options`` the behaviour switches (defaults below apply to missing keys) and
``generator`` a seeded ``torch.Generator`` for random methods (DARE).

Common options, read by every kernel:
- ``compute_dtype``: torch dtype (or its name) to compute in; default float32, float64 when inputs are.
- ``inputs_are_deltas``: ``tensors`` already hold task vectors ``theta_t - base`` (the resident merger
  keeps those); the result is still a full tensor.

Kernels never modify their inputs and return a new tensor in the compute dtype; the caller casts.
Semantics follow mergekit 0.1.5 unless an option says otherwise (see each docstring).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.methods_sparsify import (
    dare_,
    keep_count,
    magnitude_,
    magnitude_outliers_,
    threshold_,
    topk_threshold_,
)

Tensor = torch.Tensor

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def work_dtype(ref: Tensor, options: Mapping[str, Any]) -> torch.dtype:
    """The dtype kernels compute in: ``options['compute_dtype']``, else float64 for float64 inputs, else float32."""
    wanted = options.get("compute_dtype")
    if wanted is not None:
        if isinstance(wanted, torch.dtype):
            return wanted
        if wanted in _DTYPES:
            return _DTYPES[wanted]
        raise ValueError(f"compute_dtype: unknown dtype {wanted!r} (choices: {sorted(_DTYPES)})")
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


def _full_inputs(base: Tensor | None, tensors: Sequence[Tensor], options: Mapping[str, Any], wd: torch.dtype) -> list[Tensor]:
    """Full model tensors in ``wd``: reconstructs ``base + delta`` when given task vectors."""
    if options.get("inputs_are_deltas", False):
        if base is None:
            raise ValueError("inputs_are_deltas needs the base tensor")
        b = base.to(wd)
        return [b + t.to(wd) for t in tensors]
    return [t.to(wd) for t in tensors]


def _check_inputs(base: Tensor | None, tensors: Sequence[Tensor], model_params: Sequence[Mapping[str, float]]) -> None:
    if not tensors:
        raise ValueError("no input tensors")
    if len(model_params) != len(tensors):
        raise ValueError(f"{len(model_params)} per-model parameter sets for {len(tensors)} tensors")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"input {i} has shape {tuple(t.shape)}, input 0 has {tuple(shape)}")
    if base is not None and base.shape != shape:
        raise ValueError(f"base has shape {tuple(base.shape)}, inputs have {tuple(shape)}")


# ------------------------------------------------------------------------------------------------ linear


def linear(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Model soup: ``sum_t w_t theta_t``, divided by ``sum_t w_t`` when ``normalize`` (default true, as mergekit)."""
    _check_inputs(base, tensors, model_params)
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


# ------------------------------------------------------------------------- generalized task arithmetic


def _deltas(base: Tensor, tensors: Sequence[Tensor], options: Mapping[str, Any], wd: torch.dtype) -> Tensor:
    """Stacked task vectors, shape (T, *base.shape), in ``wd`` (one allocation, filled in place)."""
    stacked = torch.empty((len(tensors), *base.shape), dtype=wd, device=base.device)
    given = bool(options.get("inputs_are_deltas", False))
    b = None if given else base.to(wd)
    for i, t in enumerate(tensors):
        row = stacked[i]
        row.copy_(t)
        if b is not None:
            row.sub_(b)
    return stacked


def _expand(values: Sequence[float], like: Tensor) -> Tensor:
    w = torch.tensor(values, dtype=like.dtype, device=like.device)
    return w.reshape((len(values),) + (1,) * (like.dim() - 1))


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
    _check_inputs(base, tensors, model_params)
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
    computed over the whole model by :func:`evomerge.merge.methods_sparsify.global_trim_thresholds`
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


# ------------------------------------------------------------------------------------------------- slerp

SLERP_DOT_THRESHOLD = 0.9995


def slerp(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Spherical interpolation from ``tensors[0]`` (t = 0) to ``tensors[1]`` (t = 1) over the whole tensor.

    As mergekit: ``d = <v0/|v0|, v1/|v1|>`` (a norm below 1e-8 counts as 1), linear interpolation when
    ``|d| > 0.9995``, else ``sin((1-t)W)/sin W * v0 + sin(tW)/sin W * v1`` with ``W = arccos d`` on the
    unnormalized tensors. Reductions run in float64.
    """
    if len(tensors) != 2:
        raise ValueError(f"slerp needs exactly 2 tensors, got {len(tensors)}")
    _check_inputs(base, tensors, model_params)
    wd = work_dtype(tensors[0], options)
    a, b = _full_inputs(base, tensors, options, wd)
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


# ------------------------------------------------------------------------------------------- model stock


def model_stock(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Model Stock (mergekit's formula): ``t = N cos / (1 + (N-1) cos)``, ``theta = t * mean_t theta_t + (1-t) * base``.

    ``cos`` is the mean pairwise cosine of the task vectors (norm products clamped at 1e-6), over the whole
    tensor or, with ``filter_wise``, per row (1-D tensors count as one row). Where ``1 + (N-1) cos`` is
    below 1e-6 in magnitude the base is kept.
    """
    if base is None:
        raise ValueError("model_stock needs a base tensor")
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {len(tensors)}")
    _check_inputs(base, tensors, model_params)
    wd = work_dtype(base, options)
    filter_wise = bool(options.get("filter_wise", False))
    shape = base.shape
    w0 = base.to(wd)
    deltas = _deltas(base, tensors, options, wd)
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
