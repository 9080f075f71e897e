"""Every added method with numeric parameters is a search gene per layer: the space validates, candidates decode
into per-layer recipes, and the search's resident merger merges them as the disk engine does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.spaces import micro_space

from evomerge.merge.engines.disk import merge_to_disk
from evomerge.merge.engines.resident import ResidentMerger
from evomerge.merge.methods.extended import BY_NAME
from evomerge.merge.methods.registry import plan_recipe
from evomerge.models.layers import LayerMap
from evomerge.search.export import recipe_with_paths
from evomerge.search.genome import Genome
from evomerge.search.space import space_from_dict

# method -> (genes, fixed values and options, fine-tunes used)
GENES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "della": ({"weight": [0.2, 1.0], "density": [0.3, 0.9], "epsilon": [0.0, 0.2], "lambda": [0.8, 1.4]},
              ("add", "rev", "sort")),
    "della_linear": ({"weight": [0.2, 1.0], "density": [0.3, 0.9], "epsilon": 0.1}, ("add", "rev")),
    "sce": ({"select_topk": [0.1, 1.0]}, ("add", "rev", "sort")),
    "nuslerp": ({"weight": [0.1, 1.0]}, ("add", "rev")),
    "multislerp": ({"weight": [0.1, 1.0], "options": {"normalize_weights": True}}, ("add", "rev", "sort")),
    "karcher": ({"weight": [0.1, 1.0], "options": {"max_iter": 5}}, ("add", "rev")),
    "nearswap": ({"t": [0.0001, 0.05]}, ("enc",)),
    "ram": ({"epsilon": [0.0, 0.02]}, ("add", "rev", "sort")),
    "ramplus_tl": ({"epsilon": [0.0, 0.02], "r": [0.0, 1.0], "alpha": [0.0, 0.5]}, ("add", "rev", "sort")),
    "passthrough": ({"scale": [0.5, 1.5]}, ("sort",)),
}


def test_every_added_method_with_numbers_is_covered() -> None:
    with_numbers = {name for name, m in BY_NAME.items() if m.params}
    assert with_numbers == set(GENES)  # arcee_fusion has no numeric parameter, so no gene


@pytest.mark.parametrize("method", sorted(GENES))
def test_a_per_layer_gene_decodes_and_merges(method: str, micro_zoo: Path, tmp_path: Path) -> None:
    genes, fine_tunes = GENES[method]
    data = micro_space(methods={method: genes}, granularity="per_layer")
    data["models"]["fine_tunes"] = {k: v for k, v in data["models"]["fine_tunes"].items() if k in fine_tunes}
    space = space_from_dict(data)
    genome = Genome(space)
    assert genome.slots == space.num_layers == 2
    param = genome.parametrization()
    rng = np.random.RandomState(7)
    child = param.spawn_child().set_standardized_data(rng.normal(size=param.dimension))
    recipe = genome.decode(child.value)
    assert recipe.method == method
    # every searched parameter is a per-layer list whose values differ from layer to layer
    lists = [pv for m in recipe.models for pv in m.parameters.values()] + list(recipe.parameters.values())
    searched = [pv for pv in lists if len(pv.entries[0].values) == 2]
    assert searched and all(pv.entries[0].values[0] != pv.entries[0].values[1] for pv in searched)
    plan = plan_recipe(recipe, LayerMap.generic(2))
    name0, name1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert plan.tensor_args(name0) != plan.tensor_args(name1)
    # the search's merge path (resident, task vectors) equals the disk engine on the same recipe
    paths = space.model_paths()
    merger = ResidentMerger(paths["base"], {k: paths[k] for k in fine_tunes})
    got = merger.state_dict(recipe)
    merge_to_disk(recipe_with_paths(recipe, paths), tmp_path / "o", dtype="float32", progress=False)
    from safetensors.torch import load_file

    want = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert set(got) == set(want)
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert worst <= 1e-5, f"{method}: max |resident - disk| = {worst}"
    base = load_file(str(Path(paths["base"]) / "model.safetensors"))
    assert any(not torch.equal(got[n], base[n]) for n in got if n in base)
