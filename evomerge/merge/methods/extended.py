"""Registry entries of the methods mergekit 0.1.5 has beyond the classic set: DELLA, SCE, NuSLERP, Multi-SLERP,
Karcher, NearSwap, Arcee Fusion, RAM, RAM+ and passthrough (layer stacking).

Each entry follows mergekit's semantics (and the method's paper where mergekit follows it); every deliberate
difference is an option or is named in the entry's doc and the kernel's docstring. Parameters are numbers
that may vary per layer (search genes); options are constants.
"""

from __future__ import annotations

from evomerge.merge.kernels.della import della, della_linear
from evomerge.merge.kernels.magprune import RESCALES
from evomerge.merge.kernels.pairwise import arcee_fusion, nearswap
from evomerge.merge.kernels.passthrough import passthrough
from evomerge.merge.kernels.ram import ram, ramplus_tl
from evomerge.merge.kernels.sce import sce
from evomerge.merge.kernels.sphere import karcher, multislerp, nuslerp
from evomerge.merge.methods.builtin import (
    _LAMBDA,
    _NORMALIZE_F,
    _NORMALIZE_T,
    _SIGN_RULE,
    _VARIANT,
    _WEIGHT,
    _ZERO_SIGN,
)
from evomerge.merge.methods.spec import MergeMethod, Need, OptionSpec, ParamSpec

_DELLA_DENSITY = ParamSpec(
    "density", 0.5, 0.0, 1.0, True,
    "mean keep probability of each delta entry (mergekit's default 1.0 keeps everything; evomerge's 0.5 as DARE)",
)
_EPSILON = ParamSpec(
    "epsilon", 0.15, 0.0, 1.0, True,
    "half-width of the keep probabilities: from density - epsilon (smallest) to density + epsilon (largest)",
)
_DELLA_RESCALE = OptionSpec(
    "rescale", "inverse_probability", RESCALES,
    "survivors divided by their keep probability (DELLA paper and code), the L1 norm restored (mergekit's "
    "rescale: true; a mergekit config without rescale reads as l1_norm), or none",
)
_DELLA_DOC = ("differs from mergekit: keep probabilities clipped to [0, 1] (mergekit refuses density +- epsilon "
              "outside (0, 1)); rescale default inverse_probability (DELLA paper and code; mergekit's L1 restore "
              "is rescale: l1_norm); magnitude ties ranked by index; a one-entry row keeps with probability density")
_RAM_EPSILON = ParamSpec("epsilon", 1e-5, 0.0, None, False, "a task-vector entry is active where |tau| > epsilon")
_SPHERE_WEIGHT = ParamSpec(
    "weight", 1.0, None, None, True,
    "per-model weight (nuslerp: t = w1 / (w0 + w1); multislerp: barycentric weights, normalized by default)",
)

METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        "della", della, (_WEIGHT, _DELLA_DENSITY, _EPSILON, _LAMBDA),
        (_NORMALIZE_T, _DELLA_RESCALE, _SIGN_RULE, _ZERO_SIGN, _VARIANT),
        needs_base=True, needs=frozenset({Need.GENERATOR}),
        doc="DELLA: MAGPRUNE (random drop, small magnitudes more often, per row), then TIES sign election; "
            + _DELLA_DOC,
    ),
    MergeMethod(
        "della_linear", della_linear, (_WEIGHT, _DELLA_DENSITY, _EPSILON, _LAMBDA),
        (_NORMALIZE_F, _DELLA_RESCALE),
        needs_base=True, needs=frozenset({Need.GENERATOR}),
        doc="DELLA's MAGPRUNE, then task arithmetic; " + _DELLA_DOC,
    ),
    MergeMethod(
        "sce", sce,
        (ParamSpec("select_topk", 1.0, 0.0, 1.0, False,
                   "fraction of the entries (of non-zero variance across models) kept, by variance"),),
        (OptionSpec("uniform_below", 1e-6, None,
                    "weights are uniform when the models' mean squared deltas sum below this (mergekit: 1e-6, "
                    "under which real fine-tunes often fall; 0 weights by the squares as the paper)"),),
        needs_base=True,
        doc="SCE: select high-variance entries, weight models by their squared deltas, erase sign conflicts; "
            "variance ties at the selection cut broken by index (mergekit: arbitrarily)",
    ),
    MergeMethod(
        "nuslerp", nuslerp, (_SPHERE_WEIGHT,),
        (OptionSpec("nuslerp_flatten", True, None, "one angle for the whole tensor (else per row or column)"),
         OptionSpec("nuslerp_row_wise", False, None, "without flatten: one angle per column (mergekit's name)")),
        min_models=2, max_models=2, base_optional=True,
        doc="SLERP of two models at t = w1 / (w0 + w1); with base_model, of their task vectors (added to the base)",
    ),
    MergeMethod(
        "multislerp", multislerp, (_SPHERE_WEIGHT,),
        (OptionSpec("normalize_weights", True, None, "divide the weights by their sum"),
         OptionSpec("eps", 1e-8, None, "added to norms (mergekit's eps)")),
        min_models=1, base_optional=True,
        doc="barycentric interpolation of several models on the hypersphere (tangent-space mean); with "
            "base_model, of their task vectors; evomerge raises on weights summing to 0 (mergekit divides by 0)",
    ),
    MergeMethod(
        "karcher", karcher,
        (ParamSpec("weight", 1.0, 0.0, None, True,
                   "per-model weight of the mean (evomerge extension: mergekit weights every model equally)"),),
        (OptionSpec("max_iter", 10, None, "Riemannian gradient steps at most"),
         OptionSpec("tol", 1e-5, None, "stop when a step is shorter; inputs with a smaller norm are left out")),
        min_models=2, base_as_input=True,
        doc="Karcher (Frechet) mean of the models' directions, scaled by their mean norm; base_model, if given, "
            "is one of the models (as mergekit)",
    ),
    MergeMethod(
        "nearswap", nearswap,
        (ParamSpec("t", 1e-4, 0.0, None, False,
                   "distance below which an entry becomes the model's (mergekit requires it; no default there)"),),
        (), needs_base=True, min_models=1, max_models=1, elementwise=True,
        doc="NearSwap: take the model's value where it is within t of the base, else move t towards it",
    ),
    MergeMethod(
        "arcee_fusion", arcee_fusion, (), (), needs_base=True, min_models=1, max_models=1,
        doc="Arcee Fusion: keep the model's changes whose importance (|delta| x row KL) exceeds median + 1.5 IQR; "
            "exact quartiles (mergekit samples 1M entries, unseeded, on larger tensors)",
    ),
    MergeMethod(
        "ram", ram, (_RAM_EPSILON,), (), needs_base=True, elementwise=True,
        doc="RAM: entries one model changes keep that change, entries several change get their mean",
    ),
    MergeMethod(
        "ramplus_tl", ramplus_tl,
        (_RAM_EPSILON,
         ParamSpec("r", 0.1, 0.0, None, False, "strength of the unique-entry boost"),
         ParamSpec("alpha", 0.2, 0.0, None, False, "cap of the shared/unique ratio in the boost")),
        (), needs_base=True,
        doc="RAM+ (tensor-local): RAM with each model's unique changes scaled by 1 + r * min(shared/unique, alpha)",
    ),
    MergeMethod(
        "passthrough", passthrough,
        (ParamSpec("scale", 1.0, None, None, True, "multiplies the tensor (mergekit's scale)"),),
        (), min_models=1, max_models=1, elementwise=True, stacks_layers=True,
        doc="one model's tensors, optionally scaled; with slices, stacks layer ranges of models (the layer "
            "count changes; embeddings from the first slice's model, final norm and head from the last one's); "
            "base_model, if given, only supplies the config and tokenizer of a stack; differs from mergekit: a "
            "per-layer layer_types list in the config is rebuilt for the stack (mergekit keeps the source's)",
    ),
)

BY_NAME: dict[str, MergeMethod] = {m.name: m for m in METHODS}
