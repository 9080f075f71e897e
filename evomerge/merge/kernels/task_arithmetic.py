"""mergekit's generalized task arithmetic: task_arithmetic, TIES, DARE and Breadcrumbs (linear and TIES forms).

Per model the task vector is sparsified (none, top-magnitude, random, magnitude with outliers), weighted, then
either summed (task arithmetic family) or combined by the TIES sign election and disjoint mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from evomerge.merge.kernels.common import Tensor, check_inputs, work_dtype
from evomerge.merge.kernels.linear import LinearCoefficients
from evomerge.merge.kernels.pieces import (
    CpuShare,
    Source,
    as_source,
    finish_streams,
    model_streams,
    part_bounds,
    piece_size,
    run_parts,
)
from evomerge.merge.kernels.sparsify import Cursor, make_sparsifier


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


def _check_out(out: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The caller's output buffer (checked), else a new one in the compute dtype."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, inputs have {shape}")
    if not out.is_floating_point():
        raise ValueError(f"out has dtype {out.dtype}; a floating dtype is needed")
    return out


class _Context:
    """One thread's readers and piece buffers for a generalized-task-arithmetic kernel."""

    def __init__(self, bsrc: Source, srcs: Sequence[Source], size: int, dtype: torch.dtype,
                 device: torch.device, given: bool, with_div: bool) -> None:
        self.bsrc = bsrc
        self.srcs = list(srcs)
        self.given = given
        self.bbuf = torch.empty(size, dtype=dtype, device=device)
        self.rows = torch.empty((len(srcs), size), dtype=dtype, device=device)
        self.scratch = torch.empty(size, dtype=dtype, device=device)
        self.mix = torch.empty(size, dtype=dtype, device=device)
        self.div = torch.empty(size, dtype=dtype, device=device) if with_div else None

    def load(self, start: int, stop: int, which: Iterable[int]) -> Tensor:
        """The base piece (in the compute dtype) and the task-vector pieces of models ``which`` into ``rows``."""
        m = stop - start
        b = self.bbuf[:m].copy_(self.bsrc.read(start, stop))
        for i in which:
            if self.given:
                self.rows[i, :m].copy_(self.srcs[i].read(start, stop))
            else:
                torch.sub(self.srcs[i].read(start, stop), b, out=self.rows[i, :m])
        return b


def generalized_task_arithmetic(
    base: Tensor | Source | None,
    tensors: Sequence[Tensor | Source],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None,
    *,
    sparsify: str | None,
    consensus: bool,
    default_normalize: bool,
    default_rescale: str = "none",
    out: Tensor | None = None,
) -> Tensor:
    """mergekit's generalized task arithmetic, the core of task_arithmetic, ties, dare_*, breadcrumbs.

    Per model: ``tau_t = theta_t - base`` sparsified (with its own density/gamma, then rescaled);
    ``variant: mergekit`` (default) multiplies by ``w_t`` before the sign election and, with ``normalize``,
    divides by the summed weights of the agreeing models (of all models without consensus; a divisor of
    0 counts as 1); ``variant: paper`` elects on the unweighted trimmed vectors and always divides by the
    count of agreeing entries (the TIES paper's disjoint mean; ``w_t`` then scales each agreeing term).
    Finally ``base + lambda * merged``.

    Streaming: inputs are tensors or :class:`~evomerge.merge.kernels.pieces.Source` s, read in flat-order
    pieces sized by ``options['memory_budget']`` (default 256 MiB; on CPU pieces stay cache-sized). Passes
    over the pieces: the selections each magnitude sparsifier needs (exact radix selection, see
    :mod:`~evomerge.merge.kernels.sparsify`), an L1 pass for ``rescale: l1_norm``, a sign-count pass for
    ``zero_sign: global_majority`` without a given sign, then the merge pass, which recomputes each piece's
    task vectors, sparsifies them, elects signs and writes the merged piece into ``out`` (any float dtype;
    a new tensor in the compute dtype when None). Temporaries are a few piece-sized buffers per model, never
    a full-size copy; the result does not depend on the piece size (same elementwise operations, exact
    selections, DARE draws in whole-tensor order).

    Cores: with ``options['cpu_share']`` (a :class:`~evomerge.merge.kernels.pieces.CpuShare`) and
    ``options['kernel_threads'] > 1``, a large tensor is cut into contiguous parts that idle cores walk at
    once (not with DARE draws, which come in one stream); ties at a threshold are resolved part by part
    from per-part counts, so the result is the same bits.

    The sign election runs without boolean masks, as ``e * sum_t max(e * tau_t, 0)`` with ``e = +-1``.
    """
    if base is None:
        raise ValueError("this method needs a base tensor")
    check_inputs(base, tensors, model_params)
    bsrc = as_source(base)
    srcs = [as_source(t) for t in tensors]
    wd = work_dtype(bsrc, options)  # type: ignore[arg-type]
    weights = [float(mp.get("weight", 1.0)) for mp in model_params]
    normalize = bool(options.get("normalize", default_normalize))
    variant = str(options.get("variant", "mergekit"))
    if variant not in ("mergekit", "paper"):
        raise ValueError(f"unknown variant {variant!r} (choices: mergekit, paper)")
    sign_rule = str(options.get("sign_rule", "mass"))
    zero_sign = str(options.get("zero_sign", "positive"))
    if consensus:
        if sign_rule not in ("mass", "majority_count"):
            raise ValueError(f"unknown sign_rule {sign_rule!r} (choices: mass, majority_count)")
        if zero_sign not in ("positive", "global_majority"):
            raise ValueError(f"unknown zero_sign {zero_sign!r} (choices: positive, global_majority)")
    lam = float(params.get("lambda", 1.0))
    given = bool(options.get("inputs_are_deltas", False))
    t_count = len(srcs)
    shape = tuple(bsrc.shape)
    n = bsrc.numel()
    device = bsrc.device
    sparsifiers = [make_sparsifier(sparsify, i, n, model_params[i], options, default_rescale, wd)
                   for i in range(t_count)]
    draws = any(sp.draws for sp in sparsifiers)
    if draws and generator is None:
        raise ValueError("DARE needs an explicit seeded torch.Generator (density < 1)")
    streams = model_streams(generator, [sp.draws for sp in sparsifiers])
    for sp, stream in zip(sparsifiers, streams):
        sp.stream = stream
    result = _check_out(out, shape, wd, device)
    target = result if result.is_contiguous() else torch.empty(shape, dtype=result.dtype, device=result.device)
    flat_out = target.view(-1)
    direct = flat_out.dtype == wd and flat_out.device == device

    # piece buffers: base, T task vectors, scratch, draws, and the election's few; inputs' read buffers
    held = sum(s.dtype.itemsize for s in (bsrc, *srcs)) + (t_count + 8) * wd.itemsize + 4 * t_count
    share: CpuShare | None = options.get("cpu_share")
    threads = int(options.get("kernel_threads", 1)) if share is not None else 1
    parts = [(0, n)] if draws else part_bounds(n, threads, options)
    hists = len(parts) * sum(sp.select.hist_bytes for sp in sparsifiers if sp.select is not None)
    size = min(piece_size(options, held * min(threads, len(parts)), device, hists), max(n, 1))
    need_div = variant == "paper" or normalize
    contexts: list[_Context] = [_Context(bsrc, srcs, size, wd, device, given, consensus and need_div)]

    def make_context() -> _Context:
        return _Context(bsrc.clone(), [s.clone() for s in srcs], size, wd, device, given, consensus and need_div)

    def walk(task: Callable[[_Context, int, int], None]) -> Callable[[_Context, int], None]:
        """A part's task: ``task(context, start, stop)`` on each of its pieces, in flat order."""
        def run(ctx: _Context, j: int) -> None:
            lo, hi = parts[j]
            for start in range(lo, hi, size):
                task(ctx, start, min(hi, start + size))
        return run

    def run(task: Callable[[_Context, int, int], None]) -> None:
        run_parts(len(parts), walk(task), make_context, share, threads, contexts)

    def part_of(start: int) -> int:
        return next(j for j, (lo, hi) in enumerate(parts) if lo <= start < hi)

    def prepared(ctx: _Context, cursors: Sequence[Cursor], m: int) -> list[Tensor]:
        """Sparsified (and, for mergekit's variant, weighted) task vectors of the loaded piece."""
        out_rows = []
        for i, cur in enumerate(cursors):
            row = cur.apply_(ctx.rows[i, :m], ctx.scratch[:m])
            if consensus and variant == "mergekit" and weights[i] != 1.0:
                row.mul_(weights[i])
            out_rows.append(row)
        return out_rows

    # pre-merge passes: selections, L1 norms
    while True:
        active = [i for i, sp in enumerate(sparsifiers) if sp.pending]
        if not active:
            break
        cursors = {i: [sparsifiers[i].cursor(j) for j in range(len(parts))] for i in active}

        def feed(ctx: _Context, start: int, stop: int, active: list[int] = active,
                 cursors: dict[int, list[Cursor]] = cursors) -> None:
            ctx.load(start, stop, active)
            j = part_of(start)
            for i in active:
                cursors[i][j].feed(ctx.rows[i, : stop - start], ctx.scratch[: stop - start])

        run(feed)
        for i in active:
            sparsifiers[i].end_pass(cursors[i])

    majority = options.get("majority_sign")
    if consensus and zero_sign == "global_majority" and majority is None:
        # the majority over this tensor needs every elected sign first: one more pass, counting signs exactly
        by_part = [[sp.cursor(j) for sp in sparsifiers] for j in range(len(parts))]
        counts = [0] * len(parts)

        def count(ctx: _Context, start: int, stop: int) -> None:
            ctx.load(start, stop, range(t_count))
            j = part_of(start)
            e = elected_sign(prepared(ctx, by_part[j], stop - start), sign_rule, "global_majority", 0.0)
            counts[j] += int(torch.count_nonzero(e > 0)) - int(torch.count_nonzero(e < 0))

        run(count)
        majority = float(sum(counts))

    divisor = 1.0
    if not consensus and normalize:
        divisor = float(torch.tensor(weights, dtype=wd).sum())
        if abs(divisor) < 1e-8:
            divisor = 1.0
    merge_cursors = [[sp.cursor(j) for sp in sparsifiers] for j in range(len(parts))]

    def merge(ctx: _Context, start: int, stop: int) -> None:
        m = stop - start
        b = ctx.load(start, stop, range(t_count))
        sparse = prepared(ctx, merge_cursors[part_of(start)], m)
        o = flat_out[start:stop] if direct else ctx.scratch[:m]
        if not consensus:
            mixed = sparse[0]
            if weights[0] != 1.0:
                mixed.mul_(weights[0])
            for i in range(1, t_count):
                mixed.add_(sparse[i], alpha=weights[i])
            if normalize:
                mixed.div_(divisor)
            if lam != 1:
                mixed.mul_(lam)
            torch.add(mixed, b, out=o)
        else:
            e = elected_sign(sparse, sign_rule, zero_sign, majority)
            mx = ctx.mix[:m].zero_()
            dv = ctx.div[:m].zero_() if ctx.div is not None else None
            t = ctx.scratch[:m]
            for i in range(t_count):
                torch.mul(sparse[i], e, out=t).clamp_min_(0)
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
                dv.add_(dv == 0)  # a divisor of 0 counts as 1 (as masked_fill, at a fraction of its cost)
                mx.div_(dv)
            if not direct:
                o = ctx.rows[0, :m]  # consumed by now
            if lam != 1:
                torch.add(b, mx, alpha=lam, out=o)
            else:
                torch.add(b, mx, out=o)
        if not direct:
            flat_out[start:stop].copy_(o)

    run(merge)
    finish_streams(generator, streams)
    if target is not result:
        result.copy_(target)
    return result


class FamilyKernel(Protocol):
    """A generalized-task-arithmetic kernel: the kernel signature plus ``out=`` (it streams)."""

    def __call__(self, base: Tensor | Source | None, tensors: Sequence[Tensor | Source],
                 model_params: list[dict[str, float]], params: dict[str, float], options: Mapping[str, Any],
                 generator: torch.Generator | None = None, out: Tensor | None = None) -> Tensor: ...


def _member(name: str, doc: str, *, sparsify: str | None, consensus: bool, default_normalize: bool,
            default_rescale: str = "none") -> FamilyKernel:
    """One method of the family: generalized task arithmetic with its sparsification and combination."""
    def kernel(base: Tensor | Source | None, tensors: Sequence[Tensor | Source],
               model_params: list[dict[str, float]], params: dict[str, float], options: Mapping[str, Any],
               generator: torch.Generator | None = None, out: Tensor | None = None) -> Tensor:
        return generalized_task_arithmetic(base, tensors, model_params, params, options, generator,
                                           sparsify=sparsify, consensus=consensus, default_normalize=default_normalize,
                                           default_rescale=default_rescale, out=out)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = doc
    return kernel


task_arithmetic = _member(
    "task_arithmetic", "``base + lambda * sum_t w_t tau_t`` (divided by ``sum w_t`` when ``normalize``, default false).",
    sparsify=None, consensus=False, default_normalize=False)
ties = _member(
    "ties", "TIES: trim each tau_t to its top ``density`` magnitudes, elect signs, disjoint mean, scale by lambda.\n\n"
    "``trim_scope: tensor`` trims per tensor (mergekit); ``global`` keeps ``|tau_t| >= options['global_threshold'][t]`` "
    "computed over the whole model by :func:`evomerge.merge.kernels.sparsify.global_trim_thresholds` (official "
    "TIES code). Keep count ``max(1, int(density * n))``, exact top-k, ties by index.",
    sparsify="magnitude", consensus=True, default_normalize=True)
dare_linear = _member(
    "dare_linear", "DARE then task arithmetic: drop each delta entry with probability ``1 - density``, rescale, sum.",
    sparsify="random", consensus=False, default_normalize=False, default_rescale="inverse_density")
dare_ties = _member(
    "dare_ties", "DARE then TIES sign election and disjoint sum (mergekit's dare_ties; normalize default false).",
    sparsify="random", consensus=True, default_normalize=False, default_rescale="inverse_density")
magnitude_prune = _member(
    "magnitude_prune", "PEFT's magnitude_prune: trim each tau_t to its top ``density`` magnitudes, then task "
    "arithmetic (no sign election); keeps at least one entry where PEFT's ``int(density * n)`` keeps none.",
    sparsify="magnitude", consensus=False, default_normalize=False)
breadcrumbs = _member(
    "breadcrumbs", "Model Breadcrumbs: drop the ``gamma`` largest and the smallest magnitudes to keep ``density``, "
    "then sum.", sparsify="magnitude_outliers", consensus=False, default_normalize=False)
breadcrumbs_ties = _member(
    "breadcrumbs_ties", "Breadcrumbs sparsification followed by the TIES sign election (mergekit's breadcrumbs_ties).",
    sparsify="magnitude_outliers", consensus=True, default_normalize=False)


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
