"""Export: a normal Hugging Face folder that scores what the archive says, with card, recipe and lineage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers.spaces import micro_space

from evomerge.errors import ConfigError, RunDirError
from evomerge.search.driver import start_run
from evomerge.search.export import export_candidate, verify_export
from evomerge.search.run import RunDir
from evomerge.search.space import space_from_dict
from evomerge.search.status import status_text


@pytest.fixture(scope="module")
def finished_run(micro_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    space = space_from_dict(micro_space(optimizer={"name": "CMA", "budget": 5}, test_top=2))
    result = start_run(space, root / "m", progress=False, log=lambda m: None)
    assert result.summary is not None and len(result.rescored) == 2
    return root / "m"


def test_exported_model_loads_with_transformers_and_scores_like_the_archive(finished_run: Path,
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "best"
    summary = export_candidate(finished_run, out, progress=False)
    with RunDir.open(finished_run).archive(readonly=True) as a:
        best = a.best(1)[0]
    assert summary.candidate_id == best.id
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "evomerge_recipe.yaml",
                 "evomerge_lineage.json"):
        assert (out / name).is_file(), name
    got, want = verify_export(finished_run, out, best.id)  # AutoModelForCausalLM.from_pretrained + evaluator
    assert got == pytest.approx(want, abs=1e-6)
    card = (out / "README.md").read_text()
    assert f"candidate {best.id}" in card and f"{best.aggregate:.4f}" in card and "original model `add`" in card
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def test_exported_recipe_reproduces_the_weights_with_evomerge_merge(finished_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from evomerge.merge.engines.disk import merge_to_disk
    from evomerge.merge.formats.recipe_yaml import load_recipe

    out = tmp_path / "best"
    export_candidate(finished_run, out, progress=False)
    again = tmp_path / "again"
    merge_to_disk(load_recipe(out / "evomerge_recipe.yaml"), again, progress=False)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mk = out / "mergekit_config.yml"
    if mk.exists():  # task arithmetic and TIES are expressible in mergekit
        assert yaml.safe_load(mk.read_text())["merge_method"] in ("task_arithmetic", "ties")


def test_rank_by_test_and_explicit_candidate(finished_run: Path, tmp_path: Path) -> None:
    with RunDir.open(finished_run).archive(readonly=True) as a:
        by_test = a.best(1, rank_by="test")[0]
        worst = min(a.results(), key=lambda r: r.aggregate)
    assert export_candidate(finished_run, tmp_path / "t", rank_by="test", progress=False).candidate_id == by_test.id
    assert export_candidate(finished_run, tmp_path / "w", candidate_id=worst.id,
                            progress=False).candidate_id == worst.id


def test_export_refuses_existing_output_and_unknown_candidate_and_leaves_nothing(finished_run: Path,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export_candidate(finished_run, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(RunDirError, match="no candidate 999"):
        export_candidate(finished_run, tmp_path / "y", candidate_id=999, progress=False)
    assert not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_status_shows_progress_leaderboard_and_time(finished_run: Path) -> None:
    text = status_text(finished_run)
    assert "evaluations 5/5 (0 failed)" in text and "finished: budget of 5 evaluations used" in text
    assert "leaderboard" in text and "wall time" in text and "evaluation" in text


@pytest.mark.parametrize("methods", [
    {"qp": {"weight": [0.2, 1.0]}},
    {"mergeability_weighted": {"tau": [0.05, 1.0]}},
])
def test_data_aware_candidates_export_with_the_workers_data(tmp_path: Path, methods: dict) -> None:
    # qp needs the fitness's task rows, mergeability_weighted the base scores: the export gives the engine what
    # the search's worker used, so the exported model scores as archived, and its recipe rebuilds it alone
    from safetensors.torch import load_file

    from evomerge.merge.recipe import Recipe
    from evomerge.method_data import merge_recipe_to_disk

    space = space_from_dict(micro_space(methods=methods, optimizer={"name": "CMA", "budget": 3}, test_top=0))
    start_run(space, tmp_path / "r", progress=False, log=lambda m: None)
    out = tmp_path / "out"
    summary = export_candidate(tmp_path / "r", out, progress=False)
    got, want = verify_export(tmp_path / "r", out, summary.candidate_id)
    assert got == pytest.approx(want, abs=1e-6)
    recipe = Recipe.from_dict(yaml.safe_load((out / "evomerge_recipe.yaml").read_text()))
    if recipe.method == "qp":
        assert recipe.options["calibration"] == str((out / "calibration.yaml").resolve())
    else:
        assert all(0 <= m.parameters["base_score"].to_yaml() <= 1 for m in recipe.models)
        assert not (out / "calibration.yaml").exists()
    merge_recipe_to_disk(recipe, tmp_path / "again", progress=False)  # what `evomerge merge` does
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all((a[n] - b[n]).abs().max().item() <= 1e-5 for n in a)


def test_a_candidate_stopped_by_racing_exports_and_verifies_on_the_items_it_saw(tmp_path: Path) -> None:
    space = space_from_dict(micro_space(optimizer={"name": "CMA", "budget": 8}, test_top=0,
                                        racing={"stages": [0.25, 0.5, 1.0], "level": 0.2, "min_items": 8}))
    start_run(space, tmp_path / "r", progress=False, log=lambda m: None)
    with RunDir.open(tmp_path / "r").archive(readonly=True) as a:
        stopped = [r for r in a.results() if r.partial]
        assert stopped and a.best(1)[0].complete
        rec = stopped[0]
    summary = export_candidate(tmp_path / "r", tmp_path / "out", candidate_id=rec.id, progress=False)
    got, want = verify_export(tmp_path / "r", summary.out_dir, rec.id)
    assert got == pytest.approx(want, abs=1e-6)  # the subset's aggregate, not the estimate
    assert want != pytest.approx(rec.aggregate, abs=1e-6)
    assert "Stopped early by racing" in (tmp_path / "out" / "README.md").read_text()
