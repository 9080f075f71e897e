"""Method ``apl``: importance by causal intervention (seed e); the entry and its importance hook.

The merge itself is :func:`evomerge.merge.kernels.apl.apl`; this module measures each model's importance
(:mod:`evomerge.merge.calibration.importance`) on its calibration rows, once per model (cached), and hands it
to the kernel per tensor.
"""

from __future__ import annotations

from typing import Any

from evomerge.merge.calibration.cache import cached_state, probe_model
from evomerge.merge.calibration.importance import importance
from evomerge.merge.kernels.apl import ESTIMATORS, GRAD_POINTS, LEVELS, ImportanceStats, apl
from evomerge.merge.methods.qp import calibration_inputs
from evomerge.merge.methods.spec import MergeMethod, MethodContext, Need, OptionSpec, ParamSpec, Prepared
from evomerge.merge.recipe import ROWS_OPTION, ROWS_OPTION_DOC


def prepare_apl(ctx: MethodContext) -> Prepared:
    """Per-tensor ``{"apl_importance", "apl_stats"}``: every model's importance (cached per model in ``ctx.cache``)."""
    plan = ctx.plan
    opts = plan.options
    paths = ctx.model_paths
    calib, base_path = calibration_inputs(ctx)
    level = str(opts.get("level", "row"))
    estimator = str(opts.get("estimator", "gradient"))
    grad_point = str(opts.get("grad_point", "midpoint"))
    n_ex = int(opts.get("examples", 16))
    base_state = cached_state(ctx.cache, base_path)
    probe = probe_model(ctx.cache, base_path)
    shapes = {n: t.shape for n, t in base_state.items()}
    imps, stats = [], []
    for k in plan.input_keys:
        key = ("apl", str(paths[k]), level, estimator, grad_point, n_ex, calib.content_hash([k]))
        if key not in ctx.cache:
            tuned = cached_state(ctx.cache, paths[k])
            per = importance(probe, base_state, tuned, calib.loss_batch(k, n_ex), level, estimator, grad_point,
                             plan.layer_map.layer_of)
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


METHOD = MergeMethod(
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
                   "gradient at the fine-tune (first order, as the paper), or at base + tau/2 (reconstruction; "
                   "matches the exact intervention better)"),
        OptionSpec("examples", 16, None, "task examples per model for the importance loss"),
        OptionSpec("calibration", "", None,
                   "fitness spec or YAML mapping model keys to jsonl rows (when the caller passes none)"),
        OptionSpec(ROWS_OPTION, "", None, ROWS_OPTION_DOC),
    ),
    needs_base=True, min_models=1, needs=frozenset({Need.GENERATOR, Need.CALIBRATION}),
    doc="APL (reconstruction of Kong et al.): importance-based drop rates and per-partition softmax weights",
    prepare=prepare_apl,
)
