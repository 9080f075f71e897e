"""APL (seed e, Kong et al.): parameter importance by causal intervention, and importance-based merging.

RECONSTRUCTED beyond the paper's abstract (see ``shared/notes/methods.md``); the choices are named options.

Partitions of each task vector ``tau_t`` (option ``level``): ``model`` (the whole vector), ``layer`` (every tensor
of one transformer layer; tensors outside the layer stack are one partition each) or ``row`` (one output row
of a tensor = one hidden unit; a 1-D tensor's entries are rows). Importance of partition ``P`` for task ``t``
(option ``estimator``):

- ``exact``: ``I = |L(theta_t with P reset to the base) - L(theta_t)|`` on a few task examples (one forward
  pass per partition);
- ``gradient``: ``I = |<grad L, tau_t^P>|``, the first-order approximation from ONE backward pass at
  ``theta_t`` (option ``grad_point: finetuned``) or at ``theta_0 + tau_t/2`` (``midpoint``, a reconstruction:
  exact for a quadratic loss when P is the whole vector).

Method ``apl`` (per row ``r`` of a tensor, with ``I~ = I / max I`` over model t's partitions):

- keep probability ``p_{t,r} = clip(density_t * exp(I~_{t,r}/temperature_drop) / Z_t, 0, 1)``, ``Z_t`` the
  parameter-weighted mean of ``exp(I~/temperature_drop)`` over model t, so the mean keep rate stays
  ``density_t`` (less important -> dropped more; ``temperature_drop -> inf`` is DARE);
  survivors are divided by ``p_{t,r}`` (DARE rescale), masks drawn from the seeded generator;
- merge weights ``w_{t,r} = softmax_t(I_{t,r} / (temperature_weight * mean_t I_{t,r}))`` (uniform when
  ``temperature_weight -> inf``);
- ``theta = theta_0 + lambda * sum_t w_{t,r} * tau~_{t,r}``.

Importance is measured by :mod:`evomerge.merge.calibration.importance` and reaches the kernel through the
method's ``prepare`` hook (:mod:`evomerge.merge.methods.apl`), computed once per model and cached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, work_dtype

LEVELS: tuple[str, ...] = ("model", "layer", "row")
ESTIMATORS: tuple[str, ...] = ("gradient", "exact")
GRAD_POINTS: tuple[str, ...] = ("finetuned", "midpoint")


# ------------------------------------------------------------------------------------------ partitions


def partition_of(name: str, level: str, layer: int | None) -> str:
    """The partition id of a whole tensor at ``model``/``layer`` level (rows are split by the caller)."""
    if level == "model":
        return "model"
    if level == "layer":
        return f"layer.{layer}" if layer is not None else name
    raise ValueError(f"partition_of: level {level!r} has per-row partitions")


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 1 else t.reshape(1, 1)


def partition_importance(per_tensor: Mapping[str, Tensor], level: str,
                         layer_of: Callable[[str], int | None]) -> dict[str, float]:
    """Collapse per-tensor row importance back to one value per ``model``/``layer`` partition."""
    out: dict[str, float] = {}
    for n, v in per_tensor.items():
        out.setdefault(partition_of(n, level, layer_of(n)), float(v[0]))
    return out


@dataclass
class ImportanceStats:
    """One model's importance over all its rows: the max (for ``I~``) and the keep-rate normalizer ``Z(T)``."""

    values: Tensor  # I~ of every row, float64
    sizes: Tensor  # parameters per row
    max_value: float
    _z: dict[float, float] = field(default_factory=dict, repr=False)

    @staticmethod
    def from_importance(per_tensor: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]) -> ImportanceStats:
        vals, sizes = [], []
        for n, v in per_tensor.items():
            numel = math.prod(shapes[n]) if len(shapes[n]) else 1
            vals.append(v)
            sizes.append(torch.full_like(v, numel / max(1, v.shape[0])))
        allv = torch.cat(vals) if vals else torch.zeros(1, dtype=torch.float64)
        mx = float(allv.max()) if allv.numel() else 0.0
        norm = allv / mx if mx > 0 else torch.zeros_like(allv)
        return ImportanceStats(norm, torch.cat(sizes) if sizes else torch.ones(1, dtype=torch.float64), mx)

    def z(self, temperature: float) -> float:
        if temperature not in self._z:
            e = torch.exp(self.values / temperature)
            self._z[temperature] = float((e * self.sizes).sum() / self.sizes.sum())
        return self._z[temperature]


# ------------------------------------------------------------------------------------------ kernel


def keep_probabilities(imp: Tensor, stats: ImportanceStats, density: float, temperature: float) -> Tensor:
    """``clip(density * exp(I~/T) / Z(T), 0, 1)`` per row."""
    if temperature <= 0:
        raise ValueError(f"temperature_drop must be > 0, got {temperature}")
    norm = imp / stats.max_value if stats.max_value > 0 else torch.zeros_like(imp)
    return (density * torch.exp(norm / temperature) / stats.z(temperature)).clamp(0.0, 1.0)


def merge_weights(imps: Sequence[Tensor], temperature: float) -> Tensor:
    """``softmax_t(I_{t,r} / (T * mean_t I_{t,r}))`` per row, shape (T, rows); uniform where all I are 0."""
    if temperature <= 0:
        raise ValueError(f"temperature_weight must be > 0, got {temperature}")
    stacked = torch.stack([i.to(torch.float64) for i in imps])
    scale = stacked.mean(dim=0, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    logits = torch.where(scale > 0, stacked / (temperature * safe), torch.zeros_like(stacked))
    return torch.softmax(logits, dim=0)


def apl(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
        params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """Kernel of method ``apl`` (see the module docstring); without importance every row counts equally."""
    if base is None:
        raise ValueError("apl needs a base tensor")
    wd = work_dtype(base, options)
    b = base.to(torch.float64)
    given = bool(options.get("inputs_are_deltas", False))
    taus = [t.to(torch.float64) if given else t.to(torch.float64) - b for t in tensors]
    rows = _rows(b).shape[0]
    imps = options.get("apl_importance")
    stats = options.get("apl_stats")
    if imps is None or stats is None:
        imps = [torch.ones(rows, dtype=torch.float64) for _ in tensors]
        stats = [ImportanceStats(torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), 1.0)
                 for _ in tensors]
    if len(imps) != len(tensors):
        raise ValueError(f"{len(imps)} importance vectors for {len(tensors)} models")
    t_drop = float(params.get("temperature_drop", 0.5))
    t_weight = float(params.get("temperature_weight", 1.0))
    lam = float(params.get("lambda", 1.0))
    weights = merge_weights(imps, t_weight)  # (T, rows)
    merged = torch.zeros_like(_rows(b))
    for i, tau in enumerate(taus):
        tr = _rows(tau)
        keep = keep_probabilities(imps[i].to(torch.float64).cpu(), stats[i],
                                  float(model_params[i].get("density", 0.5)), t_drop).to(tr.device)
        if generator is None and bool((keep < 1).any()):
            raise ValueError("apl drops at random and needs a seeded generator")
        if bool((keep < 1).any()):
            draw = torch.rand(tr.shape, generator=generator, dtype=torch.float64, device="cpu").to(tr.device)
            mask = draw < keep.unsqueeze(1)
            scale = torch.where(keep > 0, 1.0 / keep.clamp(min=1e-12), torch.zeros_like(keep)).unsqueeze(1)
            tr = tr * mask * scale
        merged += weights[i].to(tr.device).unsqueeze(1) * tr
    out = b + lam * merged.reshape(b.shape)
    return out.to(wd)
