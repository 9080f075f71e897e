"""The parent cache: merged parents on disk, least recently used evicted by bytes, never the ones needed now,
rebuilt identically after eviction; member key -> folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.method_data import MethodDataProvider
from evomerge.search.population.members import Member, MemberStore
from evomerge.search.population.parent_cache import ParentCache, ParentFolders

ORIGINALS = ("add", "rev")


@pytest.fixture(scope="module")
def zoo(micro_zoo: Path) -> Path:
    return micro_zoo


def _recipe(w: float) -> Recipe:
    return Recipe("task_arithmetic", tuple(ModelEntry(k, {"weight": ParamValue.constant(w)}) for k in ORIGINALS),
                  base_model=BASE_KEY)


RECIPES = {"A": _recipe(0.2), "B": _recipe(0.4), "C": _recipe(0.6), "D": _recipe(0.8)}


def _get(cache: ParentCache, zoo: Path, key: str, keep: tuple[str, ...] = ()) -> Path:
    paths = {BASE_KEY: str(zoo / "base"), **{k: str(zoo / k) for k in ORIGINALS}}
    return cache.get(key, RECIPES.__getitem__, paths.__getitem__, keep=keep)


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_lru_eviction_by_bytes_keeps_what_is_needed_and_rebuilds_the_same_weights(tmp_path: Path, zoo: Path) -> None:
    cache = ParentCache(tmp_path / "parents", max_bytes=10**12)
    a = _get(cache, zoo, "A")
    one = cache.bytes
    assert one > 0 and cache.materialized == 1 and (a / "config.json").is_file()
    before = _weights(a)
    cache.max_bytes = int(2.5 * one)  # room for two merged parents
    _get(cache, zoo, "B")
    assert cache.keys() == ["A", "B"]
    _get(cache, zoo, "C")  # three do not fit: the least recently used (A) goes
    assert cache.keys() == ["B", "C"] and not a.exists() and cache.bytes <= cache.max_bytes
    assert _get(cache, zoo, "B") == cache.path("B") and cache.materialized == 3  # a hit: used, not rebuilt
    assert cache.keys() == ["C", "B"]
    _get(cache, zoo, "D", keep=("C",))  # C is needed now: B, more recently used, goes instead
    assert cache.keys() == ["C", "D"] and not cache.path("B").exists()
    # over budget rather than evict what is needed now
    _get(cache, zoo, "A", keep=("C", "D"))
    assert cache.keys() == ["C", "D", "A"] and cache.bytes > cache.max_bytes and cache.materialized == 5
    after = _weights(cache.path("A"))  # rebuilt after its eviction: the same weights, bit for bit
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and bool((before[k] == after[k]).all()) for k in before)
    # a new session finds the folders on disk
    again = ParentCache(tmp_path / "parents", max_bytes=cache.max_bytes)
    assert sorted(again.keys()) == ["A", "C", "D"] and again.bytes == cache.bytes


def test_parent_folders_resolve_base_originals_and_merged_members(tmp_path: Path, zoo: Path) -> None:
    originals = {k: str(zoo / k) for k in ORIGINALS}
    members = MemberStore(originals, ["add", "rev"])
    members.add(Member("add", 0.5), Recipe("linear", (ModelEntry("add"),)))
    members.add(Member("g1.1", 0.6, 1, ORIGINALS), RECIPES["A"])
    cache = ParentCache(tmp_path / "parents", max_bytes=10**12)
    folders = ParentFolders(str(zoo / "base"), originals, members, cache, MethodDataProvider(None, str(zoo / "base")))
    assert folders.path(BASE_KEY) == str(zoo / "base") and folders.path("add") == str(zoo / "add")
    assert folders.merged(Recipe("task_arithmetic", (ModelEntry("g1.1"), ModelEntry("rev")), base_model=BASE_KEY)) \
        == ["g1.1"]
    extra = folders.extra_models(["g1.1", "rev", BASE_KEY])
    assert extra == {"g1.1": str(cache.path("g1.1"))} and cache.materialized == 1
    assert members.model_tasks(["g1.1", "add"]) == {"g1.1": ("add", "rev"), "add": ("add",)}
