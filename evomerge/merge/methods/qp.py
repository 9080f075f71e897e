"""Method ``qp``: output-space QP merging (seed d); the entry, its calibration hook and its diagnostic.

The per-tensor solve is :func:`evomerge.merge.kernels.qp.qp`; this module decides which tensors get Grams
(every ``nn.Linear`` weight, from each model's calibration rows, optionally sequentially through the
already-merged earlier layers) and merges the others by the plain method of option ``fallback``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.merge.calibration.cache import cached_state, lru_get, probe_model
from evomerge.merge.calibration.grams import collect_grams, gram_bytes, layerwise_merged, sequential_grams
from evomerge.merge.calibration.rows import CalibrationSet
from evomerge.merge.kernels.qp import BASES, FALLBACKS, MASKS, QPReport, qp
from evomerge.merge.methods.builtin import BY_NAME
from evomerge.merge.methods.spec import MergeMethod, MethodContext, Need, OptionSpec, ParamSpec, Prepared
from evomerge.merge.recipe import ROWS_OPTION, ROWS_OPTION_DOC

Tensor = torch.Tensor


def qp_or_fallback(
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    params: dict[str, float],
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """The QP solve where the tensor has Grams (a 2-D linear weight), else the plain ``fallback`` method; a weight
    the prepare hook already merged layer by layer (``qp_merged``, when memory held one layer's Grams) as is."""
    merged = options.get("qp_merged")
    if merged is not None:
        return merged if base is None else merged.to(base.device)
    if options.get("qp_grams") is not None and base is not None and base.dim() == 2:
        return qp(base, tensors, model_params, params, options, generator)
    report = options.get("qp_report")
    if isinstance(report, QPReport) and "qp_tensor" in options:
        report.note_fallback(str(options["qp_tensor"]))
    name = str(options.get("fallback", "linear"))
    if name not in FALLBACKS:
        raise ValueError(f"unknown fallback {name!r} (choices: {', '.join(FALLBACKS)})")
    method = BY_NAME[name]
    passthrough = {k: v for k, v in options.items() if k in ("compute_dtype", "inputs_are_deltas")}
    fp = {p.name: float(params.get(p.name, p.default)) for p in method.params if not p.per_model}
    mp = [{p.name: float(m.get(p.name, p.default)) for p in method.params if p.per_model} for m in model_params]
    return method.fn(base, tensors, mp, fp, passthrough, generator)


def calibration_inputs(ctx: MethodContext) -> tuple[CalibrationSet, str]:
    """(the caller's task rows, the base model's folder) of a data-aware method's recipe.

    A search passes its fitness data; ``evomerge merge`` reads ``options.calibration``.
    """
    plan = ctx.plan
    if plan.base_key is None or plan.base_key not in ctx.model_paths:
        raise ConfigError(f"{plan.method.name}: no path for the base model {plan.base_key!r}")
    if ctx.calibration is None:
        raise ConfigError(f"method {ctx.plan.method.name} needs calibration rows for "
                          f"{list(ctx.plan.input_keys)}: set options.calibration to a fitness spec or a mapping of "
                          "model keys to jsonl files (a search passes its fitness data)")
    return ctx.calibration, str(ctx.model_paths[plan.base_key])


def prepare_qp(ctx: MethodContext) -> Prepared:
    """Per-tensor ``{"qp_grams", "qp_report", "qp_tensor"}``: the input Gram of every ``nn.Linear`` weight for
    every model's calibration rows (cached across recipes in ``ctx.cache``; per recipe when sequential)."""
    plan = ctx.plan
    opts = plan.options
    paths = ctx.model_paths
    calib, base_path = calibration_inputs(ctx)
    tokens = int(opts.get("calibration_tokens", 512))
    normalize = str(opts.get("gram_normalize", "mean"))
    batches = [calib.token_batches(k, tokens) for k in plan.input_keys]
    states = {k: cached_state(ctx.cache, paths[k]) for k in plan.keys}
    probe = probe_model(ctx.cache, base_path)
    report = QPReport()
    ctx.cache["qp_report"] = report
    stats: dict[str, int] = {}
    sequential = bool(opts.get("sequential", False))
    if ctx.grams == "layer":  # one layer's Grams per model at a time: merge each layer here, drop its Grams
        extra = {"qp_report": report}
        if sequential:
            merged = sequential_grams(plan, states, batches, probe, normalize, keep="merged", extra=extra, stats=stats)
        else:
            merged = layerwise_merged(plan, states, batches, probe, str(opts.get("activations", "finetuned")),
                                      normalize, extra=extra, stats=stats)
        ctx.cache["qp_gram_peak_bytes"] = stats.get("peak_gram_bytes", 0)
        out_l: dict[str, dict[str, Any]] = {"*": {"qp_report": report}}
        for name in states[plan.base_key]:
            out_l[name] = {"qp_tensor": name, **({"qp_merged": merged[name]} if name in merged else {})}
        return out_l
    if sequential:
        grams = sequential_grams(plan, states, batches, probe, normalize, stats=stats)
    else:
        activations = str(opts.get("activations", "finetuned"))
        gk = (activations, normalize, tokens, calib.content_hash(plan.input_keys),
              tuple(str(paths[k]) for k in plan.keys))

        def collect() -> dict[str, list[Tensor]]:
            per_model = []
            for t, k in enumerate(plan.input_keys):
                probe.load_state_dict(states[plan.base_key] if activations == "base" else states[k])
                per_model.append(collect_grams(probe, batches[t], normalize=normalize))
            probe.load_state_dict(states[plan.base_key])
            return {n: [pm[n] for pm in per_model] for n in per_model[0]}

        grams = lru_get(ctx.cache, "qp_grams", gk, collect)
        stats["peak_gram_bytes"] = gram_bytes({f"{n}.{i}": g for n, gs in grams.items() for i, g in enumerate(gs)})
    ctx.cache["qp_gram_peak_bytes"] = stats.get("peak_gram_bytes", 0)
    out: dict[str, dict[str, Any]] = {"*": {"qp_report": report}}
    for name in states[plan.base_key]:
        entry: dict[str, Any] = {"qp_tensor": name}
        if name in grams:
            entry["qp_grams"] = grams[name]
        out[name] = entry
    return out


def qp_diagnostics(cache: Mapping[str, Any]) -> dict[str, float]:
    """The residual energy captured by the last prepared qp merge (``rho``, see the kernel's module)."""
    report = cache.get("qp_report")
    return {} if report is None else {"qp_rho": float(report.overall())}


METHOD = MergeMethod(
    "qp", qp_or_fallback,
    (
        ParamSpec("weight", 1.0, 0.0, None, True, "per-task weight in the QP objective (and in the fallback)"),
        ParamSpec("density", 0.5, 0.0, 1.0, True, "fraction KEPT by the masked basis (and a ties/dare fallback)"),
        ParamSpec("ridge", 0.01, 0.0, None, False,
                  "Gram ridge G + ridge*mean(diag G)*I (reconstruction; keeps the full solve well posed)"),
        ParamSpec("lambda", 1.0, None, None, False, "scale of a task_arithmetic/ties fallback only"),
    ),
    (
        OptionSpec("basis", "full", BASES,
                   "task vectors, masked task vectors, full (RegMean closed form) or diagonal Grams"),
        OptionSpec("mask", "ties", MASKS, "masks of the masked basis: top-density, TIES sign-agreeing, or DARE"),
        OptionSpec("sequential", False, None,
                   "calibration activations flow through the already-merged earlier layers"),
        OptionSpec("activations", "finetuned", ("finetuned", "base"),
                   "non-sequential: inputs X_t from each fine-tune (RegMean) or from the base, on task t's data"),
        OptionSpec("gram_normalize", "mean", ("mean", "sum"),
                   "G_t = X_t X_t^T / tokens (every task weighs the same) or the plain sum"),
        OptionSpec("fallback", "linear", FALLBACKS, "plain method for tensors without Grams (norms, embeddings)"),
        OptionSpec("calibration", "", None,
                   "YAML/JSON file mapping each model key to a jsonl of prompt/answer or text rows, or a fitness "
                   "spec (used when the caller provides no calibration set)"),
        OptionSpec("calibration_tokens", 512, None, "calibration tokens per task"),
        OptionSpec(ROWS_OPTION, "", None, ROWS_OPTION_DOC),
    ),
    needs_base=True, min_models=1, needs=frozenset({Need.GENERATOR, Need.CALIBRATION}),
    doc="output-space QP merge (reconstruction of Evans et al.): per linear layer, min sum_t ||(Delta - tau_t) X_t||^2",
    prepare=prepare_qp, diagnostics=qp_diagnostics,
)
