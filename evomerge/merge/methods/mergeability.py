"""Method ``mergeability_weighted`` (seed c): task-arithmetic weights from the base model's knowledge.

The kernel (:func:`evomerge.merge.kernels.mergeability.mergeability_weighted`) takes a ``base_score`` per
model; models without one get it from the caller (``MethodContext.base_scores``: a search measures the base
on its fitness once; ``evomerge merge`` measures it on the spec named by ``options.fitness``).
"""

from __future__ import annotations

from evomerge.errors import ConfigError
from evomerge.merge.kernels.mergeability import mergeability_weighted
from evomerge.merge.methods.spec import MergeMethod, MethodContext, Need, OptionSpec, ParamSpec, Prepared
from evomerge.merge.recipe import Recipe


def missing_base_scores(recipe: Recipe) -> list[str]:
    """The recipe's models with no ``base_score`` parameter of their own (none when a global one is set)."""
    if "base_score" in recipe.parameters:
        return []
    return [m.model for m in recipe.models if "base_score" not in m.parameters and m.model != recipe.base_model]


def needs_of(recipe: Recipe) -> frozenset[Need]:
    return frozenset({Need.BASE_SCORES}) if missing_base_scores(recipe) else frozenset()


def prepare_mergeability(ctx: MethodContext) -> Prepared:
    """The caller's base scores, per kernel input, for the models that have no ``base_score`` parameter."""
    if not missing_base_scores(ctx.recipe):
        return {}
    known = dict(ctx.base_scores or {})
    need = [k for k in ctx.plan.input_keys if k not in known]
    if need:
        raise ConfigError(
            f"mergeability_weighted: no base_score for {', '.join(need)}; set base_score per model, or "
            "options.fitness to a fitness spec whose tasks are named after the models (a search measures them)"
        )
    return {"*": {"base_scores": [known[k] for k in ctx.plan.input_keys]}}


METHOD = MergeMethod(
    "mergeability_weighted", mergeability_weighted,
    (
        ParamSpec("base_score", None, 0.0, 1.0, True,
                  "the base model's score on this model's task (unset: measured by the caller)"),
        ParamSpec("tau", 0.1, 1e-6, None, False,
                  "softmax temperature over (1 - base score); large tau -> uniform mean of task vectors"),
    ),
    (
        OptionSpec("fitness", "", None,
                   "fitness spec used to measure missing base scores (tasks named after the models)"),
    ),
    needs_base=True, min_models=1, needs=frozenset({Need.BASE_SCORES}), needs_of=needs_of,
    doc="Will-it-Merge weighting: base + sum_t softmax((1 - base_score_t)/tau) tau_t",
    prepare=prepare_mergeability,
)
