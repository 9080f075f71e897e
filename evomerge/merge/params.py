"""Per-layer parameter values: a scalar, a list interpolated across layers, or tensor-name filters.

Semantics follow mergekit so recipes move between the two: a list ``[v0, ..., vn]`` is evaluated at
``u = layer / (L - 1)`` (``u = 0`` for tensors outside the layer stack, and for L = 1) by linear
interpolation between neighbouring entries; filter entries are tried in order and the first whose filter
is a substring of the tensor name wins, an entry without filter (or ``"*"``) being the default.
A filter ``kind:NAME`` matches tensors of that kind from the layer map (attention, mlp, norm, embedding,
head, other), so one recipe serves every model family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError
from evomerge.files import refuse_unknown_keys

Scalar = float
Gradient = tuple[float, ...]


@dataclass(frozen=True)
class FilterEntry:
    """One conditional value: ``filter`` None matches every tensor."""

    filter: str | None
    values: Gradient  # length 1: a constant; longer: interpolated across layers

    def matches(self, tensor_name: str, tensor_kind: str | None) -> bool:
        if self.filter is None or self.filter == "*":
            return True
        if self.filter.startswith("kind:"):
            return tensor_kind == self.filter[5:]
        return self.filter in tensor_name


@dataclass(frozen=True)
class ParamValue:
    """A numeric parameter as written in a recipe, resolved per tensor by :meth:`resolve`."""

    entries: tuple[FilterEntry, ...]

    @staticmethod
    def constant(value: float) -> ParamValue:
        return ParamValue((FilterEntry(None, (float(value),)),))

    @staticmethod
    def per_layer(values: Sequence[float]) -> ParamValue:
        return ParamValue((FilterEntry(None, tuple(float(v) for v in values)),))

    @staticmethod
    def parse(spec: Any, where: str = "parameter") -> ParamValue:
        """Read the YAML form: number, list of numbers, or list of ``{filter, value}`` mappings."""
        if isinstance(spec, ParamValue):
            return spec
        if isinstance(spec, bool) or spec is None:
            raise ConfigError(f"{where}: expected a number, a list of numbers or filter entries, got {spec!r}")
        if isinstance(spec, (int, float)):
            return ParamValue.constant(float(spec))
        if isinstance(spec, Mapping):
            spec = [spec]
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            if not spec:
                raise ConfigError(f"{where}: empty list")
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
                return ParamValue.per_layer([float(v) for v in spec])
            entries = []
            for i, item in enumerate(spec):
                if not isinstance(item, Mapping) or "value" not in item:
                    raise ConfigError(f"{where}[{i}]: expected a mapping with 'value' (and optional 'filter'), got {item!r}")
                refuse_unknown_keys(item, ("filter", "value"), f"{where}[{i}]")
                inner = ParamValue.parse(item["value"], f"{where}[{i}].value")
                if len(inner.entries) != 1 or inner.entries[0].filter is not None:
                    raise ConfigError(f"{where}[{i}].value: nested filters are not supported")
                flt = item.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise ConfigError(f"{where}[{i}].filter: expected a string, got {flt!r}")
                entries.append(FilterEntry(flt, inner.entries[0].values))
            return ParamValue(tuple(entries))
        raise ConfigError(f"{where}: expected a number, a list of numbers or filter entries, got {spec!r}")

    def to_yaml(self) -> Any:
        """Inverse of :meth:`parse` (the compact form where possible)."""

        def plain(values: Gradient) -> Any:
            return values[0] if len(values) == 1 else list(values)

        if len(self.entries) == 1 and self.entries[0].filter is None:
            return plain(self.entries[0].values)
        out: list[dict[str, Any]] = []
        for e in self.entries:
            item: dict[str, Any] = {"value": plain(e.values)}
            if e.filter is not None:
                item = {"filter": e.filter, **item}
            out.append(item)
        return out

    def resolve(self, tensor_name: str, layer: int | None, num_layers: int, tensor_kind: str | None = None) -> float | None:
        """The value for one tensor, or None when no entry matches (the caller applies the default)."""
        for entry in self.entries:
            if entry.matches(tensor_name, tensor_kind):
                return interpolate(entry.values, layer_position(layer, num_layers))
        return None

def layer_position(layer: int | None, num_layers: int) -> float:
    """mergekit's u: layer/(L-1); 0 outside the layer stack (as mergekit 0.1.5 does for embed/norm/head)."""
    if layer is None:
        return 0.0
    if num_layers <= 1:
        return 1.0 if layer is not None and num_layers == 1 else 0.0
    return layer / (num_layers - 1)


def interpolate(values: Gradient, u: float) -> float:
    if len(values) == 1:
        return values[0]
    scaled = u * (len(values) - 1)
    i0 = min(int(scaled), len(values) - 1)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]
