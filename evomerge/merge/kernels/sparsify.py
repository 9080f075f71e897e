"""Sparsification of task vectors: exact top-k magnitude masks, rank windows, DARE drops, global thresholds.

Pure torch (no other evomerge import), so kernels stay cheap to call from any engine.

Exact selection without sorting: the k-th largest magnitude is found by a sample-bracketed selection
(a strided sample brackets the answer, one vectorized pass counts and extracts the band between the
brackets, a sort runs on that small band); when the bracket misses (adversarial data) it falls
back to selecting over everything: numpy's introselect on CPU (linear worst case), a sort elsewhere (never
``torch.kthvalue``: quadratic on reverse-sorted input). Either way the result is exact. Ties at the threshold are broken
by flat index (lowest first) so exactly ``k`` entries are kept; mergekit's unstable argsort breaks them
arbitrarily, which only matters for repeated magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

# Below this many elements one sort is cheaper than sampling.
_SMALL = 1 << 18
_SAMPLE = 1 << 16


def keep_count(density: float, numel: int) -> int:
    """mergekit's k: ``max(1, int(density * numel))`` for 0 < density < 1; numel at density >= 1, 0 at <= 0."""
    if numel == 0 or density <= 0:
        return 0
    if density >= 1:
        return numel
    return min(numel, max(1, int(density * numel)))


def _kth(flat: torch.Tensor, rank: int) -> torch.Tensor:
    """The value at ascending ``rank`` of a 1-D tensor: introselect on CPU (linear worst case), else a sort."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):

        host = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # exact widening
        value = np.partition(host.numpy(), rank)[rank]
        return torch.tensor(value, dtype=host.dtype).to(flat.dtype)
    return torch.sort(flat).values[rank]


def select_rank(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """Exact value at 0-based ascending ``rank`` of a tensor, and how many entries are >= it.

    A strided sample gives bounds that bracket the rank with a wide statistical margin; entries inside
    the bracket (a small band) are extracted in two filtering steps, the first on the side of the
    bracket nearer the tail, and sorted (sorting, unlike quickselect, has no
    quadratic case on already-ordered data). Falls back to a full
    sort when the bracket is wrong, so the answer never depends on the sample.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} outside a tensor of {n} elements")
    if n > _SMALL:
        stride = max(1, n // _SAMPLE)
        sample = flat[::stride]
        m = sample.numel()
        q = (rank + 0.5) / n
        margin = int(8 * math.sqrt(m * q * (1 - q)) + 16)
        lo_r = int(q * m) - margin
        hi_r = int(q * m) + margin
        ordered = torch.sort(sample).values
        lo = ordered[lo_r] if lo_r >= 0 else None
        hi = ordered[hi_r] if hi_r < m else None
        if q >= 0.5:  # the band lies in the upper tail: cut there first
            upper = flat[flat >= lo] if lo is not None else flat
            below = n - upper.numel()
            band = upper[upper <= hi] if hi is not None else upper
            above = upper.numel() - band.numel()
        else:
            lower = flat[flat <= hi] if hi is not None else flat
            above = n - lower.numel()
            band = lower[lower >= lo] if lo is not None else lower
            below = lower.numel() - band.numel()
        local = rank - below
        if 0 <= local < band.numel() and band.numel() < n:
            value = _kth(band, local)
            return value, above + int(torch.count_nonzero(band >= value))
    # Small tensors, or a bracket the sample got wrong: sort (no quickselect worst case on sorted data).
    value = _kth(flat, rank)
    return value, int(torch.count_nonzero(flat >= value))


def topk_threshold_(delta: torch.Tensor, mag: torch.Tensor, k: int) -> float | None:
    """Threshold so that ``|delta| >= threshold`` keeps exactly the top-k magnitudes of ``delta``.

    ``mag`` is ``|delta|`` (read only). Ties at the threshold beyond k are zeroed in ``delta`` (highest flat
    indices first) so the threshold test stays exact. None means keep every non-zero entry (k covers
    them all, or the threshold is 0: zeros carry nothing). ``k <= 0`` zeroes ``delta`` and returns inf.
    """
    n = mag.numel()
    if k >= n:
        return None
    if k <= 0:
        delta.zero_()
        return math.inf
    thr, n_ge = select_rank(mag, n - k)
    value = float(thr)
    if value == 0:
        return None
    if n_ge != k:
        greater = int(torch.count_nonzero(mag > thr))
        ties = (mag == thr).reshape(-1).nonzero().squeeze(1)
        delta.view(-1)[ties[k - greater :]] = 0
    return value


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """Exact value at 0-based ascending ``rank`` (0-d tensor); see :func:`select_rank`."""
    return select_rank(values, rank)[0]


def _fix_ties(mask: torch.Tensor, mag: torch.Tensor, value: torch.Tensor, want_equal: int) -> None:
    """Keep only the first ``want_equal`` (by flat index) of the entries equal to ``value`` in ``mask``."""
    eq = (mag == value).reshape(-1)
    idx = eq.nonzero().squeeze(1)
    if want_equal < idx.numel():
        mask.view(-1)[idx[want_equal:]] = False


def topk_mask(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the ``k`` largest entries of ``mag`` (ties broken by lowest flat index)."""
    n = mag.numel()
    if k >= n:
        return torch.ones_like(mag, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(mag, dtype=torch.bool)
    thr, n_ge = select_rank(mag, n - k)
    if thr.item() == 0:
        # Zero magnitudes carry nothing: dropping them gives the same merge and avoids a tie scan.
        return mag > 0
    mask = mag >= thr
    if n_ge != k:
        greater = int(torch.count_nonzero(mag > thr))
        _fix_ties(mask, mag, thr, k - greater)
    return mask


def rank_window_mask(mag: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the entries whose ascending rank lies in ``[start, stop)`` (ties broken by flat index)."""
    n = mag.numel()
    start = max(0, start)
    stop = min(n, stop)
    if stop <= start:
        return torch.zeros_like(mag, dtype=torch.bool)
    if start == 0 and stop == n:
        return torch.ones_like(mag, dtype=torch.bool)
    if start == 0:
        return ~topk_mask_from_bottom_complement(mag, n - stop)
    if stop == n:
        return topk_mask_from_bottom_complement(mag, n - start)
    lo = kth_smallest(mag, start)
    hi = kth_smallest(mag, stop - 1)
    mask = (mag >= lo) & (mag <= hi)
    if int(torch.count_nonzero(mask)) != stop - start:
        # Rank of the first entry equal to lo, and of the first equal to hi, by counting.
        less_lo = int(torch.count_nonzero(mag < lo))
        if torch.equal(lo, hi):
            eq = (mag == lo).reshape(-1).nonzero().squeeze(1)
            mask.zero_()
            mask.view(-1)[eq[start - less_lo : stop - less_lo]] = True
            return mask
        eq_lo = (mag == lo).reshape(-1).nonzero().squeeze(1)
        mask.view(-1)[eq_lo[: start - less_lo]] = False
        less_hi = int(torch.count_nonzero(mag < hi))
        eq_hi = (mag == hi).reshape(-1).nonzero().squeeze(1)
        mask.view(-1)[eq_hi[stop - less_hi :]] = False
    return mask


def topk_mask_from_bottom_complement(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest entries, with ties broken so its complement is the lowest ranks."""
    n = mag.numel()
    if k <= 0:
        return torch.zeros_like(mag, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(mag, dtype=torch.bool)
    thr, n_ge = select_rank(mag, n - k)
    mask = mag >= thr
    if n_ge != k:
        less = n - n_ge
        # ascending ranks [less, n - k) among the ties stay out of the mask: the first (n-k-less) by index.
        eq = (mag == thr).reshape(-1).nonzero().squeeze(1)
        mask.view(-1)[eq[: n - k - less]] = False
    return mask


def rescale_(masked: torch.Tensor, original_l1: torch.Tensor | None, rescale: str, density: float) -> torch.Tensor:
    """Rescale a masked task vector in place.

    ``inverse_density`` divides by the density (DARE paper; unbiased in expectation), ``l1_norm`` restores
    the L1 norm of the unmasked vector (mergekit's ``rescale: true``, skipped when either norm < 1e-7),
    ``none`` leaves it.
    """
    if rescale == "none":
        return masked
    if rescale == "inverse_density":
        if density > 0:
            masked.div_(density)
        return masked
    if rescale == "l1_norm":
        if original_l1 is None:
            raise ValueError("l1_norm rescale needs the norm before masking")
        after = masked.abs().sum()
        if original_l1 >= 1e-7 and after >= 1e-7:
            masked.mul_(original_l1 / after)
        return masked
    raise ValueError(f"unknown rescale {rescale!r} (choices: none, inverse_density, l1_norm)")


def magnitude_(delta: torch.Tensor, density: float, rescale: str = "none") -> torch.Tensor:
    """TIES trim in place: keep the top ``keep_count(density)`` magnitudes (mergekit ``magnitude``)."""
    if density >= 1:
        return delta
    before = delta.abs().sum() if rescale == "l1_norm" else None
    mag = delta.abs()
    thr = topk_threshold_(delta, mag, keep_count(density, delta.numel()))
    if thr is not None and math.isfinite(thr):
        delta.mul_(torch.abs(delta, out=mag).ge_(thr))
    del mag
    return rescale_(delta, before, rescale, density)


def threshold_(delta: torch.Tensor, threshold: float, rescale: str = "none", density: float = 1.0) -> torch.Tensor:
    """Global-scope TIES trim in place: keep entries with ``|delta| >= threshold`` (see global_trim_thresholds)."""
    if threshold <= 0:
        return delta
    before = delta.abs().sum() if rescale == "l1_norm" else None
    keep = delta.abs()
    delta.mul_(keep.ge_(threshold))
    return rescale_(delta, before, rescale, density)


def magnitude_outliers_(delta: torch.Tensor, density: float, gamma: float, rescale: str = "none") -> torch.Tensor:
    """Model Breadcrumbs in place, mergekit's semantics.

    Drop the ``int(gamma*n)`` largest magnitudes (outliers), then the smallest so that ``int(density*n)``
    remain; the outlier cut shrinks when both cannot hold. ``density >= 1`` keeps everything (gamma unused).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    before = delta.abs().sum() if rescale == "l1_norm" else None
    mag = delta.abs()
    mask = rank_window_mask(mag, n_bot, n_bot + target)
    del mag
    delta.mul_(mask)
    return rescale_(delta, before, rescale, density)


def dare_(
    delta: torch.Tensor, density: float, generator: torch.Generator | None, rescale: str = "inverse_density"
) -> torch.Tensor:
    """DARE drop in place: keep each entry independently with probability ``density``, then rescale.

    The mask is ``U < density`` with ``U ~ Uniform[0, 1)`` drawn from ``generator`` (one draw per element,
    in flat order), so a seeded generator gives the same mask on every run. ``density >= 1`` is the identity.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if generator is None:
        raise ValueError("DARE needs an explicit seeded torch.Generator (density < 1)")
    before = delta.abs().sum() if rescale == "l1_norm" else None
    u = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32)
    delta.mul_(u.lt_(density))
    del u
    return rescale_(delta, before, rescale, density)


# ---------------------------------------------------------------------------------------------------------
# Global (whole-model) trim thresholds for TIES with trim_scope: global.

_HI_SHIFT = 15  # float32 magnitudes are < 2**31 as int32 bits: 65536 coarse bins, 32768 fine ones.


def _bits(t: torch.Tensor) -> torch.Tensor:
    mag = t.detach().reshape(-1).to(torch.float32).abs()
    return mag.view(torch.int32)


def global_trim_thresholds(
    delta_batches: Callable[[], Iterable[Sequence[torch.Tensor]]], densities: Sequence[float]
) -> list[float]:
    """Exact per-model magnitude thresholds for TIES over the whole model's flattened task vector.

    ``delta_batches()`` must return a fresh iterable (it is called twice) that yields, tensor by tensor,
    one delta per model (``theta_t - theta_0``; converted to float32 here). For model t with N_t delta
    entries the result is the k-th largest ``|tau_t|`` with ``k = keep_count(density_t, N_t)``, so that
    keeping ``|tau_t| >= threshold`` keeps exactly k entries (more only when magnitudes tie at the
    threshold). It is computed by streaming, two passes, in bounded memory: the int32 bit pattern of a
    non-negative float32 is monotone in its value, so pass 1 histograms the top 16 bits (int64 counts,
    exact) to find the bin holding the k-th largest, and pass 2 histograms the low 15 bits inside that bin,
    which pins the exact float. Returns 0.0 for density >= 1 (keep all) and ``inf`` for density <= 0.
    Feed the list to a TIES kernel as ``options["global_threshold"]`` with ``trim_scope: global``.
    """
    dens = [float(d) for d in densities]
    t_count = len(dens)
    coarse = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(t_count)]
    totals = [0] * t_count
    for batch in delta_batches():
        if len(batch) != t_count:
            raise ValueError(f"global_trim_thresholds: got {len(batch)} deltas for {t_count} densities")
        for i, d in enumerate(batch):
            b = _bits(d)
            totals[i] += b.numel()
            coarse[i] += torch.bincount((b >> _HI_SHIFT).cpu(), minlength=1 << 16)
    result: list[float | None] = [None] * t_count
    targets: list[tuple[int, int] | None] = [None] * t_count  # (coarse bin, rank from top within bin)
    for i in range(t_count):
        k = keep_count(dens[i], totals[i])
        if dens[i] >= 1 or totals[i] == 0:
            result[i] = 0.0
            continue
        if k == 0:
            result[i] = math.inf
            continue
        from_top = torch.flip(coarse[i], [0]).cumsum(0)
        pos = int(torch.searchsorted(from_top, torch.tensor(k, dtype=torch.int64)))
        bin_index = (1 << 16) - 1 - pos
        above = int(from_top[pos - 1]) if pos > 0 else 0
        targets[i] = (bin_index, k - above)
    if any(t is not None for t in targets):
        fine = [torch.zeros(1 << _HI_SHIFT, dtype=torch.int64) for _ in range(t_count)]
        for batch in delta_batches():
            for i, d in enumerate(batch):
                if targets[i] is None:
                    continue
                b = _bits(d)
                sel = b[(b >> _HI_SHIFT) == targets[i][0]]
                if sel.numel():
                    fine[i] += torch.bincount((sel & ((1 << _HI_SHIFT) - 1)).cpu(), minlength=1 << _HI_SHIFT)
        for i, tgt in enumerate(targets):
            if tgt is None:
                continue
            bin_index, rank = tgt
            from_top = torch.flip(fine[i], [0]).cumsum(0)
            pos = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=torch.int64)))
            low = (1 << _HI_SHIFT) - 1 - pos
            bits = torch.tensor([(bin_index << _HI_SHIFT) | low], dtype=torch.int32)
            result[i] = float(bits.view(torch.float32).item())
    return [float(r) for r in result]  # type: ignore[arg-type]
