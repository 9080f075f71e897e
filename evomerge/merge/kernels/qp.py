"""Output-space QP merging (seed d, Evans et al.): the merged update minimizing a squared-output objective.

RECONSTRUCTED beyond the paper's abstract (see ``shared/notes/methods.md``); every choice below is a named
option. For one linear layer with calibration inputs ``X_t`` of task ``t`` (Gram ``G_t = X_t X_t^T``) and task
vectors ``tau_t = W_t - W_0``, the merged update ``Delta = sum_k alpha_k B_k`` over a basis ``{B_k}`` minimizes

    J(alpha) = sum_t w_t ||Delta X_t - tau_t X_t||_F^2 = sum_t w_t tr((Delta - tau_t) G_t (Delta - tau_t)^T),

a convex QP: ``H alpha = b`` with ``H_kl = tr(B_k G B_l^T)`` (``G = sum_t w_t G_t``) and
``b_k = sum_t w_t tr(B_k G_t tau_t^T)``. Bases (option ``basis``):

- ``task``: ``B_t = tau_t`` (one coefficient per model per tensor; task arithmetic and soups are feasible);
- ``masked``: ``B_t = m_t * tau_t`` with masks from option ``mask`` (``magnitude``: top-``density``;
  ``ties``: top-``density`` and agreement with the TIES-elected sign; ``dare``: Bernoulli(``density``), seeded);
- ``full``: unrestricted ``Delta``; closed form ``Delta* = (sum_t w_t tau_t G_t)(sum_t w_t G_t)^-1`` (RegMean);
- ``diagonal``: ``G_t`` replaced by its diagonal: the element-wise average of the ``tau_t`` weighted by the
  Gram diagonals (the cheap "diagonal QP"; the exact objective is still what the diagnostic reports).

Ridge (parameter ``ridge``, a reconstruction): every ``G_t`` becomes ``G_t + ridge * mean(diag G_t) * I``
(scale-free), which keeps the full solve well posed with few calibration tokens; ``J`` and the diagnostic are
computed with the regularized Grams so that ``rho`` of an exact basis lies in [0, 1] by construction.

Diagnostic: ``rho = 1 - J(alpha*)/J(0)`` (the fraction of residual energy the basis captures), per tensor and
overall (``1 - sum J*/sum J0``); :class:`QPReport` collects it while a model is merged. The diagonal
approximation is not a minimizer of ``J``, so its ``rho`` can fall below 0 (worse than no merge).

Tensors without calibration Grams (norms, embeddings, biases, non-``nn.Linear`` weights) are merged by the
plain method named by option ``fallback``. The per-tensor Grams reach the kernel through the method's
``prepare`` hook (:mod:`evomerge.merge.methods.qp`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.merge.kernels.common import Tensor, work_dtype
from evomerge.merge.kernels.sparsify import topk_mask

BASES: tuple[str, ...] = ("task", "masked", "full", "diagonal")
MASKS: tuple[str, ...] = ("magnitude", "ties", "dare")
FALLBACKS: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
# Per-tensor options that prepare_qp hands to the kernel (never set by recipes).
RUNTIME_KEYS: tuple[str, ...] = ("qp_grams", "qp_report", "qp_tensor")


# ------------------------------------------------------------------------------------------------ solver


@dataclass(frozen=True)
class QPSolution:
    """The merged update of one tensor, its coefficients (None for full/diagonal) and the objective values."""

    delta: Tensor
    alpha: Tensor | None
    j0: float
    jstar: float

    @property
    def rho(self) -> float:
        return residual_rho(self.j0, self.jstar)


def residual_rho(j0: float, jstar: float) -> float:
    """``1 - J*/J0``; 1 when there is nothing to capture (all task vectors zero on the calibration data)."""
    if j0 <= 1e-30:
        return 1.0
    return 1.0 - jstar / j0


def regularize(gram: Tensor, ridge: float) -> Tensor:
    """``G + ridge * mean(diag G) * I`` (ridge relative to the Gram's scale; 0 leaves G unchanged)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if ridge == 0:
        return gram
    d = gram.shape[0]
    scale = float(torch.diagonal(gram).mean()) if d else 0.0
    if scale <= 0:
        scale = 1.0
    return gram + (ridge * scale) * torch.eye(d, dtype=gram.dtype, device=gram.device)


def objective(delta: Tensor, taus: Sequence[Tensor], grams: Sequence[Tensor]) -> float:
    """``J(Delta) = sum_t tr((Delta - tau_t) G_t (Delta - tau_t)^T)`` (weights already folded into ``G_t``)."""
    total = 0.0
    for tau, g in zip(taus, grams):
        r = delta - tau
        total += float(((r @ g) * r).sum())
    return total


def _solve_spd(a: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``a x = rhs`` for symmetric PSD ``a``: Cholesky, else the pseudo-inverse (min-norm solution)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.pinv(a, hermitian=True) @ rhs


def basis_masks(
    taus: Tensor, kind: str, densities: Sequence[float], generator: torch.Generator | None
) -> Tensor:
    """Boolean masks (T, out, in) for the ``masked`` basis (TIES/DARE-style; see the module docstring)."""
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r} (choices: {', '.join(MASKS)})")
    t = taus.shape[0]
    masks = torch.zeros(taus.shape, dtype=torch.bool, device=taus.device)
    for i in range(t):
        d = float(densities[i])
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"density {d} of model {i} outside [0, 1]")
        flat = taus[i].reshape(-1)
        n = flat.numel()
        if kind == "dare":
            if generator is None:
                raise ValueError("mask: dare needs a seeded generator")
            draw = torch.rand(flat.shape, generator=generator, device="cpu", dtype=torch.float64).to(flat.device)
            masks[i].view(-1).copy_(draw < d)
        else:
            k = max(1, int(d * n)) if d > 0 else 0
            if k >= n:
                masks[i].fill_(True)
            elif k > 0:  # exact top-k in linear time, ties to the lowest index (as TIES)
                masks[i].view(-1).copy_(topk_mask(flat.abs(), k))
    if kind == "ties":
        trimmed = taus * masks
        elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(taus.dtype)
        masks &= (taus * elected) > 0
    return masks


def solve_basis(basis: Tensor, taus: Tensor, grams: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Coefficients and update over an explicit basis (K, out, in): ``H alpha = b`` (min-norm if singular)."""
    k = basis.shape[0]
    g_sum = torch.stack(list(grams)).sum(dim=0)
    bg = [basis[i] @ g_sum for i in range(k)]
    h = torch.empty((k, k), dtype=taus.dtype, device=taus.device)
    for i in range(k):
        for j in range(i, k):
            h[i, j] = h[j, i] = (bg[i] * basis[j]).sum()
    b = torch.zeros(k, dtype=taus.dtype, device=taus.device)
    for s, g in enumerate(grams):
        for i in range(k):
            b[i] += ((basis[i] @ g) * taus[s]).sum()
    alpha = (torch.linalg.pinv(h, hermitian=True) @ b.unsqueeze(1)).squeeze(1)
    delta = torch.einsum("k,koi->oi", alpha, basis)
    return alpha, delta


def solve_full(taus: Tensor, grams: Sequence[Tensor]) -> Tensor:
    """RegMean closed form ``(sum_t tau_t G_t)(sum_t G_t)^-1``, computed as a solve (no explicit inverse)."""
    g_sum = torch.stack(list(grams)).sum(dim=0)
    rhs = torch.zeros((taus.shape[2], taus.shape[1]), dtype=taus.dtype, device=taus.device)
    for tau, g in zip(taus, grams):
        rhs += g @ tau.T  # G_t symmetric: (tau_t G_t)^T = G_t tau_t^T
    return _solve_spd(g_sum, rhs).T.contiguous()


def solve_diagonal(taus: Tensor, grams: Sequence[Tensor]) -> Tensor:
    """Element-wise average of the task vectors weighted by the Gram diagonals (per input column)."""
    diag = torch.stack([torch.diagonal(g) for g in grams])  # (T, in)
    total = diag.sum(dim=0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    w = torch.where(total > 0, diag / safe, torch.full_like(diag, 1.0 / diag.shape[0]))
    return torch.einsum("ti,toi->oi", w, taus)


def qp_solve(
    taus: Tensor,
    grams: Sequence[Tensor],
    basis: str = "full",
    ridge: float = 0.0,
    weights: Sequence[float] | None = None,
    mask: str = "ties",
    densities: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> QPSolution:
    """Solve the per-tensor QP in float64. ``taus`` (T, out, in); ``grams`` T matrices (in, in)."""
    if basis not in BASES:
        raise ValueError(f"unknown basis {basis!r} (choices: {', '.join(BASES)})")
    if taus.dim() != 3:
        raise ValueError(f"qp_solve needs task vectors of shape (T, out, in), got {tuple(taus.shape)}")
    t, _, d_in = taus.shape
    if len(grams) != t:
        raise ValueError(f"{len(grams)} Gram matrices for {t} task vectors")
    weights = [1.0] * t if weights is None else [float(w) for w in weights]
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"qp needs finite non-negative per-model weights, got {weights}")
    taus = taus.to(torch.float64)
    reg = []
    for i, g in enumerate(grams):
        if tuple(g.shape) != (d_in, d_in):
            raise ValueError(f"Gram {i} has shape {tuple(g.shape)}, expected ({d_in}, {d_in})")
        reg.append(regularize(g.to(device=taus.device, dtype=torch.float64), ridge) * weights[i])
    alpha: Tensor | None = None
    if basis == "task":
        alpha, delta = solve_basis(taus, taus, reg)
    elif basis == "masked":
        dens = [0.5] * t if densities is None else list(densities)
        m = basis_masks(taus, mask, dens, generator)
        alpha, delta = solve_basis(taus * m, taus, reg)
    elif basis == "full":
        delta = solve_full(taus, reg)
    else:
        delta = solve_diagonal(taus, reg)
    j0 = objective(torch.zeros_like(taus[0]), taus, reg)
    jstar = objective(delta, taus, reg)
    return QPSolution(delta, alpha, j0, jstar)


# ------------------------------------------------------------------------------------------------ report


@dataclass
class QPReport:
    """Per-tensor objective values collected while merging (thread-safe); ``rho`` per tensor and overall."""

    records: dict[str, tuple[float, float]] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, name: str, j0: float, jstar: float) -> None:
        with self._lock:
            self.records[name] = (float(j0), float(jstar))

    def note_fallback(self, name: str) -> None:
        with self._lock:
            if name not in self.fallback:
                self.fallback.append(name)

    def rho(self, name: str) -> float:
        j0, js = self.records[name]
        return residual_rho(j0, js)

    def overall(self) -> float:
        """``1 - sum_l J*_l / sum_l J0_l`` over every recorded tensor (NaN when nothing was recorded)."""
        if not self.records:
            return float("nan")
        j0 = sum(v[0] for v in self.records.values())
        js = sum(v[1] for v in self.records.values())
        return residual_rho(j0, js)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rho": self.overall(),
            "tensors": {k: {"j0": v[0], "jstar": v[1], "rho": residual_rho(*v)} for k, v in sorted(self.records.items())},
            "fallback": sorted(self.fallback),
        }


# ------------------------------------------------------------------------------------------------ kernel


def _stacked_deltas(base: Tensor, tensors: Sequence[Tensor], options: Mapping[str, Any]) -> Tensor:
    b = base.to(torch.float64)
    if options.get("inputs_are_deltas", False):
        return torch.stack([t.to(torch.float64) for t in tensors])
    return torch.stack([t.to(torch.float64) - b for t in tensors])


def qp(base: Tensor | None, tensors: list[Tensor], model_params: list[dict[str, float]],
       params: dict[str, float], options: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
    """Kernel of method ``qp``: solve the per-tensor QP with ``options['qp_grams']`` (tensors without Grams are
    merged by the method's fallback, see :mod:`evomerge.merge.methods.qp`).

    ``options['qp_grams']``: one input Gram per model (kernel order), from :func:`prepare_qp`;
    ``options['qp_report']``/``['qp_tensor']``: where to record ``J0``/``J*`` for the diagnostic.
    """
    if base is None:
        raise ValueError("qp needs a base tensor")
    grams = options.get("qp_grams")
    report = options.get("qp_report")
    name = str(options.get("qp_tensor", "?"))
    if grams is None or base.dim() != 2:
        raise ValueError(f"qp: tensor {name} has no calibration Grams (the qp method merges it by its fallback)")
    taus = _stacked_deltas(base, tensors, options)
    sol = qp_solve(
        taus,
        grams,
        basis=str(options.get("basis", "full")),
        ridge=float(params.get("ridge", 0.01)),
        weights=[float(m.get("weight", 1.0)) for m in model_params],
        mask=str(options.get("mask", "ties")),
        densities=[float(m.get("density", 0.5)) for m in model_params],
        generator=generator,
    )
    if isinstance(report, QPReport):
        report.record(name, sol.j0, sol.jstar)
    out = base.to(torch.float64) + sol.delta
    return out.to(work_dtype(base, options))
