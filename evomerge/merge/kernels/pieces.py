"""Tensors in pieces: inputs read piece by piece, the memory budget that sizes pieces, seeded draws in pieces.

Kernels that declare ``streams`` (:class:`~evomerge.merge.methods.spec.MergeMethod`) work through a tensor in
flat-order pieces instead of whole-tensor temporaries: a piece of every input is read (a view of a resident
tensor, or a ``pread`` from a model file by the disk engine), merged while it sits in cache, and written into
the caller's output buffer. Two things make the result independent of the piece size: selections are exact
over the whole tensor (:mod:`evomerge.merge.kernels.sparsify` finds thresholds from histograms, then masks
piece by piece), and random draws come from one stream per model that pieces consume in order
(:class:`UniformStream`).

Pure torch, any device: a piece lives on its source's device; nothing here copies a whole tensor.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

Tensor = torch.Tensor

DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024  # bytes of per-tensor temporaries a streaming kernel may hold
# Pieces on CPU are capped so that every buffer of a piece stays in a core's L2 cache: a pass over a piece
# then costs about one read of the inputs, however many elementwise steps it takes. Elsewhere (a GPU) larger
# pieces amortize kernel launches; the budget alone bounds them.
CPU_PIECE_CAP = 1 << 17
DEVICE_PIECE_CAP = 1 << 24
MIN_PIECE = 1 << 10


@runtime_checkable
class Source(Protocol):
    """A tensor read piece by piece: ``read(start, stop)`` gives flat elements ``[start, stop)``.

    The piece is 1-D, in the source's dtype, on its device; it may be a reused buffer, valid until the next
    ``read`` of the same source (copy it to keep it). Kernels never write into a piece.
    """

    @property
    def shape(self) -> torch.Size: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def numel(self) -> int: ...

    def read(self, start: int, stop: int) -> Tensor: ...

    def clone(self) -> Source:
        """An independent reader of the same tensor (its own buffers), for reading from another thread."""
        ...


class TensorSource:
    """A tensor in memory as a :class:`Source`: pieces are views of its flattened storage (no copies)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self._flat = tensor.reshape(-1)  # a view for contiguous tensors (a non-contiguous one is copied once)

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def numel(self) -> int:
        return self.tensor.numel()

    def read(self, start: int, stop: int) -> Tensor:
        return self._flat[start:stop]

    def clone(self) -> TensorSource:
        return self  # views only: any thread may read


def as_source(x: Tensor | Source) -> Source:
    """A :class:`Source` for a tensor or a source."""
    return TensorSource(x) if isinstance(x, Tensor) else x


def memory_budget(options: Mapping[str, Any]) -> int:
    """Bytes of per-tensor temporaries allowed: ``options['memory_budget']`` or 256 MiB."""
    value = options.get("memory_budget")
    if value is None:
        return DEFAULT_MEMORY_BUDGET
    budget = int(value)
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {value!r}")
    return budget


def piece_size(options: Mapping[str, Any], bytes_per_element: int, device: torch.device | str,
               fixed_bytes: int = 0) -> int:
    """Elements per piece: ``options['piece_elems']`` if given, else what the budget allows (capped for cache).

    ``bytes_per_element``: what the kernel holds per element of a piece (all its piece buffers together);
    ``fixed_bytes``: what it holds whatever the piece size (histograms). Pieces never go below
    :data:`MIN_PIECE` elements, so a budget under the fixed part is exceeded by that much.
    """
    forced = options.get("piece_elems")
    if forced is not None:
        size = int(forced)
        if size < 1:
            raise ValueError(f"piece_elems must be >= 1, got {forced!r}")
        return size
    cap = CPU_PIECE_CAP if torch.device(device).type == "cpu" else DEVICE_PIECE_CAP
    room = memory_budget(options) - fixed_bytes
    return max(MIN_PIECE, min(cap, room // max(1, bytes_per_element)))


def ranges(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive pieces of ``size`` elements covering ``[0, n)``."""
    for start in range(0, n, max(1, size)):
        yield start, min(n, start + size)


# ------------------------------------------------------------------------------- parts on idle cores

PART_ELEMS = 1 << 22  # a tensor is cut into parts of at least this many elements for several threads
PARTS_PER_THREAD = 4  # more parts than threads, so that cores that free up late still find work


class CpuShare:
    """The cores of a merge, shared by tensor workers and the kernels that can use more than one.

    Each tensor worker :meth:`hold` s a core while it merges; a kernel working through a large tensor in
    parts :meth:`borrow` s idle cores (never waiting long) to walk other parts, and gives each back after a
    part, so a worker that needs its core again gets it within one part.
    """

    def __init__(self, cores: int) -> None:
        if cores < 1:
            raise ValueError(f"CpuShare needs at least one core, got {cores}")
        self.cores = cores
        self._sem = threading.Semaphore(cores)

    @contextmanager
    def hold(self) -> Iterator[None]:
        self._sem.acquire()
        try:
            yield
        finally:
            self._sem.release()

    def borrow(self, timeout: float) -> bool:
        return self._sem.acquire(timeout=timeout)

    def give_back(self) -> None:
        self._sem.release()


def part_bounds(n: int, threads: int, options: Mapping[str, Any] | None = None,
                align: int = 1 << 15) -> list[tuple[int, int]]:
    """Contiguous parts of ``[0, n)`` for ``threads`` threads: one part unless the tensor is large.

    Parts hold at least ``options['part_elems']`` (default :data:`PART_ELEMS`) elements; their boundaries
    are multiples of ``align`` (the L1 sums' block, :data:`SUM_BLOCK`) so that nothing depends on the cut.
    """
    smallest = int((options or {}).get("part_elems", PART_ELEMS))
    if smallest < 1:
        raise ValueError(f"part_elems must be >= 1, got {smallest}")
    count = min(threads * PARTS_PER_THREAD, n // smallest) if threads > 1 else 1
    if count <= 1:
        return [(0, n)]
    step = -(-n // count)
    step = -(-step // align) * align
    bounds = [(a, min(n, a + step)) for a in range(0, n, step)]
    return bounds


C = TypeVar("C")


def run_parts(count: int, task: Callable[[C, int], None], make_context: Callable[[], C],
              share: CpuShare | None, threads: int, contexts: list[C] | None = None) -> None:
    """``task(context, part)`` for every part, in the calling thread and on borrowed idle cores.

    The calling thread (which holds its core) takes parts in order; up to ``threads - 1`` helper threads
    take parts while they can borrow a core from ``share``. Contexts (per-thread buffers, readers) come from
    ``contexts`` (a free list the caller may keep from pass to pass) or ``make_context``, one per thread at a
    time. The first error is raised once every part has stopped.
    """
    if contexts is None:
        contexts = []
    if count <= 1 or share is None or threads <= 1:
        ctx = contexts.pop() if contexts else make_context()
        try:
            for i in range(count):
                task(ctx, i)
        finally:
            contexts.append(ctx)
        return
    lock = threading.Lock()
    nxt = [0]
    errors: list[BaseException] = []

    def take() -> int | None:
        with lock:
            if errors or nxt[0] >= count:
                return None
            nxt[0] += 1
            return nxt[0] - 1

    def context() -> C:
        with lock:
            if contexts:
                return contexts.pop()
        return make_context()

    def helper() -> None:
        ctx: C | None = None
        try:
            while True:
                with lock:
                    if errors or nxt[0] >= count:
                        return
                if not share.borrow(timeout=0.005):
                    continue
                try:
                    i = take()
                    if i is None:
                        return
                    if ctx is None:
                        ctx = context()
                    task(ctx, i)
                finally:
                    share.give_back()
        except BaseException as exc:  # reported by the calling thread
            with lock:
                errors.append(exc)
        finally:
            if ctx is not None:
                with lock:
                    contexts.append(ctx)

    helpers = [threading.Thread(target=helper, name="evomerge-part", daemon=True) for _ in range(threads - 1)]
    for h in helpers:
        h.start()
    main_ctx: C | None = None
    try:
        main_ctx = context()
        while (i := take()) is not None:
            task(main_ctx, i)
    except BaseException as exc:
        with lock:
            errors.append(exc)
    finally:
        for h in helpers:
            h.join()
        if main_ctx is not None:
            contexts.append(main_ctx)
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------- exact L1 norms


SUM_BLOCK = 1 << 15  # canonical blocks of an L1 sum: at most torch's grain, so each block sums serially


class BlockSum:
    """A sum over a tensor fed in flat-order pieces, the same whatever the piece size.

    Values are summed over fixed blocks of :data:`SUM_BLOCK` elements aligned to the tensor's start (float64
    per block; a block cut by a piece boundary is completed from a small carry buffer), then the block sums
    are added exactly (``math.fsum``): the result depends only on the values, not on how they were cut.
    """

    def __init__(self) -> None:
        self._blocks: list[float] = []
        self._carry: Tensor | None = None
        self._fill = 0

    def add(self, values: Tensor) -> None:
        """Add the next piece (1-D, flat order)."""
        m = values.numel()
        i = 0
        if self._fill:
            assert self._carry is not None
            take = min(m, SUM_BLOCK - self._fill)
            self._carry[self._fill:self._fill + take].copy_(values[:take])
            self._fill += take
            i = take
            if self._fill == SUM_BLOCK:
                self._blocks.append(float(self._carry.sum(dtype=torch.float64)))
                self._fill = 0
        full = (m - i) // SUM_BLOCK
        if full:
            body = values[i:i + full * SUM_BLOCK].view(full, SUM_BLOCK)
            self._blocks.extend(torch.sum(body, dim=1, dtype=torch.float64).tolist())
            i += full * SUM_BLOCK
        if i < m:
            if self._carry is None or self._carry.dtype != values.dtype or self._carry.device != values.device:
                self._carry = torch.empty(SUM_BLOCK, dtype=values.dtype, device=values.device)
            self._carry[: m - i].copy_(values[i:])
            self._fill = m - i

    def total(self) -> float:
        """The sum of everything added (the last, partial block included)."""
        parts = list(self._blocks)
        if self._fill:
            assert self._carry is not None
            parts.append(float(self._carry[: self._fill].sum(dtype=torch.float64)))
        return math.fsum(parts)


# --------------------------------------------------------------------------------------- seeded draws


DRAW_BLOCK = 1 << 20  # off CPU, draws are made in blocks of this many elements, whatever the piece size


def clone_generator(generator: torch.Generator) -> torch.Generator:
    """An independent generator in the same state."""
    g = torch.Generator(device=generator.device)
    g.set_state(generator.get_state())
    return g


class UniformStream:
    """Uniform [0, 1) float32 draws from a generator, consumed piece by piece in flat order.

    The draws do not depend on how the stream is cut: on CPU, torch draws one generator output per float32
    element in order, so pieces are drawn directly and equal one whole-tensor ``torch.rand`` (a test checks
    this); on other devices (counter-based generators whose output depends on the launch size) draws are made
    in fixed blocks of :data:`DRAW_BLOCK` and served from a buffer (``blocks`` forces either way).
    :meth:`rewind` replays the stream;
    :meth:`skip` advances it (to reach the stream of a later model without keeping draws).
    """

    def __init__(self, generator: torch.Generator, blocks: bool | None = None) -> None:
        self._gen = clone_generator(generator)
        self._start = self._gen.get_state()
        self._blocked = generator.device.type != "cpu" if blocks is None else blocks
        self._block: Tensor | None = None
        self._used = 0  # draws served from the current block

    def rewind(self) -> None:
        """Back to the first draw."""
        self._gen.set_state(self._start)
        self._used = 0
        self._block = None

    def state(self) -> Tensor:
        """The generator state after every draw served or skipped so far (whole blocks off CPU)."""
        return self._gen.get_state()

    def fill(self, out: Tensor) -> Tensor:
        """The next ``out.numel()`` draws, written into ``out`` (float32, 1-D) and returned."""
        m = out.numel()
        if not self._blocked:
            if out.device == self._gen.device:
                return torch.rand(m, generator=self._gen, dtype=torch.float32, out=out)
            return out.copy_(torch.rand(m, generator=self._gen, dtype=torch.float32, device=self._gen.device))
        done = 0
        while done < m:
            if self._block is None or self._used == DRAW_BLOCK:
                self._block = torch.rand(DRAW_BLOCK, generator=self._gen, dtype=torch.float32,
                                         device=self._gen.device)
                self._used = 0
            take = min(m - done, DRAW_BLOCK - self._used)
            out[done:done + take].copy_(self._block[self._used:self._used + take])
            self._used += take
            done += take
        return out

    def skip(self, count: int, scratch_elems: int = CPU_PIECE_CAP) -> None:
        """Advance by ``count`` draws (drawn and dropped)."""
        if count <= 0:
            return
        scratch = torch.empty(min(count, scratch_elems), dtype=torch.float32, device=self._gen.device)
        left = count
        while left:
            take = min(left, scratch.numel())
            self.fill(scratch[:take])
            left -= take


def model_streams(generator: torch.Generator | None, draws: Sequence[int]) -> list[UniformStream | None]:
    """One stream per model: model ``t`` draws ``draws[t]`` uniforms right after those of models ``< t``.

    This is the order of one generator drawing whole tensors model after model (DARE's definition), so a kernel
    may visit the models piece by piece in any interleaving. ``draws[t] == 0``: that model draws nothing (None).
    Reaching model ``t``'s start costs the draws of the models before it (a generator cannot jump ahead); off
    CPU each model's draws start on a fresh block. Once the last stream has been read to its end,
    :func:`finish_streams` leaves ``generator`` where whole-tensor draws would have.
    """
    out: list[UniformStream | None] = []
    if generator is None:
        return [None] * len(draws)
    at: torch.Generator = generator
    last = max((t for t, c in enumerate(draws) if c > 0), default=-1)
    for t, count in enumerate(draws):
        if count <= 0:
            out.append(None)
            continue
        stream = UniformStream(at)
        out.append(stream)
        if t < last:
            walker = UniformStream(at)
            walker.skip(count)
            at = torch.Generator(device=generator.device)
            at.set_state(walker.state())
    return out


def finish_streams(generator: torch.Generator | None, streams: Sequence[UniformStream | None]) -> None:
    """Set ``generator`` to the state after the last stream's draws (call when that stream was read through)."""
    live = [s for s in streams if s is not None]
    if generator is not None and live:
        generator.set_state(live[-1].state())
