"""Merged parents on disk: a bounded cache of materialized members, and member key -> folder for a job.

Workers load merged parents into their resident merger from folders named in ``EvalJob.extra_models``;
:class:`ParentFolders` gives those folders (the base, an original, or a merged member built on demand into the
:class:`ParentCache`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from evomerge.atomic import raise_if_disk_full
from evomerge.merge.engines.disk import merge_to_disk
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.method_data import MethodData, MethodDataProvider
from evomerge.search.population.members import MemberStore


class ParentCache:
    """Merged parents materialized on disk under ``root`` on demand; least recently used evicted beyond
    ``max_bytes`` (never the ones needed now). A recipe is deterministic, so an evicted parent is rebuilt."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int, vocab_policy: str = "refuse") -> None:
        self.root = Path(root)
        self.vocab_policy = vocab_policy
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._used: OrderedDict[str, int] = OrderedDict()
        for d in sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime):
            if d.is_dir() and (d / "config.json").is_file():
                self._used[d.name] = _dir_bytes(d)
        self.materialized = 0

    def path(self, key: str) -> Path:
        return self.root / key

    def keys(self) -> list[str]:
        """Cached members, least recently used first."""
        return list(self._used)

    def get(self, key: str, recipe_of: Callable[[str], Recipe], path_of: Callable[[str], str],
            keep: Sequence[str] = (),
            data_of: Callable[[Recipe, Mapping[str, str]], MethodData] | None = None) -> Path:
        """The folder of merged model ``key`` (built from ``recipe_of(key)`` whose inputs ``path_of`` resolves;
        ``data_of(recipe, model key -> folder)`` gives data-aware methods their task rows or base scores)."""
        target = self.path(key)
        if key in self._used and (target / "config.json").is_file():
            self._used.move_to_end(key)
            return target
        recipe = recipe_of(key)
        concrete = dataclasses.replace(
            recipe, base_model=path_of(recipe.base_model) if recipe.base_model else None,
            models=tuple(ModelEntry(path_of(m.model), m.parameters) for m in recipe.models), dtype="float32")
        data = data_of(recipe, {m.model: path_of(m.model) for m in recipe.models}) if data_of else MethodData()
        try:
            merge_to_disk(concrete, target, overwrite=True, progress=False, calibration=data.calibration,
                          base_scores=data.base_scores, vocab_policy=self.vocab_policy)
        except OSError as exc:  # a full disk: named, and the run resumes once space is freed
            base = Path(concrete.base_model or concrete.models[0].model)
            raise_if_disk_full(exc, self.root, sum(f.stat().st_size for f in base.glob("*.safetensors")),
                               f"the merged parent {key}", f"`evomerge resume {self.root.parent}`")
            raise
        self.materialized += 1
        self._used[key] = _dir_bytes(target)
        self._evict(set(keep) | {key})
        return target

    def _evict(self, keep: set[str]) -> None:
        total = sum(self._used.values())
        for key in list(self._used):
            if total <= self.max_bytes:
                break
            if key in keep:
                continue
            total -= self._used.pop(key)
            shutil.rmtree(self.path(key), ignore_errors=True)

    @property
    def bytes(self) -> int:
        return sum(self._used.values())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class ParentFolders:
    """Member key -> model folder: the base, an original (also a generation-0 member that is one original
    alone), or a merged member materialized in ``cache`` with the method data its recipe needs."""

    def __init__(self, base: str, originals: Mapping[str, str], members: MemberStore, cache: ParentCache,
                 method_data: MethodDataProvider) -> None:
        self.base, self.originals = base, dict(originals)
        self.members, self.cache, self.method_data = members, cache, method_data

    def path(self, key: str, keep: Sequence[str] = ()) -> str:
        """The folder of ``key``; building it never evicts ``keep`` (the members the caller needs now)."""
        if key == BASE_KEY:
            return self.base
        original = self.members.stands_for(key)
        if original is not None:
            return self.originals[original]
        return str(self.cache.get(key, self.members.recipe_of, lambda k: self.path(k, keep), keep=keep,
                                  data_of=self._data_of))

    def merged(self, recipe: Recipe) -> list[str]:
        """The merged members ``recipe`` names (the models it needs beyond the base and the originals)."""
        return [m.model for m in recipe.models if m.model not in self.originals and m.model != BASE_KEY]

    def extra_models(self, keys: Iterable[str]) -> dict[str, str]:
        """Folders of the merged members ``keys``, all kept while any of them is built."""
        names = [k for k in keys if k not in self.originals and k != BASE_KEY]
        return {k: self.path(k, keep=names) for k in names}

    def _data_of(self, recipe: Recipe, folders: Mapping[str, str]) -> MethodData:
        """What materializing a data-aware member needs, keyed by the folders its recipe resolves to."""
        return self.method_data.for_recipe(recipe, self.members.model_tasks(list(folders)), key_of=folders)
