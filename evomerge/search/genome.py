"""Genome <-> recipe: the nevergrad parametrization of a search space and its decoding into a :class:`Recipe`.

The parametrization is ``Dict(method=Choice([...]), <method>=Dict(<param>=Array(...)))`` with every gene's
bounds given in the constructor (so steps scale with the range). Each method has its own genes; only the
chosen method's genes reach the recipe. A gene holds one value per *slot* of the granularity (layer, layer
group, tensor kind, or one) and, for per-model parameters (weight, density), one row per fine-tune.

Decoding rounds values to ``DECIMALS`` so that recipes are stable text and identical recipes hash alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nevergrad as ng
import numpy as np

from evomerge.merge.methods.registry import get_method
from evomerge.merge.params import FilterEntry, ParamValue
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.search.space import Gene, Granularity, MethodSpace, Space

DECIMALS = 6


class Genome:
    """Builds the parametrization of a space and turns optimizer candidates into recipes."""

    def __init__(self, space: Space) -> None:
        self.methods: tuple[MethodSpace, ...] = space.methods
        self.granularity: Granularity = space.granularity
        self.num_layers = max(1, int(space.num_layers))
        self.fine_tunes: list[str] = list(space.models)
        self.seed = int(space.seed)

    # ------------------------------------------------------------------------------ layout

    @property
    def slots(self) -> int:
        """Values per gene along the network."""
        g = self.granularity
        if g.kind == "per_layer":
            return self.num_layers
        if g.kind == "layer_groups":
            return int(g.groups or 1)
        if g.kind == "tensor_kind":
            return len(g.kinds) + 1
        return 1

    def gene_shape(self, gene: Gene) -> tuple[int, ...]:
        return (len(self.fine_tunes), self.slots) if gene.per_model else (self.slots,)

    def parametrization(self, seed: int | None = None) -> Any:
        """A fresh, seeded nevergrad parametrization (bounds in the constructors)."""
        fields: dict[str, Any] = {}
        if len(self.methods) > 1:
            fields["method"] = ng.p.Choice([m.name for m in self.methods], deterministic=True)
        for m in self.methods:
            fields[m.name] = ng.p.Dict(**{
                g.param: ng.p.Array(init=np.full(self.gene_shape(g), (g.low + g.high) / 2.0), lower=g.low,
                                    upper=g.high)
                for g in m.genes
            })
        param = ng.p.Dict(**fields)
        param.random_state = np.random.RandomState(self.seed if seed is None else seed)
        return param

    def dimension(self) -> int:
        return int(self.parametrization().dimension)

    # ------------------------------------------------------------------------------ decoding

    def method_of(self, value: dict[str, Any]) -> MethodSpace:
        name = value.get("method", self.methods[0].name)
        return next(m for m in self.methods if m.name == name)

    def _param_value(self, values: Sequence[float], gene: Gene) -> ParamValue:
        vals = [float(np.clip(round(float(v), DECIMALS), gene.low, gene.high)) for v in values]
        g = self.granularity
        if g.kind == "per_model" or len(vals) == 1 and g.kind != "tensor_kind":
            return ParamValue.constant(vals[0])
        if g.kind == "per_layer":
            return ParamValue.per_layer(vals)
        if g.kind == "layer_groups":
            n, L = len(vals), self.num_layers
            expanded = [vals[min(n - 1, (layer * n) // L)] for layer in range(L)]
            if len(set(expanded)) == 1:
                return ParamValue.constant(expanded[0])
            return ParamValue.per_layer(expanded)
        # tensor_kind: one value per named kind, the last for every other tensor
        entries = [FilterEntry(f"kind:{k}", (v,)) for k, v in zip(g.kinds, vals)]
        entries.append(FilterEntry(None, (vals[-1],)))
        return ParamValue(tuple(entries))

    def decode(self, value: dict[str, Any]) -> Recipe:
        """The recipe a candidate's value stands for (model keys: ``base`` and the fine-tune names)."""
        m = self.method_of(value)
        genes = value[m.name]
        per_model: dict[str, dict[str, ParamValue]] = {k: {} for k in self.fine_tunes}
        global_params: dict[str, ParamValue] = {}
        for gene in m.genes:
            arr = np.asarray(genes[gene.param], dtype=float)
            if gene.per_model:
                for row, key in enumerate(self.fine_tunes):
                    per_model[key][gene.param] = self._param_value(arr[row].tolist(), gene)
            else:
                global_params[gene.param] = self._param_value(arr.tolist(), gene)
        spec = get_method(m.name)
        for pname, v in m.fixed.items():
            p = spec.param(pname)
            if p is not None and p.per_model:
                for key in self.fine_tunes:
                    per_model[key][pname] = ParamValue.constant(v)
            else:
                global_params[pname] = ParamValue.constant(v)
        return Recipe(
            method=m.name,
            models=tuple(ModelEntry(k, dict(sorted(per_model[k].items()))) for k in self.fine_tunes),
            base_model=BASE_KEY,
            parameters=dict(sorted(global_params.items())),
            options=dict(sorted(m.options.items())),
            seed=self.seed,
        )

    # ------------------------------------------------------------------------------ storage

    @staticmethod
    def to_json(candidate: Any, parametrization: Any) -> dict[str, Any]:
        """What the archive stores: the readable value and the standardized vector (for replay)."""
        value = candidate.value

        def plain(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, np.ndarray):
                return np.round(v, DECIMALS + 2).tolist()
            return v

        data = candidate.get_standardized_data(reference=parametrization)
        return {"value": plain(value), "data": [float(x) for x in data]}

    @staticmethod
    def from_json(genome: dict[str, Any], parametrization: Any) -> Any:
        """A candidate of ``parametrization`` with the stored standardized vector (for tell-not-asked replay)."""
        data = np.asarray(genome["data"], dtype=float)
        return parametrization.spawn_child().set_standardized_data(data)
