"""Kinship of two population members, computed once per run.

Lookup order: this session's memo, the archive's kinship table (earlier sessions), the exact value from recipe
algebra (a member built by a linear method is a linear form of the originals' task vectors, so its kinship
comes from the originals' Gram matrix without materializing it), and last the direct computation over the two
folders. Finite values are written to the archive's table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from evomerge.kinship import kinship as direct_kinship
from evomerge.kinship import kinship_matrix, linear_form
from evomerge.merge.recipe import BASE_KEY
from evomerge.models.folder import ModelFolder
from evomerge.models.layers import LayerMap
from evomerge.search.archive import Archive
from evomerge.search.population.members import MemberStore, pair_key
from evomerge.search.population.parent_cache import ParentFolders


class KinshipCache:
    """Kinship of members of ``members`` in any metric (see the module docstring for the order of lookups)."""

    def __init__(self, archive: Archive, base: str, originals: Mapping[str, str], members: MemberStore,
                 folders: ParentFolders, vocab_policy: str = "refuse") -> None:
        self.archive, self.base, self.originals = archive, base, dict(originals)
        self.vocab_policy = vocab_policy
        self.members, self.folders = members, folders
        self._memo: dict[tuple[str, str, str], float] = {}
        self._gram: Any = None
        self._layer_map: LayerMap | None = None
        self._forms: dict[str, Any] = {}

    def value(self, a: str, b: str, metric: str) -> float:
        memo = (*pair_key(a, b), metric)
        if memo in self._memo:
            return self._memo[memo]
        cached = self.archive.get_kinship(a, b, metric)
        if cached is not None:
            self._memo[memo] = cached
            return cached
        fa, fb = self._form(a), self._form(b)
        if fa is not None and fb is not None:
            value = float(self._gram.value(fa, fb, metric))
        else:
            value = float(direct_kinship(self.folders.path(a), self.folders.path(b), self.base, metric,
                                         vocab_policy=self.vocab_policy))
        self._memo[memo] = value
        if math.isfinite(value):  # NaN (a zero task vector) is not cached: the table holds numbers only
            self.archive.put_kinship(a, b, metric, value)
        return value

    def _ensure_gram(self) -> None:
        if self._gram is not None:
            return
        keys = list(self.originals)
        km = kinship_matrix([self.originals[k] for k in keys], self.base, names=keys, keep_tensors=True,
                            vocab_policy=self.vocab_policy)
        self._gram = km.gram()
        with ModelFolder.open(self.base) as folder:
            self._layer_map = LayerMap.from_config(folder.config)

    def _form(self, key: str) -> Any:
        """The linear form of a member's task vector over the originals, or None when not linear."""
        if key in self._forms:
            return self._forms[key]
        self._ensure_gram()
        original = self.members.stands_for(key)
        if original is not None:
            form = self._gram.unit(original)
        else:
            recipe = self.members.recipe_of(key)
            parents = {m.model: self._form(m.model) for m in recipe.models if m.model not in self.originals}
            form = None if any(v is None for v in parents.values()) else linear_form(
                recipe, self._gram, parents, BASE_KEY, self._layer_map)
        self._forms[key] = form
        return form
