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

Importance reaches the kernel through the ``prepare`` hook (:func:`prepare_apl`), computed once per model and
cached in the prepare context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor

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


# ------------------------------------------------------------------------------------------ importance


def _task_loss(model: torch.nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    ids, mask, labels = batch
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss


def importance(
    model: torch.nn.Module,
    base_state: Mapping[str, Tensor],
    tuned_state: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor, Tensor],
    level: str = "row",
    estimator: str = "gradient",
    grad_point: str = "finetuned",
    layer_of: Callable[[str], int | None] = lambda name: None,
    max_exact: int = 5000,
) -> dict[str, Tensor]:
    """Per-tensor importance of each row's partition (float64, shape (rows,)) for one fine-tuned model.

    ``model`` is a skeleton whose weights are overwritten (left holding ``tuned_state``). Coarse levels
    broadcast the partition's importance to its rows. Tied duplicates share their parameter's importance.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r} (choices: {', '.join(LEVELS)})")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r} (choices: {', '.join(ESTIMATORS)})")
    if grad_point not in GRAD_POINTS:
        raise ValueError(f"unknown grad_point {grad_point!r} (choices: {', '.join(GRAD_POINTS)})")
    params = dict(model.named_parameters())
    names = [n for n in params if n in tuned_state and n in base_state]
    taus = {n: (tuned_state[n].double() - base_state[n].double()) for n in names}
    model.load_state_dict(dict(tuned_state), strict=False)
    model.eval()
    out: dict[str, Tensor] = {}
    if estimator == "gradient":
        if grad_point == "midpoint":
            with torch.no_grad():
                for n in names:
                    params[n].copy_((base_state[n].double() + 0.5 * taus[n]).to(params[n].dtype))
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            _task_loss(model, batch).backward()
        contrib = {}
        for n in names:
            g = params[n].grad
            contrib[n] = torch.zeros(_rows(taus[n]).shape[0], dtype=torch.float64) if g is None else \
                _rows(g.double() * taus[n]).sum(dim=1).cpu()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n in names:
                params[n].copy_(tuned_state[n].to(params[n].dtype))
        if level == "row":
            out = {n: c.abs() for n, c in contrib.items()}
        else:
            sums: dict[str, float] = {}
            for n, c in contrib.items():
                p = partition_of(n, level, layer_of(n))
                sums[p] = sums.get(p, 0.0) + float(c.sum())
            out = {n: torch.full((c.shape[0],), abs(sums[partition_of(n, level, layer_of(n))]),
                                 dtype=torch.float64) for n, c in contrib.items()}
    else:
        with torch.no_grad():
            ref = float(_task_loss(model, batch))

            def reset_loss(pairs: Sequence[tuple[str, slice | int | None]]) -> float:
                saved = []
                for n, rows in pairs:
                    w = params[n]
                    view = w if rows is None else w[rows]
                    saved.append((n, rows, view.detach().clone()))
                    src = base_state[n].to(w.dtype)
                    if rows is None:
                        w.copy_(src)
                    else:
                        w[rows] = src[rows]
                val = float(_task_loss(model, batch))
                for n, rows, old in saved:
                    if rows is None:
                        params[n].copy_(old)
                    else:
                        params[n][rows] = old
                return abs(val - ref)

            if level == "row":
                total = sum(_rows(taus[n]).shape[0] for n in names)
                if total > max_exact:
                    raise ValueError(
                        f"exact row-level importance needs {total} forward passes (> max_exact {max_exact}); "
                        "use estimator: gradient or a coarser level"
                    )
                for n in names:
                    nrows = _rows(taus[n]).shape[0]
                    if params[n].dim() == 0:
                        out[n] = torch.tensor([reset_loss([(n, None)])], dtype=torch.float64)
                    else:
                        out[n] = torch.tensor([reset_loss([(n, r)]) for r in range(nrows)], dtype=torch.float64)
            else:
                groups: dict[str, list[str]] = {}
                for n in names:
                    groups.setdefault(partition_of(n, level, layer_of(n)), []).append(n)
                vals = {p: reset_loss([(n, None) for n in members]) for p, members in groups.items()}
                for p, members in groups.items():
                    for n in members:
                        out[n] = torch.full((_rows(taus[n]).shape[0],), vals[p], dtype=torch.float64)
    for n in tuned_state:  # tied duplicates and names outside named_parameters
        if n not in out:
            for pn, pt in params.items():
                if pn in out and n in base_state and pt.shape == tuned_state[n].shape and \
                        pt.data_ptr() == model.state_dict()[n].data_ptr():
                    out[n] = out[pn]
                    break
    return out


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


def apl(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Kernel of method ``apl`` (see the module docstring); without importance every row counts equally."""
    if base is None:
        raise ValueError("apl needs a base tensor")
    from evomerge.merge.methods import work_dtype

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


# ------------------------------------------------------------------------------------------ prepare


def prepare_apl(ctx: Any) -> dict[str, dict[str, Any]]:
    """The ``apl`` prepare hook: importance of every model (cached per model in ``ctx.cache``)."""
    from evomerge.errors import ConfigError
    from evomerge.merge import calibration as C
    from evomerge.merge.registry import get_method, plan_inputs, resolve_options

    recipe = ctx.recipe
    method = get_method(recipe.method)
    plan = plan_inputs(recipe, method)
    opts = resolve_options(recipe, method)
    paths = ctx.model_paths
    if plan.base is None or plan.base not in paths:
        raise ConfigError(f"apl: no path for the base model {plan.base!r}")
    calib = C.context_calibration(ctx, opts, paths[plan.base], "apl needs task examples")
    level = str(opts.get("level", "row"))
    estimator = str(opts.get("estimator", "gradient"))
    grad_point = str(opts.get("grad_point", "midpoint"))
    n_ex = int(opts.get("examples", 16))
    base_state = C.cached_state(ctx.cache, paths[plan.base])
    probe = ctx.cache.get("probe_model")
    if probe is None:
        probe = ctx.cache["probe_model"] = C.load_model(paths[plan.base])
    info = C.layer_info(probe.config)
    shapes = {n: t.shape for n, t in base_state.items()}
    imps, stats = [], []
    for k in plan.models:
        key = ("apl", str(paths[k]), level, estimator, grad_point, n_ex, calib.content_hash([k]))
        if key not in ctx.cache:
            tuned = C.cached_state(ctx.cache, paths[k])
            per = importance(probe, base_state, tuned, calib.loss_batch(k, n_ex), level, estimator, grad_point,
                             lambda n: info(n)[0])
            probe.load_state_dict(base_state)
            ctx.cache[key] = (per, ImportanceStats.from_importance(per, shapes))
        per, st = ctx.cache[key]
        imps.append(per)
        stats.append(st)
    out: dict[str, dict[str, Any]] = {}
    for name in base_state:
        if all(name in p for p in imps):
            out[name] = {"apl_importance": [p[name] for p in imps], "apl_stats": stats}
    return out


def _register() -> None:
    from evomerge.merge.qp import _prepare_kw
    from evomerge.merge.registry import REGISTRY, MergeMethod, OptionSpec, ParamSpec

    if "apl" in REGISTRY:
        return
    REGISTRY.register(MergeMethod(
        "apl", apl,
        (
            ParamSpec("density", 0.5, 0.0, 1.0, True, "mean fraction of each task vector KEPT (1 - drop rate)"),
            ParamSpec("temperature_drop", 0.5, 1e-6, None, False,
                      "how strongly importance sets keep rates (large: uniform, i.e. DARE)"),
            ParamSpec("temperature_weight", 1.0, 1e-6, None, False,
                      "softmax temperature of per-partition merge weights across models (large: uniform mean)"),
            ParamSpec("lambda", 1.0, None, None, False, "scale of the merged update: base + lambda * sum_t w_t tau~_t"),
        ),
        (
            OptionSpec("level", "row", LEVELS, "partitions: whole model, layer, or hidden unit (output row)"),
            OptionSpec("estimator", "gradient", ESTIMATORS,
                       "importance: |<grad, delta>| from one backward pass, or exact reset-to-base intervention"),
            OptionSpec("grad_point", "midpoint", GRAD_POINTS,
                       "gradient at the fine-tune (first order, as the paper), or at base + tau/2 (reconstruction; matches the exact intervention better)"),
            OptionSpec("examples", 16, None, "task examples per model for the importance loss"),
            OptionSpec("calibration", "", None,
                       "fitness spec or YAML mapping model keys to jsonl rows (when the caller passes none)"),
        ),
        needs_base=True, min_models=1, uses_generator=True,
        doc="APL (reconstruction of Kong et al.): importance-based drop rates and per-partition softmax weights",
        **_prepare_kw(prepare_apl),
    ))


_register()
