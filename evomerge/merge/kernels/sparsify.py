"""Sparsification of task vectors, exact and in linear time: top-k, rank windows, thresholds, DARE drops.

Pure torch (of evomerge, only :mod:`~evomerge.merge.kernels.pieces`), so kernels stay cheap to call from
any engine.

**Selection.** Every top-k / percentile / rank step is an exact order statistic found without sorting, in
pieces: the bit pattern of a non-negative float, read as an integer (a *key*, :func:`magnitude_keys`), orders
like its value, so a radix select over the keys (:class:`RadixSelect`) finds the key at any rank with one
histogram pass per 16 bits (two for float32, one for bfloat16/float16, four for float64), each pass a
``bincount`` over cache-sized pieces. The answer is exact (the last pass pins the key), and never depends on
the data's order or on how the tensor is cut into pieces. Values of both signs select the same way over
:func:`signed_keys` (``select_rank``, ``order_stats(..., magnitudes=False)``).

**Ties.** A selection is a :class:`MagnitudeCut`: the entries strictly beyond a threshold key plus the first
``ties`` entries (lowest flat index first) equal to it, so exactly ``k`` entries are kept whatever the
repeated magnitudes (bf16 task vectors repeat many). :class:`CutMask` applies a cut piece by piece in flat
order, counting the ties it has passed. Top-k keeps the largest magnitudes, ties to the lowest indices
(:meth:`MagnitudeCut.top`); a rank window over ascending order (Breadcrumbs) ranks equal magnitudes by index
too (:meth:`MagnitudeCut.bottom`). mergekit's unstable sorts break ties arbitrarily, which only matters for
repeated magnitudes.

**Using it** (DELLA's ranks, new methods): ``top_k_cut(x, k)`` / ``bottom_cut(x, r)`` give the cut of a
tensor or :class:`~evomerge.merge.kernels.pieces.Source` of magnitudes; ``order_stats`` gives the keys at any
ascending ranks; feed :class:`RadixSelect` yourself to select over values computed on the fly (task vectors
``theta_t - theta_0`` piece by piece, several models per read: see ``task_arithmetic``); ``row_ranks`` ranks
magnitudes within rows (DELLA's per-row ranks, stable). :class:`Sparsifier` wraps one model's whole
sparsification of one tensor (selection passes, optional L1 pass, masking pass).

DARE draws come from :class:`~evomerge.merge.kernels.pieces.UniformStream`: one float32 uniform per element,
in flat order, model after model, equal to whole-tensor ``torch.rand`` draws on CPU, whatever the pieces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge.kernels.pieces import BlockSum, Source, UniformStream, as_source, piece_size, ranges

Tensor = torch.Tensor


def keep_count(density: float, numel: int) -> int:
    """mergekit's k: ``max(1, int(density * numel))`` for 0 < density < 1; numel at density >= 1, 0 at <= 0."""
    if numel == 0 or density <= 0:
        return 0
    if density >= 1:
        return numel
    return min(numel, max(1, int(density * numel)))


# ------------------------------------------------------------------------------------------------- keys

# float dtype -> (integer dtype of the same width, significant bits of a non-negative value's pattern)
_KEYS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float32: (torch.int32, 31),
    torch.float64: (torch.int64, 63),
    torch.bfloat16: (torch.int16, 15),
    torch.float16: (torch.int16, 15),
}


def key_bits(dtype: torch.dtype) -> int:
    """Significant bits of the keys of non-negative values of ``dtype``."""
    if dtype not in _KEYS:
        raise ValueError(f"no magnitude keys for dtype {dtype} (float32, float64, bfloat16, float16)")
    return _KEYS[dtype][1]


def magnitude_keys(values: Tensor, out: Tensor | None = None) -> Tensor:
    """``|values|`` as integer keys ordered like the magnitudes (NaN above inf); ``out`` receives ``|values|``.

    The keys are a view of ``out`` (or of a new tensor), so ``out`` also holds the magnitudes afterwards.
    """
    mag = torch.abs(values, out=out) if out is not None else values.abs()
    return mag.view(_KEYS[mag.dtype][0])


def _flip(bits: Tensor) -> Tensor:
    """Negative floats' bit patterns with their magnitude bits flipped: signed integers ordered like the values."""
    width = bits.element_size() * 8
    return bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))


def signed_keys(values: Tensor) -> Tensor:
    """Values of any sign as signed integer keys ordered like the values (``-0.0`` counted as ``+0.0``).

    Select over them with ``RadixSelect(signed_key_bits(dtype), ranks, signed=True)``.
    """
    canonical = values + 0.0  # -0.0 + 0.0 == +0.0: equal values get equal keys
    return _flip(canonical.view(_KEYS[values.dtype][0]))


def signed_key_bits(dtype: torch.dtype) -> int:
    """Bits of :func:`signed_keys` of ``dtype`` (its full width)."""
    return key_bits(dtype) + 1


def key_value(key: int, dtype: torch.dtype, signed: bool = False) -> float:
    """The float whose key (:func:`magnitude_keys`, or :func:`signed_keys` when ``signed``) is ``key``."""
    bits = torch.tensor([key], dtype=_KEYS[dtype][0])
    return float((_flip(bits) if signed else bits).view(dtype).item())


# ------------------------------------------------------------------------------------- radix selection


@dataclass(frozen=True)
class OrderStat:
    """The entry at ascending ``rank`` of a stream of keys: its ``key``, how many keys are below it and equal."""

    rank: int
    key: int
    below: int
    equal: int
    count: int  # keys in the stream
    part_equal: tuple[int, ...] = ()  # keys equal to ``key`` in each part fed separately, in order

    @property
    def above(self) -> int:
        return self.count - self.below - self.equal


def _levels(bits: int) -> list[tuple[int, int]]:
    """(shift, width) of each radix digit, most significant first: 16 bits per pass."""
    out = []
    rem = bits
    while rem > 0:
        width = min(16, rem)
        rem -= width
        out.append((rem, width))
    return out


class RadixCounter:
    """One part's histograms for a pass of a :class:`RadixSelect` (parts are fed by different threads)."""

    def __init__(self, select: RadixSelect) -> None:
        self.select = select
        self.count = 0
        self.hists: dict[int, Tensor] = {}

    def feed(self, keys: Tensor) -> None:
        """One piece of this part (1-D integer keys, non-negative)."""
        sel = self.select
        if sel.done:
            raise RuntimeError("RadixSelect: already done")
        if keys.numel() == 0:
            return
        shift, width = sel.levels[sel.level]
        if sel.level == 0:
            self.count += keys.numel()
            digits = keys >> shift if shift else keys
            if sel.offset:
                digits = digits.to(torch.int32) + sel.offset  # signed keys: the top digit from 0
            # the digits a piece holds span a few exponents: count those bins only, add them in place
            low = int(digits.min())
            hist = torch.bincount((digits - low).reshape(-1))
            acc = self.hists.get(0)
            if acc is None:
                acc = self.hists[0] = torch.zeros(1 << width, dtype=torch.int64, device=keys.device)
            acc[low:low + hist.numel()].add_(hist)
            return
        high = keys >> shift if shift else keys
        for prefix in sel.prefixes:
            v = high - (prefix << width)
            v.clamp_(-1, 1 << width).add_(1)
            self._add(prefix, torch.bincount(v.reshape(-1), minlength=(1 << width) + 2)[1:-1])

    def _add(self, prefix: int, hist: Tensor) -> None:
        acc = self.hists.get(prefix)
        if acc is None:
            self.hists[prefix] = hist.to(torch.int64)
        else:
            acc.add_(hist)


class RadixSelect:
    """Exact keys at given ascending ranks of a stream of non-negative integer keys, in a few passes.

    Feed every piece of the stream (any cut, any order within a pass) with :meth:`feed` (or through
    :meth:`counter` s, one per part fed by its own thread), then :meth:`end_pass`; repeat while not
    :attr:`done` (:attr:`passes` passes; a pass histograms one 16-bit digit of the keys sharing the digits
    found so far). ``ranks``: the ascending ranks wanted, or a function of the stream's length (known after
    the first pass), e.g. ``lambda n: [n - k]`` for the k-th largest. ``signed``: the keys are signed
    integers of ``bits`` bits (:func:`signed_keys`), else non-negative ones of ``bits`` significant bits
    (:func:`magnitude_keys`). Memory: one 65,536-bin int64 histogram per distinct prefix (at most one per
    wanted rank) and counter.
    """

    def __init__(self, bits: int, ranks: Sequence[int] | Callable[[int], Sequence[int]],
                 signed: bool = False) -> None:
        if not 1 <= bits <= (64 if signed else 63):
            raise ValueError(f"RadixSelect: bits must be in 1..63 (64 signed), got {bits}")
        self.levels = _levels(bits)
        self.offset = 1 << (self.levels[0][1] - 1) if signed else 0
        self._ranks = ranks
        self.level = 0
        self.count = 0
        self._queries: list[list[int]] = []  # [rank, prefix, below] per wanted rank
        self.prefixes: list[int] = [0]
        self._default = RadixCounter(self)
        self.results: list[OrderStat] | None = None

    @property
    def done(self) -> bool:
        return self.results is not None

    @property
    def passes(self) -> int:
        return len(self.levels)

    @property
    def hist_bytes(self) -> int:
        """Bytes a counter's histograms take in one pass (accumulator and one piece's bincount)."""
        return 2 * 8 * ((1 << self.levels[0][1]) + 2) * max(1, len(self._ranks) if not callable(self._ranks) else 1)

    def counter(self) -> RadixCounter:
        """A fresh part for this pass (pass them all, in flat order, to :meth:`end_pass`)."""
        return RadixCounter(self)

    def feed(self, keys: Tensor) -> None:
        """One piece of the stream, into the default part."""
        self._default.feed(keys)

    def end_pass(self, counters: Sequence[RadixCounter] | None = None) -> None:
        """Close a pass over ``counters`` (default: what :meth:`feed` got): fix the next digit of every key.

        On the last pass each result also says how many of its equal keys each counter saw
        (``OrderStat.part_equal``), so that ties can be resolved part by part.
        """
        if self.done:
            raise RuntimeError("RadixSelect: already done")
        parts = list(counters) if counters is not None else [self._default]
        shift, width = self.levels[self.level]
        if self.level == 0:
            self.count = sum(c.count for c in parts)
            ranks = list(self._ranks(self.count) if callable(self._ranks) else self._ranks)
            for r in ranks:
                if not 0 <= r < self.count:
                    raise ValueError(f"rank {r} outside a stream of {self.count} keys")
            self._queries = [[int(r), 0, 0] for r in ranks]
        if len(parts) == 1:
            totals = parts[0].hists
        else:
            totals = {}
            for c in parts:
                for p, h in c.hists.items():
                    totals[p] = h.clone() if p not in totals else totals[p].add_(h)
        hists = {p: h.cpu() for p, h in totals.items()}
        last = self.level == len(self.levels) - 1
        results = []
        for q in self._queries:
            rank, prefix, below = q
            hist = hists.get(prefix)
            if hist is None:
                hist = torch.zeros(1 << width, dtype=torch.int64)
            cum = hist.cumsum(0)
            digit = int(torch.searchsorted(cum, torch.tensor([rank - below]), right=True))
            q[2] = below + (int(cum[digit - 1]) if digit else 0)
            value = (prefix << width) + digit - (self.offset if self.level == 0 else 0)
            if last:
                part_equal = tuple(int(c.hists[prefix][digit]) if prefix in c.hists else 0 for c in parts)
                results.append(OrderStat(rank=rank, key=value, below=q[2],
                                         equal=int(hist[digit]), count=self.count, part_equal=part_equal))
            q[1] = value
        self._default = RadixCounter(self)
        self.level += 1
        self.prefixes = sorted({q[1] for q in self._queries})
        if last:
            self.results = results


def order_stats(values: Tensor | Source, ranks: Sequence[int], *, magnitudes: bool = True,
                options: Mapping[str, Any] | None = None) -> list[OrderStat]:
    """Exact order statistics of ``|values|`` (``magnitudes``) or of the values themselves, in pieces.

    ``values``: a tensor or :class:`~evomerge.merge.kernels.pieces.Source`; pieces are sized by
    ``options['memory_budget']`` / ``options['piece_elems']``. The results' keys are :func:`magnitude_keys`
    (``magnitudes``) or :func:`signed_keys`: read them with :func:`key_value` (``signed=not magnitudes``).
    """
    src = as_source(values)
    n = src.numel()
    if n == 0:
        raise ValueError("order statistics of an empty tensor")
    if magnitudes:
        sel = RadixSelect(key_bits(src.dtype), ranks)
    else:
        sel = RadixSelect(signed_key_bits(src.dtype), ranks, signed=True)
    size = piece_size(options or {}, 2 * src.dtype.itemsize, src.device)
    scratch = torch.empty(min(size, n), dtype=src.dtype, device=src.device)
    while not sel.done:
        for start, stop in ranges(n, size):
            piece = src.read(start, stop)
            sel.feed(magnitude_keys(piece, scratch[: stop - start]) if magnitudes else signed_keys(piece))
        sel.end_pass()
    assert sel.results is not None
    return sel.results


# ------------------------------------------------------------------------------------------------- cuts


@dataclass(frozen=True)
class MagnitudeCut:
    """A set of entries given by a threshold key: those strictly beyond it, and the first ``ties`` equal to it.

    ``side``: ``above`` (keys greater than ``key``: a top-k), ``below`` (keys less: a bottom-r), ``all`` or
    ``none``. ``beyond`` counts the entries strictly beyond, ``equal`` those equal to the threshold; the set
    holds ``beyond + ties`` entries, ties taken lowest flat index first.
    """

    side: str
    key: int = 0
    beyond: int = 0
    equal: int = 0
    ties: int = 0
    part_equal: tuple[int, ...] = ()  # entries equal to the threshold in each part of the tensor, in order

    @property
    def size(self) -> int:
        return self.beyond + self.ties

    @staticmethod
    def top(stat: OrderStat, k: int) -> MagnitudeCut:
        """The k largest, from the order statistic at ascending rank ``n - k``."""
        return MagnitudeCut("above", stat.key, stat.above, stat.equal, k - stat.above, stat.part_equal)

    @staticmethod
    def bottom(stat: OrderStat, r: int) -> MagnitudeCut:
        """The r smallest (ties lowest index first), from the order statistic at ascending rank ``r - 1``."""
        return MagnitudeCut("below", stat.key, stat.below, stat.equal, r - stat.below, stat.part_equal)

    def threshold(self, dtype: torch.dtype) -> float:
        """The threshold magnitude (in ``dtype``, whose keys the cut was found on)."""
        return key_value(self.key, dtype)


class CutMask:
    """A cut's membership mask, piece by piece in flat order (it counts the ties it has passed).

    Call with the keys of consecutive pieces (:func:`magnitude_keys`) from the start of the tensor, or from
    the start of ``part`` (the parts the cut's selection was fed in: the ties of earlier parts are known).
    """

    def __init__(self, cut: MagnitudeCut, part: int = 0) -> None:
        self.cut = cut
        self._seen = sum(cut.part_equal[:part]) if part else 0

    def __call__(self, keys: Tensor) -> Tensor | None:
        """Boolean mask of the piece's members; None when every entry is a member."""
        cut = self.cut
        if cut.side == "all":
            return None
        if cut.side == "none":
            return torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
        above = cut.side == "above"
        if cut.ties >= cut.equal:  # every tie is in: one comparison
            return keys >= cut.key if above else keys <= cut.key
        strict = keys > cut.key if above else keys < cut.key
        if cut.ties == 0 or self._seen >= cut.ties:
            return strict
        eq = keys == cut.key
        count = int(torch.count_nonzero(eq))
        if self._seen + count <= cut.ties:
            strict |= eq
        else:
            idx = eq.reshape(-1).nonzero().squeeze(1)[: cut.ties - self._seen]
            strict.view(-1)[idx] = True
        self._seen += count
        return strict


def _cut_of(values: Tensor | Source, k: int, side: str, options: Mapping[str, Any] | None) -> MagnitudeCut:
    src = as_source(values)
    n = src.numel()
    if side == "above":
        if k >= n:
            return MagnitudeCut("all", beyond=n)
        if k <= 0:
            return MagnitudeCut("none")
        return MagnitudeCut.top(order_stats(src, [n - k], options=options)[0], k)
    if k >= n:
        return MagnitudeCut("all", beyond=n)
    if k <= 0:
        return MagnitudeCut("none")
    return MagnitudeCut.bottom(order_stats(src, [k - 1], options=options)[0], k)


def top_k_cut(values: Tensor | Source, k: int, options: Mapping[str, Any] | None = None) -> MagnitudeCut:
    """The ``k`` largest ``|values|`` (ties to the lowest flat index), exactly, in pieces."""
    return _cut_of(values, k, "above", options)


def bottom_cut(values: Tensor | Source, r: int, options: Mapping[str, Any] | None = None) -> MagnitudeCut:
    """The ``r`` smallest ``|values|`` (ties to the lowest flat index), exactly, in pieces."""
    return _cut_of(values, r, "below", options)


def cut_mask(values: Tensor, cut: MagnitudeCut) -> Tensor:
    """The whole boolean mask of a cut over a tensor (its shape)."""
    mask = CutMask(cut)(magnitude_keys(values))
    return torch.ones(values.shape, dtype=torch.bool, device=values.device) if mask is None else mask


# --------------------------------------------------------------------------- whole-tensor helpers (API)


def select_rank(values: Tensor, rank: int) -> tuple[Tensor, int]:
    """Exact value at 0-based ascending ``rank`` of a tensor, and how many entries are >= it (linear time)."""
    flat = values.reshape(-1)
    n = flat.numel()
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} outside a tensor of {n} elements")
    stat = order_stats(flat, [rank], magnitudes=False)[0]
    return torch.tensor(key_value(stat.key, flat.dtype, signed=True), dtype=flat.dtype), stat.count - stat.below


def kth_smallest(values: Tensor, rank: int) -> Tensor:
    """Exact value at 0-based ascending ``rank`` of a tensor (0-d tensor)."""
    return select_rank(values, rank)[0]


def topk_mask(mag: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly the ``k`` largest entries of ``|mag|`` (ties broken by lowest flat index)."""
    return cut_mask(mag, top_k_cut(mag, k))


def rank_window_mask(mag: Tensor, start: int, stop: int) -> Tensor:
    """Mask of the entries whose ascending rank of ``|mag|`` lies in ``[start, stop)`` (ties ranked by index)."""
    n = mag.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return torch.zeros_like(mag, dtype=torch.bool)
    upper = cut_mask(mag, bottom_cut(mag, stop))
    if start > 0:
        upper &= ~cut_mask(mag, bottom_cut(mag, start))
    return upper


def topk_mask_from_bottom_complement(mag: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` largest entries, with ties broken so that its complement is the lowest ranks."""
    n = mag.numel()
    return ~cut_mask(mag, bottom_cut(mag, n - k)) if 0 < k < n else (
        torch.ones_like(mag, dtype=torch.bool) if k >= n else torch.zeros_like(mag, dtype=torch.bool))


def row_ranks(values: Tensor) -> Tensor:
    """Ascending rank (0 .. m-1, int64) of each ``|value|`` within its row (last dim), ties by lowest index.

    A stable sort per row: call it on row blocks of a large tensor to bound memory (DELLA's per-row ranks).
    """
    mag = values.abs()
    order = torch.argsort(mag, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    m = mag.shape[-1] if mag.dim() else 1
    ranks.scatter_(-1, order, torch.arange(m, device=mag.device).expand_as(order))
    return ranks


# ---------------------------------------------------------------------------------------- sparsifiers


RESCALES = ("none", "inverse_density", "l1_norm")


class Sparsifier:
    """One model's sparsification of one tensor, run in pieces and exact over the whole tensor.

    Protocol: while :attr:`pending`, one pre-merge pass (selection passes, then one L1 pass for ``l1_norm``):
    take a :meth:`cursor` per part of the tensor (one part: the whole tensor; several: contiguous parts, in
    flat order, that threads may walk at once), :meth:`Cursor.feed` each part's pieces in flat order, then
    :meth:`end_pass` with the cursors in part order. Then the masking pass: fresh cursors,
    :meth:`Cursor.apply_` on every piece, in place. ``draws``: uniforms it needs per pass (DARE: one per
    element) from :attr:`stream` (set by the caller, see :func:`~evomerge.merge.kernels.pieces.model_streams`;
    a sparsifier that draws is walked as one part).

    Rescaling follows the whole-tensor definitions: ``inverse_density`` divides by the density, ``l1_norm``
    restores the L1 norm of the unmasked vector (skipped when either norm is below 1e-7; the norms are
    summed piece-size-independently, :class:`~evomerge.merge.kernels.pieces.BlockSum`), ``none`` leaves it.
    """

    draws = 0

    def __init__(self, n: int, rescale: str, density: float, active: bool) -> None:
        if rescale not in RESCALES:
            raise ValueError(f"unknown rescale {rescale!r} (choices: {', '.join(RESCALES)})")
        self.n = n
        self.rescale = rescale
        self.density = density
        self.active = active  # False: the identity (no mask, no rescale)
        self.stream: UniformStream | None = None
        self.scale = 1.0
        self._l1_pending = active and rescale == "l1_norm"
        self.select: RadixSelect | None = None
        self.cuts: list[tuple[MagnitudeCut, bool]] = []  # (cut, negate): the kept set is their intersection
        self.zero = False  # everything dropped

    @property
    def selecting(self) -> bool:
        return self.select is not None and not self.select.done

    @property
    def pending(self) -> bool:
        """Another pre-merge pass is needed (selection, then the L1 norms)."""
        return self.selecting or self._l1_pending

    def cursor(self, part: int = 0) -> Cursor:
        """The walker of one part for the coming pass (pre-merge or masking)."""
        return Cursor(self, part)

    def end_pass(self, cursors: Sequence[Cursor]) -> None:
        """Close a pre-merge pass walked by ``cursors`` (in part order)."""
        if self.selecting:
            assert self.select is not None
            self.select.end_pass([c.counter for c in cursors if c.counter is not None])
            if self.select.done:
                assert self.select.results is not None
                self._build(self.select.results)
            return
        before = math.fsum(c.before.total() for c in cursors if c.before is not None)
        after = math.fsum(c.after.total() for c in cursors if c.after is not None)
        if before >= 1e-7 and after >= 1e-7:
            self.scale = before / after
        self._l1_pending = False

    def _build(self, stats: list[OrderStat]) -> None:
        """The cuts from the selected order statistics."""

    def _mask(self, cursor: Cursor, delta: Tensor, scratch: Tensor) -> Tensor | None:
        """The piece's keep mask (None: keep all); may use ``scratch`` (same size and dtype as ``delta``)."""
        if self.zero:
            return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
        if not cursor.masks:
            return None
        keys = magnitude_keys(delta, scratch)
        out: Tensor | None = None
        for cm, negate in cursor.masks:
            m = cm(keys)
            if m is None:
                if not negate:
                    continue
                m = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
            elif negate:
                m = ~m
            out = m if out is None else out.logical_and_(m)
        return out

    # the whole-tensor walk (one part), for in-place use
    def run_(self, delta: Tensor, options: Mapping[str, Any] | None = None) -> Tensor:
        """Sparsify a whole tensor in place, in pieces (the tensor is its own source)."""
        work = delta if delta.is_contiguous() else delta.contiguous()
        flat = work.view(-1)
        n = flat.numel()
        size = piece_size(options or {}, 3 * delta.element_size(), delta.device)
        scratch = torch.empty(min(size, max(n, 1)), dtype=delta.dtype, device=delta.device)
        while self.pending:
            cur = self.cursor()
            for start, stop in ranges(n, size):
                cur.feed(flat[start:stop], scratch[: stop - start])
            self.end_pass([cur])
        cur = self.cursor()
        for start, stop in ranges(n, size):
            cur.apply_(flat[start:stop], scratch[: stop - start])
        if work is not delta:
            delta.copy_(work)
        return delta


class Cursor:
    """One part's walk of a :class:`Sparsifier` for one pass: its histograms, L1 sums, tie counts, draws."""

    def __init__(self, sp: Sparsifier, part: int) -> None:
        self.sp = sp
        self.part = part
        self.counter: RadixCounter | None = None
        self.before: BlockSum | None = None
        self.after: BlockSum | None = None
        self.l1 = False
        if sp.selecting:
            assert sp.select is not None
            self.counter = sp.select.counter()
        elif sp.pending:
            self.l1 = True
            self.before, self.after = BlockSum(), BlockSum()
        self.masks = [(CutMask(cut, part), negate) for cut, negate in sp.cuts]
        if sp.stream is not None:
            if part:
                raise ValueError("a sparsifier that draws is walked as one part")
            sp.stream.rewind()

    def feed(self, delta: Tensor, scratch: Tensor) -> None:
        """One piece of the task vector in a pre-merge pass (read only; ``scratch``: its size and dtype)."""
        if self.counter is not None:
            self.counter.feed(magnitude_keys(delta, scratch))
            return
        if not self.l1:
            return
        assert self.before is not None and self.after is not None
        mag = delta.abs()
        self.before.add(mag)
        keep = self.sp._mask(self, delta, scratch)
        if keep is not None:
            mag.mul_(keep)
        self.after.add(mag)

    def apply_(self, delta: Tensor, scratch: Tensor) -> Tensor:
        """Sparsify one piece in place (masking pass; this part's pieces in flat order)."""
        sp = self.sp
        if not sp.active:
            return delta
        keep = sp._mask(self, delta, scratch)
        if keep is not None:
            delta.mul_(keep)
        if sp.rescale == "inverse_density":
            if sp.density > 0:
                delta.div_(sp.density)
        elif sp.rescale == "l1_norm" and sp.scale != 1.0:
            delta.mul_(sp.scale)
        return delta


class Identity(Sparsifier):
    """No sparsification (task arithmetic)."""

    def __init__(self, n: int) -> None:
        super().__init__(n, "none", 1.0, False)


class TopK(Sparsifier):
    """TIES trim: keep the top ``keep_count(density, n)`` magnitudes, ties to the lowest flat index."""

    def __init__(self, n: int, density: float, rescale: str, dtype: torch.dtype) -> None:
        super().__init__(n, rescale, density, density < 1)
        self.k = keep_count(density, n)
        if not self.active:
            return
        if self.k <= 0:
            self.zero = True
        elif self.k < n:
            self.select = RadixSelect(key_bits(dtype), [n - self.k])

    def _build(self, stats: list[OrderStat]) -> None:
        cut = MagnitudeCut.top(stats[0], self.k)
        if cut.key != 0:  # a threshold of 0 keeps every non-zero entry: zeros carry nothing
            self.cuts = [(cut, False)]


class RankWindow(Sparsifier):
    """Model Breadcrumbs: keep ascending magnitude ranks ``[n_bot, n_bot + int(density n))`` (mergekit).

    ``n_bot = max(0, n - int(density n) - int(gamma n))``: the ``int(gamma n)`` largest go first (outliers),
    then the smallest until the target remains; equal magnitudes are ranked by flat index.
    """

    def __init__(self, n: int, density: float, gamma: float, rescale: str, dtype: torch.dtype) -> None:
        super().__init__(n, rescale, density, density < 1)
        if not self.active:
            return
        target = int(density * n)
        n_top = int(gamma * n)
        n_bot = max(0, n - target - n_top)
        self.start, self.stop = max(0, n_bot), min(n, n_bot + target)
        if self.stop <= self.start:
            self.zero = True
            return
        ranks = ([self.start - 1] if self.start > 0 else []) + ([self.stop - 1] if self.stop < n else [])
        if ranks:
            self.select = RadixSelect(key_bits(dtype), ranks)

    def _build(self, stats: list[OrderStat]) -> None:
        it = iter(stats)
        if self.start > 0:
            self.cuts.append((MagnitudeCut.bottom(next(it), self.start), True))
        if self.stop < self.n:
            self.cuts.append((MagnitudeCut.bottom(next(it), self.stop), False))


class Threshold(Sparsifier):
    """Global-scope TIES trim: keep ``|delta| >= threshold`` (one threshold per model over the whole model)."""

    def __init__(self, n: int, threshold: float, density: float, rescale: str) -> None:
        super().__init__(n, rescale, density, threshold > 0)
        self.threshold = threshold

    def _mask(self, cursor: Cursor, delta: Tensor, scratch: Tensor) -> Tensor | None:
        return torch.abs(delta, out=scratch) >= self.threshold


class RandomDrop(Sparsifier):
    """DARE: keep each entry independently with probability ``density`` (``U < density``, one draw each)."""

    def __init__(self, n: int, density: float, rescale: str) -> None:
        super().__init__(n, rescale, density, density < 1)
        self.draws = n if 0 < density < 1 else 0
        self.zero = density <= 0
        if self.zero:
            self._l1_pending = False  # everything is dropped: no norm to restore

    def _mask(self, cursor: Cursor, delta: Tensor, scratch: Tensor) -> Tensor | None:
        if self.zero:
            return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
        if self.stream is None:
            raise ValueError("DARE needs an explicit seeded torch.Generator (density < 1)")
        u = scratch if scratch.dtype == torch.float32 else torch.empty(delta.numel(), device=delta.device)
        return self.stream.fill(u.view(-1)[: delta.numel()]).lt_(self.density)


def make_sparsifier(kind: str | None, model: int, n: int, model_params: Mapping[str, float],
                    options: Mapping[str, Any], default_rescale: str, dtype: torch.dtype) -> Sparsifier:
    """The sparsifier of model ``model``'s task vector for a generalized-task-arithmetic kernel.

    ``kind``: None, ``magnitude`` (``trim_scope`` tensor: top-k; global: ``options['global_threshold'][model]``),
    ``random`` (DARE), ``magnitude_outliers`` (Breadcrumbs). ``dtype``: the dtype of the task vector's pieces.
    """
    if kind is None:
        return Identity(n)
    rescale = str(options.get("rescale", default_rescale))
    density = float(model_params.get("density", 1.0))
    if kind == "magnitude":
        scope = str(options.get("trim_scope", "tensor"))
        if scope == "global":
            thresholds = options.get("global_threshold")
            if thresholds is None or model >= len(thresholds):
                raise ValueError(
                    "trim_scope: global needs options['global_threshold'] (one per model, from global_trim_thresholds)"
                )
            return Threshold(n, float(thresholds[model]), density, rescale)
        if scope != "tensor":
            raise ValueError(f"unknown trim_scope {scope!r} (choices: tensor, global)")
        return TopK(n, density, rescale, dtype)
    if kind == "random":
        return RandomDrop(n, density, rescale)
    if kind == "magnitude_outliers":
        return RankWindow(n, density, float(model_params.get("gamma", 0.01)), rescale, dtype)
    raise ValueError(f"unknown sparsification {kind!r}")


# ------------------------------------------------------------------------- in-place API (whole tensors)


def rescale_(masked: Tensor, original_l1: Tensor | float | None, rescale: str, density: float) -> Tensor:
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


def magnitude_(delta: Tensor, density: float, rescale: str = "none") -> Tensor:
    """TIES trim in place: keep the top ``keep_count(density)`` magnitudes (mergekit ``magnitude``)."""
    return TopK(delta.numel(), density, rescale, delta.dtype).run_(delta)


def threshold_(delta: Tensor, threshold: float, rescale: str = "none", density: float = 1.0) -> Tensor:
    """Global-scope TIES trim in place: keep entries with ``|delta| >= threshold`` (see global_trim_thresholds)."""
    return Threshold(delta.numel(), threshold, density, rescale).run_(delta)


def magnitude_outliers_(delta: Tensor, density: float, gamma: float, rescale: str = "none") -> Tensor:
    """Model Breadcrumbs in place, mergekit's semantics.

    Drop the ``int(gamma*n)`` largest magnitudes (outliers), then the smallest so that ``int(density*n)``
    remain; the outlier cut shrinks when both cannot hold. ``density >= 1`` keeps everything (gamma unused).
    """
    return RankWindow(delta.numel(), density, gamma, rescale, delta.dtype).run_(delta)


def dare_(delta: Tensor, density: float, generator: torch.Generator | None,
          rescale: str = "inverse_density") -> Tensor:
    """DARE drop in place: keep each entry independently with probability ``density``, then rescale.

    The mask is ``U < density`` with ``U ~ Uniform[0, 1)`` float32 drawn from ``generator`` (one draw per
    element, in flat order; the generator advances past them), so a seeded generator gives the same mask on
    every run, whatever the pieces. ``density >= 1`` is the identity.
    """
    sp = RandomDrop(delta.numel(), density, rescale)
    if sp.draws:
        if generator is None:
            raise ValueError("DARE needs an explicit seeded torch.Generator (density < 1)")
        sp.stream = UniformStream(generator)
    sp.run_(delta)
    if sp.stream is not None and generator is not None:
        generator.set_state(sp.stream.state())
    return delta


# ---------------------------------------------------------------------------------------------------------
# Global (whole-model) trim thresholds for TIES with trim_scope: global.


def global_trim_thresholds(
    delta_batches: Callable[[], Iterable[Sequence[Tensor]]], densities: Sequence[float]
) -> list[float]:
    """Exact per-model magnitude thresholds for TIES over the whole model's flattened task vector.

    ``delta_batches()`` must return a fresh iterable (it is called once per pass, twice) that yields, piece
    by piece (a tensor, or any cut of it), one delta per model (``theta_t - theta_0``; magnitudes taken in
    float32). For model t with N_t delta entries the result is the k-th largest ``|tau_t|`` with
    ``k = keep_count(density_t, N_t)``, so that keeping ``|tau_t| >= threshold`` keeps exactly k entries (more
    only when magnitudes tie at the threshold). Radix selection over float32 keys (:class:`RadixSelect`), in
    bounded memory. Returns 0.0 for density >= 1 (keep all) and ``inf`` for density <= 0. Feed the list to
    a TIES kernel as ``options["global_threshold"]`` with ``trim_scope: global``.
    """
    dens = [float(d) for d in densities]
    t_count = len(dens)
    sels: list[RadixSelect | None] = []
    for d in dens:
        if d >= 1 or d <= 0:
            sels.append(None)
        else:
            sels.append(RadixSelect(31, lambda n, d=d: [n - keep_count(d, n)] if n else []))
    counts = [0] * t_count
    scratch: dict[torch.device, Tensor] = {}
    first = True
    while first or any(s is not None and not s.done for s in sels):
        for batch in delta_batches():
            if len(batch) != t_count:
                raise ValueError(f"global_trim_thresholds: got {len(batch)} deltas for {t_count} densities")
            for i, d in enumerate(batch):
                if first:
                    counts[i] += d.numel()
                sel = sels[i]
                if sel is None or sel.done:
                    continue
                flat = d.detach().reshape(-1)
                step = 1 << 20
                for start in range(0, flat.numel(), step):
                    piece = flat[start:start + step]
                    buf = scratch.get(piece.device)
                    if buf is None or buf.numel() < piece.numel():
                        buf = scratch[piece.device] = torch.empty(step, dtype=torch.float32, device=piece.device)
                    f = buf[: piece.numel()].copy_(piece)
                    sel.feed(magnitude_keys(f, f))
        first = False
        for i, s in enumerate(sels):
            if s is not None and not s.done:
                if counts[i] == 0:
                    sels[i] = None  # no entries: nothing to select (threshold 0.0 below)
                    continue
                s.end_pass()
    result: list[float] = []
    for i, (d, sel) in enumerate(zip(dens, sels)):
        if d >= 1 or counts[i] == 0:
            result.append(0.0)
        elif d <= 0 or keep_count(d, counts[i]) == 0:
            result.append(math.inf)
        else:
            assert sel is not None and sel.results
            result.append(key_value(sel.results[0].key, torch.float32))
    return result
