"""Who solves what: the population's per-item scores, and the breeding signals read from them (M2N2).

A member's *behaviour* is its vector of item scores over every item of every task (search split), with one
weight per item such that ``sum_j w_j s_ij`` is the member's plain aggregate (task weight x the item's weight in
its task, normalized). Competition counts *gains* ``g_ij = s_ij - floor_j`` over the weakest member's score on
the item: with a graded metric (token accuracy) a model that lost a skill still scores its guess level there;
counted as success, that guess would make every item look shared by the whole population, so an item only one
member really solves would look common (M2N2 scores items 0/1, where a failed item is 0). On it:

- :func:`niche_fitness`: competition (natural niches) fitness ``f_i = sum_j w_j g_ij / (sum_k g_kj)^alpha`` over
  the population; alpha = 0 is the plain aggregate (exactly: the floor is not subtracted), alpha = 1 M2N2's
  setting. Items few members solve are worth more, so a specialist in a rare skill survives the top-k;
- :func:`attraction`: how much a candidate partner B succeeds where A fails,
  ``sum_j max(0, F_bj - F_aj)`` on competition-normalized gains ``F_ij = w_j g_ij / (sum_k g_kj)^alpha``;
- :func:`behaviour_distance`: the weighted mean absolute difference of two members' item scores (0: they behave
  identically on the items, so their child is predicted to equal them and the pair is skipped).

Scores must be >= 0 for competition to mean anything: :func:`behaviour_matrix` negates lower-is-better tasks and
shifts any item whose population minimum is negative to 0. Items a member was not scored on (a raced, partial
candidate) take that member's mean on the task's items it was scored on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Behaviour:
    """Item scores of some members: ``scores`` is members x items (>= 0), ``weights`` sums to 1, ``floor`` is
    the score per item that counts as nothing gained (None: 0; :func:`behaviour_matrix`: the weakest member's)."""

    keys: tuple[str, ...]
    scores: np.ndarray
    weights: np.ndarray
    floor: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.scores.shape != (len(self.keys), len(self.weights)):
            raise ValueError(f"behaviour: scores {self.scores.shape} for {len(self.keys)} members and "
                             f"{len(self.weights)} items")
        if self.floor is not None and self.floor.shape != self.weights.shape:
            raise ValueError(f"behaviour: floor {self.floor.shape} for {len(self.weights)} items")

    @property
    def gains(self) -> np.ndarray:
        """``scores - floor``, clipped at 0 (a floor taken from a wider population may exceed a subset's score)."""
        if self.floor is None:
            return self.scores
        return np.maximum(self.scores - self.floor[None, :], 0.0)

    def row(self, key: str) -> np.ndarray:
        return self.scores[self.keys.index(key)]

    def subset(self, keys: Sequence[str]) -> Behaviour:
        """Some members, keeping the whole population's floor."""
        idx = [self.keys.index(k) for k in keys]
        return Behaviour(tuple(keys), self.scores[idx], self.weights, self.floor)


def behaviour_matrix(keys: Sequence[str], tasks: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     task_weights: Mapping[str, float], lower_is_better: Sequence[str] = ()) -> Behaviour | None:
    """One behaviour over ``tasks`` (task -> (scores, item weights), each members x items, NaN / 0 where a member
    has no result on an item, as :meth:`~evomerge.search.archive.Archive.item_matrix` gives them).

    Returns None when a member has no item result on some task (an archive written before per-item results).
    """
    cols: list[np.ndarray] = []
    wcols: list[np.ndarray] = []
    floors: list[np.ndarray] = []
    names = [t for t in tasks if t in task_weights]
    total_w = sum(float(task_weights[t]) for t in names)
    if not names or total_w <= 0:
        return None
    for task in names:
        s, w = (np.asarray(a, dtype=np.float64) for a in tasks[task])
        if s.ndim != 2 or s.shape[0] != len(keys):
            raise ValueError(f"task {task}: scores {s.shape} for {len(keys)} members")
        seen = ~np.isnan(s)
        if not seen.any(axis=1).all():
            return None
        if task in lower_is_better:
            s = -s
        # a member's missing items take its mean on the task's items it saw
        means = np.nansum(np.where(seen, s * w, 0.0), axis=1) / np.maximum(np.where(seen, w, 0.0).sum(axis=1), 1e-12)
        s = np.where(seen, s, means[:, None])
        item_w = w.max(axis=0)  # an item's weight is the same for every member that saw it
        lo = s.min(axis=0)
        s = s - np.minimum(lo, 0.0)[None, :]
        if item_w.sum() <= 0:
            return None
        cols.append(s)
        floors.append(s.min(axis=0))
        wcols.append(item_w / item_w.sum() * float(task_weights[task]) / total_w)
    return Behaviour(tuple(keys), np.concatenate(cols, axis=1), np.concatenate(wcols), np.concatenate(floors))


def _competition(scores: np.ndarray, alpha: float) -> np.ndarray:
    """``1 / (sum_k s_kj)^alpha`` per item (0 where nobody scores: such an item is worth nothing)."""
    z = scores.sum(axis=0)
    out = np.zeros_like(z)
    pos = z > 0
    out[pos] = z[pos] ** (-alpha)
    return out


def niche_fitness(b: Behaviour, alpha: float) -> np.ndarray:
    """``f_i = sum_j w_j g_ij / (sum_k g_kj)^alpha`` for every member of ``b`` (the population); alpha 0: the plain
    aggregate ``sum_j w_j s_ij`` (the same order as the gains' sum, which is it less a constant)."""
    if alpha < 0 or not math.isfinite(alpha):
        raise ValueError(f"niche alpha must be a finite number >= 0, got {alpha}")
    return competition_normalized(b, alpha).sum(axis=1)


def competition_normalized(b: Behaviour, alpha: float) -> np.ndarray:
    """``F_ij = w_j g_ij / (sum_k g_kj)^alpha``: item gains as shares of what the population gains there
    (alpha 0: ``w_j s_ij``, the item's part of the plain aggregate)."""
    if alpha == 0:
        return b.scores * b.weights[None, :]
    g = b.gains
    return g * (b.weights * _competition(g, alpha))[None, :]


def attraction(b: Behaviour, a: str, alpha: float = 1.0) -> dict[str, float]:
    """``sum_j max(0, F_bj - F_aj)`` of every other member B for parent ``a``: B's strength where A is weak."""
    f = competition_normalized(b, alpha)
    fa = f[b.keys.index(a)]
    return {k: float(np.maximum(0.0, f[i] - fa).sum()) for i, k in enumerate(b.keys) if k != a}


def attraction_to_set(b: Behaviour, group: Sequence[str], alpha: float = 1.0) -> dict[str, float]:
    """Attraction of every member outside ``group`` to the group as a whole (what none of it solves as well):
    ``sum_j max(0, F_mj - max_{g in group} F_gj)``."""
    f = competition_normalized(b, alpha)
    best = f[[b.keys.index(g) for g in group]].max(axis=0)
    return {k: float(np.maximum(0.0, f[i] - best).sum()) for i, k in enumerate(b.keys) if k not in group}


def behaviour_distance(b: Behaviour, x: str, y: str) -> float:
    """``sum_j w_j |s_xj - s_yj|``: 0 when two members score every item the same."""
    return float((b.weights * np.abs(b.row(x) - b.row(y))).sum())
