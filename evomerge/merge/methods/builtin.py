"""The plain methods' registry entries: mergekit's linear, task-arithmetic, TIES, DARE, Breadcrumbs, SLERP,
Model Stock family and PEFT's magnitude_prune, each with its parameters (ranges, defaults) and options.
"""

from __future__ import annotations

from evomerge.merge.kernels.crossover import crossover, crossover_coefficients
from evomerge.merge.kernels.linear import linear, linear_coefficients
from evomerge.merge.kernels.model_stock import model_stock
from evomerge.merge.kernels.slerp import slerp
from evomerge.merge.kernels.task_arithmetic import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    magnitude_prune,
    task_arithmetic,
    task_arithmetic_coefficients,
    ties,
)
from evomerge.merge.methods.spec import MergeMethod, Need, OptionSpec, ParamSpec

_WEIGHT = ParamSpec("weight", 1.0, None, None, True, "per-model weight (mergekit 'weight'; negative allowed)")
_LAMBDA = ParamSpec("lambda", 1.0, None, None, False, "scale of the merged task vector: base + lambda * merged")


def _density(default: float, doc: str) -> ParamSpec:
    return ParamSpec("density", default, 0.0, 1.0, True, doc)


_NORMALIZE_T = OptionSpec("normalize", True, None, "divide by the summed weights (of the agreeing models for TIES)")
_NORMALIZE_F = OptionSpec("normalize", False, None, "divide by the summed weights (of the agreeing models for TIES)")
_SIGN_RULE = OptionSpec(
    "sign_rule", "mass", ("mass", "majority_count"), "elect sgn(sum tau) (mass) or the majority of signs (count)"
)
_ZERO_SIGN = OptionSpec(
    "zero_sign", "positive", ("positive", "global_majority"),
    "elected sign where the sum is exactly 0: + (mergekit) or the majority sign (official TIES code)",
)
_VARIANT = OptionSpec(
    "variant", "mergekit", ("mergekit", "paper"),
    "mergekit: weight before the election, normalize by agreeing weights; paper: elect unweighted, mean by count",
)
_RESCALE_CHOICES = ("none", "inverse_density", "l1_norm")


def _rescale(default: str) -> OptionSpec:
    return OptionSpec(
        "rescale", default, _RESCALE_CHOICES,
        "after sparsifying: divide by density (DARE paper), restore the L1 norm (mergekit rescale), or none",
    )


_GAMMA = ParamSpec("gamma", 0.01, 0.0, 1.0, True, "fraction of the LARGEST magnitudes dropped as outliers")
_BC_DENSITY = _density(0.9, "fraction kept after dropping outliers and the smallest magnitudes")

METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "linear", linear, (_WEIGHT,), (_NORMALIZE_T,), needs_base=False, min_models=1,
        elementwise=True, coefficients=linear_coefficients,
        doc="weighted average of the models (model soup); base_model is not an input",
    ),
    MergeMethod(
        "task_arithmetic", task_arithmetic, (_WEIGHT, _LAMBDA), (_NORMALIZE_F,), needs_base=True,
        elementwise=True, streams=True, coefficients=task_arithmetic_coefficients,
        doc="base + lambda * sum_t w_t (theta_t - base)",
    ),
    MergeMethod(
        "ties", ties,
        (_WEIGHT, _density(0.2, "fraction of each task vector KEPT (top magnitudes; mergekit default 1.0)"), _LAMBDA),
        (
            _NORMALIZE_T,
            OptionSpec("trim_scope", "tensor", ("tensor", "global"),
                       "top-k per tensor (mergekit) or over the whole model (official TIES; needs a prepass)"),
            _SIGN_RULE, _ZERO_SIGN, _VARIANT, _rescale("none"),
        ),
        needs_base=True, streams=True,
        doc="TIES: trim to top-density magnitudes, elect signs, disjoint mean",
    ),
    MergeMethod(
        "dare_linear", dare_linear,
        (_WEIGHT, _density(0.5, "keep probability of each delta entry (1 - DARE's drop rate p)"), _LAMBDA),
        (_NORMALIZE_F, _rescale("inverse_density")),
        needs_base=True, needs=frozenset({Need.GENERATOR}), streams=True,
        doc="DARE random drop and rescale, then task arithmetic",
    ),
    MergeMethod(
        "dare_ties", dare_ties,
        (_WEIGHT, _density(0.5, "keep probability of each delta entry (1 - DARE's drop rate p)"), _LAMBDA),
        (_NORMALIZE_F, _rescale("inverse_density"), _SIGN_RULE, _ZERO_SIGN, _VARIANT),
        needs_base=True, needs=frozenset({Need.GENERATOR}), streams=True,
        doc="DARE random drop and rescale, then TIES sign election",
    ),
    MergeMethod(
        "magnitude_prune", magnitude_prune,
        (_WEIGHT, _density(0.2, "fraction of each task vector KEPT (top magnitudes)"), _LAMBDA),
        (_NORMALIZE_F, _rescale("none")), needs_base=True, streams=True,
        doc="PEFT's magnitude_prune: trim each task vector to its top-density magnitudes, then task arithmetic",
    ),
    MergeMethod(
        "breadcrumbs", breadcrumbs, (_WEIGHT, _BC_DENSITY, _GAMMA, _LAMBDA), (_NORMALIZE_F, _rescale("none")),
        needs_base=True, streams=True,
        doc="Model Breadcrumbs: drop outliers and small deltas, then task arithmetic",
    ),
    MergeMethod(
        "breadcrumbs_ties", breadcrumbs_ties, (_WEIGHT, _BC_DENSITY, _GAMMA, _LAMBDA),
        (_NORMALIZE_F, _rescale("none"), _SIGN_RULE, _ZERO_SIGN, _VARIANT),
        needs_base=True, streams=True,
        doc="Model Breadcrumbs sparsification, then TIES sign election",
    ),
    MergeMethod(
        "slerp", slerp,
        (ParamSpec("t", 0.5, 0.0, 1.0, False, "interpolation position: 0 = first model (the base), 1 = second"),),
        (), needs_base=False, min_models=2, max_models=2, base_as_input=True,
        doc="spherical interpolation of two models (base_model, if given, is the t = 0 end)",
    ),
    MergeMethod(
        "crossover", crossover,
        (ParamSpec("boundary", 0.5, 0.0, 1.0, False, "split point as a depth in the model (0: embedding, 1: head)"),
         ParamSpec("w", 0.5, 0.0, 1.0, False, "weight of the first model before the split (1 - w after it)")),
        (), needs_base=False, min_models=2, max_models=2, elementwise=True, positional=True,
        coefficients=crossover_coefficients,
        doc="split-point crossover (M2N2): w * A + (1 - w) * B up to the boundary, (1 - w) * A + w * B after it",
    ),
    MergeMethod(
        "model_stock", model_stock, (),
        (OptionSpec("filter_wise", False, None, "cosines per row instead of per tensor"),),
        needs_base=True, min_models=2,
        doc="Model Stock: interpolate base and the models' mean by their task vectors' mean cosine",
    ),
)

BY_NAME: dict[str, MergeMethod] = {m.name: m for m in METHODS}
