"""Model kinship: similarity of task vectors against a common base, streamed tensor by tensor.

Kinship(θ1, θ2 | θ0) = sim(τ1, τ2) with τ_t = θ_t − θ0 over the WHOLE model's concatenated deltas (seed
paper "Exploring Model Kinship for Merging Large Language Models"). Nothing model-sized is flattened: each
tensor of each model is read once, its deltas against the base are stacked into a ``(T, m)`` float64 block
and folded into a Gram accumulator (n, Σ_i x_t, Σ_i x_s x_t). Every pairwise moment set
(n, Σx, Σy, Σx², Σy², Σxy) is a slice of that accumulator, so all pairs of T models cost one pass.

Metrics (``METRICS``): ``pcc`` (Pearson), ``cos`` (signed cosine), ``abs_cos`` (|cos|, what the paper's code
reports), ``ed`` (Euclidean distance; a DISTANCE: larger means less related). Degenerate inputs (a zero task
vector, a constant one for PCC) give NaN rather than an arbitrary number.

Merged candidates of a linear recipe (``linear`` with weights summing to one, ``task_arithmetic``) have a task
vector that is a per-tensor linear combination of the originals' task vectors, so their kinship follows
exactly from per-tensor Gram matrices of the originals (:class:`TaskVectorGram`, :func:`linear_form`) with no
weights materialized; other recipes must be materialized (any ``TensorSource`` works: a folder or a dict).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.methods.registry import get_method
from evomerge.merge.plan import MergePlan
from evomerge.merge.recipe import Recipe
from evomerge.models.adapter import open_weights
from evomerge.models.folder import ModelFolder
from evomerge.models.layers import LayerMap

METRICS: tuple[str, ...] = ("pcc", "cos", "abs_cos", "ed")
# Metrics where a larger value means LESS related (lowest kinship = largest value).
DISTANCE_METRICS: frozenset[str] = frozenset({"ed"})
# Elements per float64 block: bounds the temporary memory of one tensor's contribution (T x 4M x 8 bytes).
_CHUNK = 1 << 22
_GENERIC_LAYERS = LayerMap.generic()


@runtime_checkable
class TensorSource(Protocol):
    """Anything that serves tensors by name: a :class:`~evomerge.models.ModelFolder` or :class:`DictSource`."""

    @property
    def tensor_names(self) -> Sequence[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class DictSource:
    """A state dict as a :class:`TensorSource` (materialized merged candidates, tests)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "<state dict>",
                 config: Mapping[str, Any] | None = None) -> None:
        self._tensors = dict(tensors)
        self.path = name
        self.config = dict(config or {})

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelError(f"model {self.path} has no tensor {name!r}") from None

    def __repr__(self) -> str:
        return f"DictSource({self.path!r}, tensors={len(self._tensors)})"


SourceLike = str | os.PathLike[str] | TensorSource | Mapping[str, torch.Tensor]


def open_source(source: SourceLike, name: str | None = None, base: Any = None) -> Any:
    """A path opens a :class:`ModelFolder`, or a LoRA adapter folder over ``base`` (``BASE+ADAPTER`` too); a
    mapping becomes a :class:`DictSource`; sources pass through."""
    if isinstance(source, (str, os.PathLike)):
        return open_weights(source, base=base if isinstance(base, ModelFolder) else None)
    if isinstance(source, Mapping):
        return DictSource(source, name or "<state dict>")
    if isinstance(source, TensorSource):
        return source
    raise ConfigError(f"kinship: cannot read tensors from {type(source).__name__} (expected a path or a state dict)")


def _label(source: Any) -> str:
    return str(getattr(source, "path", source))


# --------------------------------------------------------------------------------------------- moments


@dataclass(frozen=True)
class PairMoments:
    """The six sums a global similarity needs, in float64."""

    n: float
    sx: float
    sy: float
    sxx: float
    syy: float
    sxy: float

    def pcc(self) -> float:
        """(nΣxy − ΣxΣy)/√((nΣx² − (Σx)²)(nΣy² − (Σy)²)); NaN when a task vector is constant."""
        vx = self.n * self.sxx - self.sx * self.sx
        vy = self.n * self.syy - self.sy * self.sy
        if self.n <= 0 or vx <= 0 or vy <= 0:
            return math.nan
        return _clip((self.n * self.sxy - self.sx * self.sy) / math.sqrt(vx * vy))

    def cos(self) -> float:
        """Σxy/√(Σx²Σy²), signed; NaN when a task vector is zero."""
        if self.sxx <= 0 or self.syy <= 0:
            return math.nan
        return _clip(self.sxy / math.sqrt(self.sxx * self.syy))

    def abs_cos(self) -> float:
        """|cos|: the paper code's variant (never negative)."""
        return abs(self.cos())

    def ed(self) -> float:
        """√(Σx² + Σy² − 2Σxy) (clamped at 0 against rounding; NaN stays NaN)."""
        value = self.sxx + self.syy - 2.0 * self.sxy
        return value if math.isnan(value) else math.sqrt(max(0.0, value))

    def metric(self, name: str) -> float:
        if name not in METRICS:
            raise ConfigError(f"unknown kinship metric {name!r} (known: {', '.join(METRICS)})")
        return float(getattr(self, name)())

    def all(self) -> dict[str, float]:
        return {m: self.metric(m) for m in METRICS}


def _clip(value: float) -> float:
    """Clamp rounding beyond [-1, 1]; NaN stays NaN (``max(-1, min(1, nan))`` would be 1.0: "identical")."""
    if math.isnan(value):
        return value
    return max(-1.0, min(1.0, value))


class GramAccumulator:
    """n, Σ_i x_t and Σ_i x_s x_t for T task vectors, in float64; pair moments are slices of it."""

    def __init__(self, size: int) -> None:
        self.n = 0
        self.sums = np.zeros(size, dtype=np.float64)
        self.gram = np.zeros((size, size), dtype=np.float64)

    @property
    def size(self) -> int:
        return int(self.sums.shape[0])

    def add(self, deltas: torch.Tensor) -> None:
        """Fold in a ``(T, m)`` block of task-vector entries (converted to float64 chunk by chunk)."""
        if deltas.dim() != 2 or deltas.shape[0] != self.size:
            raise ValueError(f"expected a ({self.size}, m) block, got {tuple(deltas.shape)}")
        m = deltas.shape[1]
        for start in range(0, m, _CHUNK):
            block = deltas[:, start:start + _CHUNK].to(torch.float64)
            self.n += block.shape[1]
            self.sums += block.sum(dim=1).cpu().numpy()
            self.gram += (block @ block.T).cpu().numpy()

    def merge(self, other: GramAccumulator) -> None:
        self.n += other.n
        self.sums += other.sums
        self.gram += other.gram

    def pair(self, i: int, j: int) -> PairMoments:
        return PairMoments(float(self.n), float(self.sums[i]), float(self.sums[j]), float(self.gram[i, i]),
                           float(self.gram[j, j]), float(self.gram[i, j]))

    def matrix(self, metric: str) -> np.ndarray:
        """(T, T) metric values (diagonal: self-similarity, 0 for ED)."""
        out = np.empty((self.size, self.size))
        for i in range(self.size):
            for j in range(self.size):
                out[i, j] = self.pair(i, j).metric(metric)
        return out


# ------------------------------------------------------------------------------------------- streaming


def layer_label(name: str, layer_map: LayerMap | None) -> str:
    """Group of a tensor in the per-layer breakdown: ``layer.N`` inside the stack, else its kind."""
    lm = layer_map if layer_map is not None else _GENERIC_LAYERS
    layer = lm.layer_of(name)
    if layer is not None:
        return f"layer.{layer}"
    return str(lm.kind_of(name)) if layer_map is not None else "other"


def _label_key(label: str) -> tuple[int, int, str]:
    if label.startswith("layer."):
        return (1, int(label.split(".", 1)[1]), "")
    order = {"embedding": 0, "head": 2}
    return (order.get(label, 3), 0, label)


def _layer_map_of(source: Any) -> LayerMap | None:
    config = getattr(source, "config", None)
    if not config:
        return None
    try:
        return LayerMap.from_config(config)
    except ModelError:
        return None


def _read(source: Any, name: str) -> torch.Tensor:
    try:
        return source.get(name)
    except ModelError:
        raise
    except KeyError:
        raise ModelError(f"model {_label(source)} has no tensor {name!r}") from None


@dataclass
class KinshipMatrix:
    """Pairwise kinship of ``names`` against one base; global and (optionally) per layer group."""

    names: list[str]
    base: str
    total: GramAccumulator
    per_layer: dict[str, GramAccumulator] = field(default_factory=dict)
    tensors: dict[str, GramAccumulator] = field(default_factory=dict)  # per tensor, when kept
    tensor_layers: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(f"kinship: no model named {name!r} (known: {self.names})") from None

    def value(self, a: str | int, b: str | int, metric: str = "pcc") -> float:
        i = a if isinstance(a, int) else self.index(a)
        j = b if isinstance(b, int) else self.index(b)
        return self.total.pair(i, j).metric(metric)

    def matrix(self, metric: str = "pcc") -> np.ndarray:
        return self.total.matrix(metric)

    def layer_values(self, a: str | int, b: str | int, metric: str = "pcc") -> dict[str, float]:
        """Per layer group (sorted: embedding, layers in order, head, others)."""
        i = a if isinstance(a, int) else self.index(a)
        j = b if isinstance(b, int) else self.index(b)
        return {lab: self.per_layer[lab].pair(i, j).metric(metric)
                for lab in sorted(self.per_layer, key=_label_key)}

    def gram(self) -> TaskVectorGram:
        """The per-tensor Grams (needs ``keep_tensors=True``) for exact kinship of linear recipes."""
        if not self.tensors:
            raise ConfigError("kinship: per-tensor Grams were not kept (pass keep_tensors=True)")
        return TaskVectorGram(list(self.names), dict(self.tensors), dict(self.tensor_layers))


def kinship_matrix(
    models: Sequence[SourceLike],
    base: SourceLike,
    *,
    names: Sequence[str] | None = None,
    per_layer: bool = False,
    keep_tensors: bool = False,
    vocab_policy: str = "refuse",
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> KinshipMatrix:
    """Stream every model tensor by tensor (each tensor read once per model) into one Gram accumulator.

    Tensors are the base's floating-point tensors; every model must hold each with the same shape, except
    vocabulary rows under ``vocab_policy="slice_to_base"`` (rows beyond the base's are ignored). A tied
    head that a folder leaves out is served from its embedding by :meth:`ModelFolder.get`.
    """
    if vocab_policy not in ("refuse", "slice_to_base"):
        raise ConfigError(f"kinship: vocab_policy must be 'refuse' or 'slice_to_base', got {vocab_policy!r}")
    if not models:
        raise ConfigError("kinship: no models given")
    base_src = open_source(base, "base")
    sources = [open_source(m, names[i] if names else None, base=base_src) for i, m in enumerate(models)]
    labels = list(names) if names is not None else [_label(s) for s in sources]
    if len(labels) != len(sources):
        raise ConfigError(f"kinship: {len(labels)} names for {len(sources)} models")
    layer_map = _layer_map_of(base_src)
    t = len(sources)
    total = GramAccumulator(t)
    groups: dict[str, GramAccumulator] = {}
    tensors: dict[str, GramAccumulator] = {}
    tensor_layers: dict[str, str] = {}
    skipped: list[str] = []
    names_list = list(base_src.tensor_names)
    for k, name in enumerate(names_list):
        b = _read(base_src, name).to(device)
        if not b.is_floating_point():
            skipped.append(name)
            continue
        raw: list[torch.Tensor] = []
        for row, src in enumerate(sources):
            x = _read(src, name).to(device)
            if tuple(x.shape) != tuple(b.shape):
                rows_ok = (vocab_policy == "slice_to_base" and x.dim() >= 1 and x.dim() == b.dim()
                           and x.shape[0] > b.shape[0] and tuple(x.shape[1:]) == tuple(b.shape[1:]))
                if not rows_ok:
                    more_rows = (x.dim() >= 1 and x.dim() == b.dim() and x.shape[0] > b.shape[0]
                                 and tuple(x.shape[1:]) == tuple(b.shape[1:]))
                    hint = (" (a larger vocabulary: pass --vocab-policy slice_to_base to compare the base's rows)"
                            if more_rows and vocab_policy != "slice_to_base" else
                            " (the models have different architectures: kinship needs fine-tunes of one base)")
                    raise ModelError(f"kinship: tensor {name!r} has shape {tuple(x.shape)} in {labels[row]} but "
                                     f"{tuple(b.shape)} in the base {_label(base_src)}" + hint)
                x = x[: b.shape[0]]
            raw.append(x.reshape(-1))
        # float64 deltas chunk by chunk: temporary memory T x _CHUNK x 8 bytes, whatever the tensor's size
        acc = GramAccumulator(t)
        flat_b = b.reshape(-1)
        for start in range(0, flat_b.numel(), _CHUNK):
            b64 = flat_b[start:start + _CHUNK].to(torch.float64)
            block = torch.empty((t, b64.numel()), dtype=torch.float64, device=device)
            for row, x in enumerate(raw):
                torch.sub(x[start:start + _CHUNK].to(torch.float64), b64, out=block[row])
            acc.add(block)
        del raw
        total.merge(acc)
        label = layer_label(name, layer_map)
        if per_layer:
            groups.setdefault(label, GramAccumulator(t)).merge(acc)
        if keep_tensors:
            tensors[name] = acc
            tensor_layers[name] = label
        if progress is not None:
            progress(k + 1, len(names_list))
    if total.n == 0:
        raise ModelError(f"kinship: the base {_label(base_src)} has no floating-point tensors")
    return KinshipMatrix(labels, _label(base_src), total, groups, tensors, tensor_layers, skipped)


def kinship(
    model_a: SourceLike, model_b: SourceLike, base: SourceLike, metric: str = "pcc", **kwargs: Any
) -> float:
    """One global kinship value between two models (see :func:`kinship_matrix` for the options)."""
    if metric not in METRICS:
        raise ConfigError(f"unknown kinship metric {metric!r} (known: {', '.join(METRICS)})")
    return kinship_matrix([model_a, model_b], base, **kwargs).value(0, 1, metric)


def is_distance(metric: str) -> bool:
    """True for metrics where larger means less related (ED)."""
    return metric in DISTANCE_METRICS


def relatedness(value: float, metric: str) -> float:
    """A value where larger always means MORE related (ED negated), for ranking."""
    return -value if is_distance(metric) else value


# ------------------------------------------------------------------------------------ recipe algebra

# A model's task vector as a linear combination of the originals': per tensor, one coefficient per original.
LinearForm = dict[str, np.ndarray]


@dataclass
class TaskVectorGram:
    """Per-tensor Gram matrices of the ORIGINAL models' task vectors (the basis of every linear recipe)."""

    keys: list[str]
    tensors: dict[str, GramAccumulator]
    tensor_layers: dict[str, str] = field(default_factory=dict)

    def unit(self, key: str) -> LinearForm:
        """The linear form of original ``key`` itself (coefficient 1 on its own task vector)."""
        if key not in self.keys:
            raise ConfigError(f"kinship: {key!r} is not one of the originals {self.keys}")
        v = np.zeros(len(self.keys))
        v[self.keys.index(key)] = 1.0
        return {name: v for name in self.tensors}

    def moments(self, a: LinearForm, b: LinearForm, group: str | None = None) -> PairMoments:
        """Exact moments of two linear combinations: Σ_k aₖᵀGₖbₖ etc. (``group``: one layer label only)."""
        n = sx = sy = sxx = syy = sxy = 0.0
        for name, acc in self.tensors.items():
            if group is not None and self.tensor_layers.get(name) != group:
                continue
            ca, cb = a[name], b[name]
            n += acc.n
            sx += float(ca @ acc.sums)
            sy += float(cb @ acc.sums)
            sxx += float(ca @ acc.gram @ ca)
            syy += float(cb @ acc.gram @ cb)
            sxy += float(ca @ acc.gram @ cb)
        return PairMoments(n, sx, sy, sxx, syy, sxy)

    def value(self, a: LinearForm, b: LinearForm, metric: str = "pcc") -> float:
        return self.moments(a, b).metric(metric)


def linear_form(
    recipe: Recipe,
    gram: TaskVectorGram,
    forms: Mapping[str, LinearForm],
    base_key: str,
    layer_map: LayerMap,
    *,
    tol: float = 1e-9,
) -> LinearForm | None:
    """The candidate's task vector as a per-tensor combination of the originals', or None when not exact.

    Exact for linear methods (their registry entry declares ``coefficients``): ``task_arithmetic``
    (τ = λ Σ w_t τ_t, optionally normalized) and ``linear`` when its effective weights sum to one on every
    tensor (θ = Σ w_t θ_t; otherwise a multiple of θ0 remains). ``forms`` gives the forms of the recipe's
    inputs that are not originals (merged parents); inputs with no form (non-linear ancestors) make the result
    None. The recipe's base must be ``base_key``.
    """
    method = get_method(recipe.method)
    if not method.is_linear or (method.needs_base and recipe.base_model != base_key):
        return None
    plan = MergePlan.of(recipe, method, layer_map)
    input_forms: list[LinearForm | None] = []
    for key in plan.input_keys:
        if key == base_key:
            input_forms.append(None)  # zero task vector
        elif key in forms:
            input_forms.append(forms[key])
        elif key in gram.keys:
            input_forms.append(gram.unit(key))
        else:
            return None
    out: LinearForm = {}
    zero = np.zeros(len(gram.keys))
    for name in gram.tensors:
        try:
            coef = plan.coefficients(name)
        except ValueError:  # linear weights summing to 0 under normalize: no such merge
            return None
        if coef is None or abs(coef.beta - 1.0) > tol:
            return None  # θ = β θ0 + Σ c τ with β ≠ 1: not in the span of the task vectors
        acc = zero.copy()
        for c, form in zip(coef.coefficients, input_forms):
            if form is not None and c != 0.0:
                acc = acc + c * form[name]
        out[name] = acc
    return out


def format_matrix(matrix: np.ndarray, names: Sequence[str], metric: str, digits: int = 4) -> str:
    """A plain-text table of a kinship matrix (short names)."""
    short = [Path(n).name or str(n) for n in names]
    width = max(8, max(len(s) for s in short) + 1, digits + 4)
    lines = [f"{metric:<{width}}" + "".join(f"{s:>{width}}" for s in short)]
    for s, row in zip(short, matrix):
        lines.append(f"{s:<{width}}" + "".join(f"{v:>{width}.{digits}f}" for v in row))
    return "\n".join(lines)


def iter_pairs(items: Iterable[str]) -> list[tuple[str, str]]:
    """Unordered pairs in a stable order (i < j)."""
    seq = list(items)
    return [(seq[i], seq[j]) for i in range(len(seq)) for j in range(i + 1, len(seq))]
