"""Selections, draws and merges in pieces: exact against sorting, bit for bit against the whole tensor.

Every streaming kernel must give the same bits whatever the piece size (``piece_elems`` forces one, down to
a single element) and whatever the memory budget; selections must equal a stable sort's (ties at the
threshold broken by flat index, lowest first, exactly k kept); DARE masks must equal whole-tensor draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.merging import dare_linear_reference

from evomerge.merge.kernels import sparsify as S
from evomerge.merge.kernels import task_arithmetic as task_arithmetic_kernels
from evomerge.merge.kernels.pieces import (
    BlockSum,
    CpuShare,
    TensorSource,
    UniformStream,
    finish_streams,
    model_streams,
    piece_size,
    ranges,
    run_parts,
)
from evomerge.merge.kernels.task_arithmetic import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    task_arithmetic,
    ties,
)


def _quantized(shape: tuple[int, ...], n_models: int, seed: int, dtype: torch.dtype
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and fine-tunes whose task vectors repeat magnitudes a lot (coarse steps), so ties are common."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randint(-50, 50, shape, generator=g).float() / 64).to(dtype)
    tensors = [(base.float() + torch.randint(-6, 7, shape, generator=g).float() / 256).to(dtype)
               for _ in range(n_models)]
    return base, tensors


def _naive_top(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest by a stable descending sort: equal magnitudes keep their flat order (lowest index first)."""
    flat = mag.reshape(-1).double()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return keep.reshape(mag.shape)


def _naive_bottom(mag: torch.Tensor, r: int) -> torch.Tensor:
    flat = mag.reshape(-1).double()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:r]] = True
    return keep.reshape(mag.shape)


def _mask_in_pieces(mag: torch.Tensor, cut: S.MagnitudeCut, size: int) -> torch.Tensor:
    cm = S.CutMask(cut)
    flat = mag.reshape(-1)
    parts = []
    for start, stop in ranges(flat.numel(), size):
        m = cm(S.magnitude_keys(flat[start:stop]))
        parts.append(torch.ones(stop - start, dtype=torch.bool) if m is None else m)
    return torch.cat(parts).reshape(mag.shape)


# ------------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["random", "sorted", "reversed", "repeated", "with_zeros_and_inf"])
def test_radix_select_equals_sorting_at_every_rank(dtype: torch.dtype, layout: str) -> None:
    g = torch.Generator().manual_seed(3)
    n = 20011
    x = torch.rand(n, generator=g, dtype=torch.float64) * 3
    if layout == "sorted":
        x = x.sort().values
    elif layout == "reversed":
        x = x.sort(descending=True).values
    elif layout == "repeated":
        x = torch.randint(0, 9, (n,), generator=g).double() / 4
    elif layout == "with_zeros_and_inf":
        x[::5] = 0.0
        x[7] = math.inf
    x = (x - 1.5 if layout == "random" else x).to(dtype)  # both signs too
    ordered = torch.sort(x.double()).values
    ranks = [0, 1, 17, n // 3, n // 2, n - n // 5, n - 2, n - 1]
    for size in (n, 641):
        stats = S.order_stats(x, ranks, magnitudes=False, options={"piece_elems": size})
        for r, stat in zip(ranks, stats):
            value = S.key_value(stat.key, dtype, signed=True)
            assert value == ordered[r].item()
            assert stat.below == int((x.double() < value).sum())
            assert stat.equal == int((x.double() == value).sum())
            assert stat.count == n


def test_select_rank_is_exact_on_adversarial_orders() -> None:
    n = (1 << 17) + 3
    for x in (torch.arange(n, dtype=torch.float32), torch.arange(n, 0, -1, dtype=torch.float32),
              torch.full((n,), 0.5)):
        ordered = torch.sort(x).values
        for rank in (0, n // 7, n - 1):
            value, n_ge = S.select_rank(x, rank)
            assert value.item() == ordered[rank].item()
            assert n_ge == int((x >= ordered[rank]).sum())
    signed = torch.tensor([0.5, -2.0, -0.0, 0.0, 3.0, -2.0, -1e-30, 7.0])
    ordered = torch.sort(signed).values
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = signed.to(dtype)
        for rank in range(signed.numel()):
            value, n_ge = S.select_rank(x, rank)
            assert value.item() == ordered.to(dtype)[rank].item()
            assert n_ge == int((x >= value).sum())
    with pytest.raises(ValueError, match="outside"):
        S.select_rank(torch.tensor([1.0]), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 1e-4, 0.2, 0.5, 0.97, 1.0])
def test_top_k_cut_in_pieces_keeps_exactly_the_stable_top_k(dtype: torch.dtype, density: float) -> None:
    base, (t,) = _quantized((173, 89), 1, seed=1, dtype=dtype)
    mag = (t.float() - base.float()).to(dtype).abs()
    n = mag.numel()
    k = S.keep_count(density, n)
    want = _naive_top(mag, k)
    for select_size in (n, 1000, 13):
        cut = S.top_k_cut(mag, k, options={"piece_elems": select_size})
        for mask_size in (n, 4096, 1):
            got = _mask_in_pieces(mag, cut, mask_size)
            assert torch.equal(got, want), (select_size, mask_size)
    assert int(want.sum()) == k


def test_the_threshold_splits_tied_magnitudes_in_these_cases() -> None:
    """The cases above are the hard ones: many entries share the threshold and only some are kept."""
    base, (t,) = _quantized((173, 89), 1, seed=1, dtype=torch.bfloat16)
    mag = (t.float() - base.float()).abs()
    cut = S.top_k_cut(mag, S.keep_count(0.2, mag.numel()))
    assert cut.side == "above" and 0 < cut.ties < cut.equal and cut.equal > 1000


@pytest.mark.parametrize("r", [0, 1, 500, 7000, 15480, 15481])
def test_bottom_cut_in_pieces_equals_the_stable_bottom_r(r: int) -> None:
    base, (t,) = _quantized((113, 137), 1, seed=2, dtype=torch.float32)
    mag = (t - base).abs()
    r = min(r, mag.numel())
    want = _naive_bottom(mag, r)
    cut = S.bottom_cut(mag, r, options={"piece_elems": 333})
    assert torch.equal(_mask_in_pieces(mag, cut, 50), want)


def test_rank_window_equals_sorting_with_ties() -> None:
    base, (t,) = _quantized((61, 47), 1, seed=4, dtype=torch.float32)
    mag = (t - base).abs()
    n = mag.numel()
    order = torch.argsort(mag.reshape(-1).double(), stable=True)
    for start, stop in ((0, n), (0, 5), (100, 2000), (1500, n), (n - 1, n), (7, 7)):
        want = torch.zeros(n, dtype=torch.bool)
        want[order[start:stop]] = True
        assert torch.equal(S.rank_window_mask(mag, start, stop), want.reshape(mag.shape))


def test_row_ranks_are_stable_ascending_ranks_per_row() -> None:
    x = torch.tensor([[0.5, -0.1, 0.1, 0.3], [2.0, -2.0, 1.0, 2.0]])
    assert S.row_ranks(x).tolist() == [[3, 0, 1, 2], [1, 2, 0, 3]]


# ---------------------------------------------------------------------------------- kernels in pieces


def _kernel_cases() -> list[tuple[str, object, dict, dict]]:
    return [
        ("ties", ties, {"density": 0.2}, {}),
        ("ties_paper", ties, {"density": 0.35}, {"variant": "paper"}),
        ("ties_count_global_majority", ties, {"density": 0.5},
         {"sign_rule": "majority_count", "zero_sign": "global_majority"}),
        ("ties_l1", ties, {"density": 0.3}, {"rescale": "l1_norm"}),
        ("ties_inverse_density", ties, {"density": 0.3}, {"rescale": "inverse_density"}),
        ("ties_density_0", ties, {"density": 0.0}, {}),
        ("ties_density_1", ties, {"density": 1.0}, {}),
        ("breadcrumbs", breadcrumbs, {"density": 0.7, "gamma": 0.05}, {}),
        ("breadcrumbs_ties_l1", breadcrumbs_ties, {"density": 0.6, "gamma": 0.1}, {"rescale": "l1_norm"}),
        ("dare_linear", dare_linear, {"density": 0.4}, {}),
        ("dare_ties", dare_ties, {"density": 0.6}, {"normalize": True}),
        ("dare_linear_l1", dare_linear, {"density": 0.4}, {"rescale": "l1_norm"}),
        ("task_arithmetic", task_arithmetic, {}, {"normalize": True}),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", _kernel_cases(), ids=lambda c: c[0])
def test_streaming_kernels_give_the_same_bits_for_every_piece_size(dtype: torch.dtype, case: tuple) -> None:
    _, fn, values, options = case
    for shape, sizes in (((97, 211), (997, 4096)), ((13, 29), (1, 7, 50))):
        base, tensors = _quantized(shape, 3, seed=5, dtype=dtype)
        mp = [{"weight": w, **values} for w in (0.6, 1.0, 1.7)]

        def run(base: torch.Tensor = base, tensors: list = tensors, mp: list = mp, **extra: object) -> torch.Tensor:
            return fn(base, tensors, mp, {"lambda": 1.1}, {**options, **extra}, torch.Generator().manual_seed(9))

        whole = run(piece_elems=base.numel())
        assert torch.equal(run(), whole)
        for size in sizes:
            assert torch.equal(run(piece_elems=size), whole), (shape, size)
        assert torch.equal(run(memory_budget=64 * 1024), whole)


def test_ties_trims_are_the_stable_top_k_of_each_task_vector() -> None:
    """TIES with one model and normalize keeps exactly that model's stable top-k deltas."""
    base, tensors = _quantized((131, 77), 3, seed=6, dtype=torch.bfloat16)
    for t in tensors:
        delta = t.float() - base.float()
        k = S.keep_count(0.2, delta.numel())
        want = torch.where(_naive_top(delta.abs(), k), delta, torch.zeros_like(delta))
        out = ties(base, [t], [{"weight": 1.0, "density": 0.2}], {}, {"piece_elems": 1009})
        assert torch.equal(out - base.float(), want)
        trimmed = delta.clone()
        S.magnitude_(trimmed, 0.2)
        assert torch.equal(trimmed, want) and int(torch.count_nonzero(trimmed)) == k


def test_density_zero_and_one_are_nothing_and_everything() -> None:
    base, tensors = _quantized((40, 40), 2, seed=7, dtype=torch.float32)
    mp0 = [{"weight": 1.0, "density": 0.0}] * 2
    assert torch.equal(ties(base, tensors, mp0, {}, {"piece_elems": 33}), base)
    mp1 = [{"weight": 1.0, "density": 1.0}] * 2
    untrimmed = ties(base, tensors, mp1, {}, {"piece_elems": 33})
    deltas = torch.stack([t - base for t in tensors])
    gamma = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = (deltas * gamma) > 0
    div = agree.sum(0).clamp(min=1)
    torch.testing.assert_close(untrimmed, base + (deltas * agree).sum(0) / div, rtol=0, atol=1e-6)


def test_out_buffer_in_another_dtype_is_the_rounded_float32_result() -> None:
    base, tensors = _quantized((64, 300), 3, seed=8, dtype=torch.bfloat16)
    mp = [{"weight": 1.0, "density": 0.2}] * 3
    ref = ties(base, tensors, mp, {}, {})
    out = torch.full(base.shape, 7.0, dtype=torch.bfloat16)
    got = ties(base, tensors, mp, {}, {"piece_elems": 1000}, out=out)
    assert got is out and torch.equal(out, ref.to(torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        ties(base, tensors, mp, {}, {}, out=torch.empty(3))


class _CopyingSource(TensorSource):
    """A source that hands out copies in a reused buffer, as a file reader does (and counts its reads)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(tensor)
        self.buf = torch.empty(0, dtype=tensor.dtype)
        self.largest = 0

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.buf.numel() < stop - start:
            self.buf = torch.empty(stop - start, dtype=self.dtype)
        self.largest = max(self.largest, stop - start)
        return self.buf[: stop - start].copy_(super().read(start, stop))


def test_sources_that_reuse_a_buffer_give_the_tensors_result() -> None:
    base, tensors = _quantized((50, 501), 3, seed=10, dtype=torch.bfloat16)
    mp = [{"weight": 1.0, "density": 0.3}] * 3
    want = ties(base, tensors, mp, {}, {})
    srcs = [_CopyingSource(t) for t in tensors]
    got = ties(_CopyingSource(base), srcs, mp, {}, {"piece_elems": 2000})
    assert torch.equal(got, want)
    assert max(s.largest for s in srcs) == 2000


def test_streaming_ties_temporaries_stay_within_the_memory_budget() -> None:
    """Peak allocations of a TIES merge of 16 MB tensors under a 4 MB budget (whole-tensor code: ~80 MB)."""
    profiler = pytest.importorskip("torch.profiler")
    g = torch.Generator().manual_seed(0)
    shape = (2048, 2048)
    base = torch.randn(shape, generator=g)
    tensors = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(3)]
    out = torch.empty(shape)
    budget = 4 * 1024 * 1024
    mp = [{"weight": 1.0, "density": 0.2}] * 3
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        ties(base, tensors, mp, {}, {"memory_budget": budget}, out=out)
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    assert 0 < peak <= budget, peak
    assert torch.equal(out, ties(base, tensors, mp, {}, {}))


# ------------------------------------------------------------------------------------------------ draws


def test_uniform_stream_in_pieces_equals_one_whole_draw() -> None:
    want = torch.rand(10007, generator=torch.Generator().manual_seed(4))
    stream = UniformStream(torch.Generator().manual_seed(4))
    for size in (1, 10, 999, 10007):
        stream.rewind()
        got = torch.cat([stream.fill(torch.empty(b - a)) for a, b in ranges(10007, size)])
        assert torch.equal(got, want)


def test_model_streams_continue_one_generator_model_after_model() -> None:
    g = torch.Generator().manual_seed(11)
    first, second = torch.rand(500, generator=g), torch.rand(300, generator=g)
    after = torch.rand(5, generator=g)
    gen = torch.Generator().manual_seed(11)
    streams = model_streams(gen, [500, 0, 300])
    assert streams[1] is None
    assert torch.equal(streams[2].fill(torch.empty(300)), second)  # any order of reading
    assert torch.equal(streams[0].fill(torch.empty(500)), first)
    finish_streams(gen, streams)
    assert torch.equal(torch.rand(5, generator=gen), after)


def test_dare_masks_equal_whole_tensor_draws_model_after_model() -> None:
    base, tensors = _quantized((77, 131), 2, seed=12, dtype=torch.float32)
    mp = [{"weight": 0.7, "density": 0.3}, {"weight": 1.1, "density": 0.6}]
    ref = dare_linear_reference(base, tensors, mp, 42)
    for size in (None, 7, 997, 4096):
        opts = {} if size is None else {"piece_elems": size}
        out = dare_linear(base, tensors, mp, {"lambda": 1.0}, opts, torch.Generator().manual_seed(42))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    d = (tensors[0] - base).clone()
    gen = torch.Generator().manual_seed(42)
    S.dare_(d, 0.3, gen)
    keep = torch.rand(base.shape, generator=torch.Generator().manual_seed(42)) < 0.3
    assert torch.equal(d, (tensors[0] - base) * keep / 0.3)
    assert torch.equal(gen.get_state(), g_after(42, base.numel()))


def g_after(seed: int, draws: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    torch.rand(draws, generator=g)
    return g.get_state()


# ------------------------------------------------------------------------------------------ budget, sums


def test_block_sums_do_not_depend_on_the_cut() -> None:
    x = torch.rand(100_003, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    totals = set()
    for size in (1, 1000, 32768, 65537, 100_003):
        acc = BlockSum()
        for a, b in ranges(x.numel(), size):
            acc.add(x[a:b])
        totals.add(acc.total())
    assert len(totals) == 1
    assert totals.pop() == pytest.approx(float(x.double().sum()), rel=1e-12)


def test_piece_size_follows_the_budget_within_bounds() -> None:
    assert piece_size({"memory_budget": 10**9}, 40, "cpu") == 1 << 17  # cache-sized on CPU
    assert piece_size({"memory_budget": 40 * 5000}, 40, "cpu") == 5000
    assert piece_size({"memory_budget": 1}, 40, "cpu") == 1 << 10
    assert piece_size({"piece_elems": 3}, 40, "cpu") == 3
    assert piece_size({}, 40, "cpu") == 1 << 17
    with pytest.raises(ValueError, match="memory_budget"):
        piece_size({"memory_budget": 0}, 40, "cpu")


# ------------------------------------------------------------------------------------------ parts, cores


@pytest.mark.parametrize("case", _kernel_cases(), ids=lambda c: c[0])
def test_parts_walked_by_several_threads_give_the_same_bits(case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor cut into parts that threads walk at once (ties split across parts) equals one walk."""
    name, fn, values, options = case
    base, tensors = _quantized((384, 512), 3, seed=5, dtype=torch.bfloat16)  # 6 parts of 32,768
    mp = [{"weight": w, **values} for w in (0.6, 1.0, 1.7)]
    gen = torch.Generator
    whole = fn(base, tensors, mp, {}, dict(options), gen().manual_seed(9))
    parts_seen: list[int] = []
    real = task_arithmetic_kernels.run_parts

    def spy(count: int, *args: object, **kwargs: object) -> None:
        parts_seen.append(count)
        real(count, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(task_arithmetic_kernels, "run_parts", spy)
    parted = {**options, "cpu_share": CpuShare(3), "kernel_threads": 3, "part_elems": 1 << 15, "piece_elems": 5000}
    for _ in range(2):  # which thread walks which part changes from run to run
        assert torch.equal(fn(base, tensors, mp, {}, parted, gen().manual_seed(9)), whole)
    assert set(parts_seen) == ({1} if name.startswith("dare") else {6})  # DARE draws one stream: one part


def test_run_parts_uses_borrowed_cores_and_reports_errors() -> None:
    import threading

    seen: set[int] = set()
    done: list[int] = []

    def task(ctx: list[int], i: int) -> None:
        seen.add(threading.get_ident())
        ctx.append(i)
        done.append(i)

    share = CpuShare(2)
    run_parts(40, task, list, share, threads=2)
    assert sorted(done) == list(range(40))
    with share.hold(), share.hold():  # no idle core: the caller walks every part itself
        done.clear()
        run_parts(10, task, list, share, threads=2)
        assert sorted(done) == list(range(10))

    def failing(ctx: list[int], i: int) -> None:
        if i == 3:
            raise RuntimeError("part 3 failed")

    with pytest.raises(RuntimeError, match="part 3"):
        run_parts(8, failing, list, share, threads=2)


def test_blocked_draws_do_not_depend_on_the_pieces() -> None:
    """Off CPU draws come in fixed blocks (a counter-based generator's output depends on the launch size);
    the blocked path, run here on CPU, serves the same draws whatever the pieces."""
    from evomerge.merge.kernels.pieces import DRAW_BLOCK

    n = DRAW_BLOCK + 12345
    g = torch.Generator().manual_seed(5)
    want = torch.cat([torch.rand(DRAW_BLOCK, generator=g), torch.rand(DRAW_BLOCK, generator=g)])[:n]
    stream = UniformStream(torch.Generator().manual_seed(5), blocks=True)
    for size in (1000, 65536, n):
        stream.rewind()
        got = torch.cat([stream.fill(torch.empty(b - a)) for a, b in ranges(n, size)])
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_magnitude_order_stats_equal_sorting(dtype: torch.dtype) -> None:
    x = (torch.randn(30011, generator=torch.Generator().manual_seed(8), dtype=torch.float64)).to(dtype)
    mags = torch.sort(x.double().abs()).values
    ranks = [0, 100, 15000, 30010]
    for r, stat in zip(ranks, S.order_stats(x, ranks, options={"piece_elems": 999})):
        assert S.key_value(stat.key, dtype) == mags[r].item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_kernels_on_cuda_select_the_same_entries_and_stay_within_the_budget() -> None:
    """The device path (not run on CPU-only machines): the same top-k sets as on CPU, DARE masks that do not
    depend on the pieces, and temporaries within the budget (no full-size float32 copy of any input)."""
    dev = torch.device("cuda")
    base, tensors = _quantized((512, 1024), 3, seed=5, dtype=torch.bfloat16)
    delta = tensors[0].float() - base.float()
    on_cpu, on_gpu = delta.clone(), delta.to(dev)
    S.magnitude_(on_cpu, 0.2)
    S.magnitude_(on_gpu, 0.2)
    assert torch.equal(on_gpu.cpu() != 0, on_cpu != 0)
    mp = [{"weight": 1.0, "density": 0.2}] * 3
    b, ts = base.to(dev), [t.to(dev) for t in tensors]
    out = torch.empty(base.shape, dtype=torch.float32, device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    budget = 2 * 1024 * 1024
    ties(b, ts, mp, {}, {"memory_budget": budget}, out=out)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 2 * budget  # allocator rounding aside
    torch.testing.assert_close(out.cpu(), ties(base, tensors, mp, {}, {}), rtol=0, atol=1e-6)
    dare = [{"weight": 1.0, "density": 0.4}] * 3
    gen = torch.Generator
    whole = dare_ties(b, ts, dare, {}, {}, gen(device=dev).manual_seed(3))
    for size in (4096, 100_000):
        got = dare_ties(b, ts, dare, {}, {"piece_elems": size}, gen(device=dev).manual_seed(3))
        assert torch.equal(got, whole)
