"""MAGPRUNE (DELLA, arXiv 2406.11617): drop task-vector entries at random, the small ones more often.

Per row of a task vector (a 1-D tensor is one row; for more dimensions, ranks run along dimension 1, as in
mergekit and the official DELLA code) the entries are ranked by magnitude, 1 for the smallest; rank ``r`` of
``n`` gets keep probability ``p = (density - epsilon) + 2 * epsilon * (r - 1) / (n - 1)``, so that the
probabilities span ``[density - epsilon, density + epsilon]`` and average ``density``. Each entry is kept with
its probability (one Bernoulli draw per entry from the seeded generator, in flat order: the same draws as
``torch.bernoulli`` on mergekit's probabilities), then the survivors are rescaled.

Differences from mergekit 0.1.5, each named:
- ``rescale: inverse_probability`` (evomerge's default) divides each survivor by its own keep probability, as
  the DELLA paper (``1 / (1 - p_drop)``) and its official code do; mergekit restores the L1 norm of the task
  vector instead (``rescale: l1_norm``, what a mergekit config means by ``rescale: true``).
- mergekit refuses ``density +- epsilon`` outside ``(0, 1)``; evomerge clips the probabilities to ``[0, 1]``
  so that every point of a search range merges (identical draws wherever mergekit accepts the values).
- ties in magnitude are ranked by index (a stable sort), where mergekit's sort is unstable;
- a row of one entry gets probability ``density`` (mergekit divides 0 by 0 there).
"""

from __future__ import annotations

import torch

from evomerge.merge.kernels.sparsify import rescale_

RESCALES: tuple[str, ...] = ("inverse_probability", "l1_norm", "none")


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE keep probability of every entry of ``delta`` (float32 unless ``delta`` is float64)."""
    wd = torch.float64 if delta.dtype == torch.float64 else torch.float32
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    moved = rows.movedim(1, -1)  # rank along dimension 1
    n = moved.shape[-1]
    if n == 1:
        return torch.full(delta.shape, float(density), dtype=wd, device=delta.device).clamp_(0.0, 1.0)
    order = torch.argsort(moved.abs(), dim=-1, stable=True)
    # the probability of each rank (r - 1 = 0..n-1), then scattered to where that rank sits: one pass
    rank_norm = (torch.arange(n, dtype=wd, device=delta.device) / (n - 1)).clamp_(0, 1)
    by_rank = ((density - epsilon) + rank_norm * 2 * epsilon).clamp_(0.0, 1.0)
    probs = torch.empty(moved.shape, dtype=wd, device=delta.device)
    probs.scatter_(-1, order, by_rank.expand(moved.shape))
    return probs.movedim(-1, 1).reshape(delta.shape)


def magprune_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None,
    rescale: str = "inverse_probability",
) -> torch.Tensor:
    """MAGPRUNE in place on one task vector (see the module docstring); ``density >= 1`` is the identity."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if rescale not in RESCALES:
        raise ValueError(f"unknown rescale {rescale!r} for MAGPRUNE (choices: {', '.join(RESCALES)})")
    if generator is None:
        raise ValueError("DELLA drops at random and needs an explicit seeded torch.Generator (density < 1)")
    probs = keep_probabilities(delta, density, epsilon)
    before = delta.abs().sum() if rescale == "l1_norm" else None
    keep = torch.bernoulli(probs, generator=generator)
    if rescale == "inverse_probability":
        delta.mul_(torch.where(keep > 0, keep / probs.clamp(min=torch.finfo(probs.dtype).tiny), keep))
        return delta
    delta.mul_(keep)
    return rescale_(delta, before, rescale, density)
