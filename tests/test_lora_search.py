"""End to end with LoRA adapters as the fine-tunes (a micro version of search_spaces/demo_lora.yaml): the zoo
builder trains the adapters with PEFT, a search merges them (kept factored), the export is a plain Hugging Face
folder that transformers loads and that scores what the archive says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from evomerge.search.driver import start_run
from evomerge.search.export import export_candidate, verify_export
from evomerge.search.run import RunDir
from evomerge.search.space import space_from_dict

ROOT = Path(__file__).resolve().parent.parent


def micro_lora_space(budget: int) -> dict:
    """search_spaces/demo_lora.yaml on the micro zoo, with a small budget."""
    data = yaml.safe_load((ROOT / "search_spaces" / "demo_lora.yaml").read_text())
    text = yaml.safe_dump(data).replace("zoo:demo/", "zoo:micro/")
    data = yaml.safe_load(text)
    data["optimizer"]["budget"] = budget
    data.update(test_top=1, progress_interval=0, name="micro_lora")
    data["stopping"] = {"no_improvement": 1000}
    return data


def test_demo_lora_space_names_adapters() -> None:
    """The demo space is the micro one's with zoo:demo paths (loading it would train the demo zoo)."""
    data = yaml.safe_load((ROOT / "search_spaces" / "demo_lora.yaml").read_text())
    assert data["models"]["base"] == "zoo:demo/base"
    assert data["models"]["fine_tunes"] == {s: f"zoo:demo/lora/{s}" for s in ("add", "rev", "sort", "enc")}
    assert data["resident"] == "auto"


@pytest.mark.slow
def test_lora_search_export_loads_with_transformers(tmp_path: Path) -> None:
    from evomerge.zoo.lora import ensure_lora

    lora = ensure_lora("micro")
    for skill in ("add", "rev", "sort", "enc"):
        cfg = json.loads((lora / skill / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and Path(cfg["base_model_name_or_path"]) == lora.parent / "base"
    again = json.loads((lora / "lora.json").read_text())
    assert ensure_lora("micro") == lora and json.loads((lora / "lora.json").read_text()) == again  # cached

    space = space_from_dict(micro_lora_space(8), where="micro_lora")
    result = start_run(space, tmp_path / "run", progress=False, log=lambda m: None)
    assert result.summary is not None and result.summary.evaluations == 8 and result.summary.failed == 0
    with RunDir.open(tmp_path / "run").archive(readonly=True) as archive:
        best = archive.best(1)[0]
        assert len({r.aggregate for r in archive.results()}) > 1  # the recipes made different models
    out = tmp_path / "export"
    export_candidate(tmp_path / "run", out, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, no PEFT, no evomerge
    assert not any("lora" in n for n, _ in model.named_parameters())
    got, want = verify_export(tmp_path / "run", out, best.id)
    assert got == pytest.approx(want, abs=1e-5)
    mk = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert all("+" in m["model"] for m in mk["models"])  # mergekit's BASE+LORA form


@pytest.fixture(scope="module")
def micro_lora(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The micro zoo's adapters and, for each, the full model PEFT's merge_and_unload makes of it."""
    import warnings

    import peft

    from evomerge.zoo.lora import ensure_lora

    lora = ensure_lora("micro")
    root = tmp_path_factory.mktemp("merged")
    merged = {}
    for skill in ("add", "rev"):
        base = AutoModelForCausalLM.from_pretrained(str(lora.parent / "base"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = peft.PeftModel.from_pretrained(base, str(lora / skill)).merge_and_unload()
        full.save_pretrained(root / skill)
        merged[skill] = root / skill
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(micro_lora_space(4)))
    return {"lora": lora, "base": lora.parent / "base", "merged": merged, "space": space}


def test_eval_command_scores_an_adapter_as_its_merged_model(micro_lora: dict, capsys: pytest.CaptureFixture) -> None:
    from evomerge.cli import main
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.spec import FitnessSpec

    assert main(["eval", str(micro_lora["lora"] / "add"), "--space", str(micro_lora["space"]), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["aggregate"]
    spec = FitnessSpec.from_yaml(micro_lora["space"])
    model = AutoModelForCausalLM.from_pretrained(str(micro_lora["merged"]["add"]))
    want = Evaluator(spec, str(micro_lora["base"]), "cpu").score(model, "search").aggregate
    assert got == pytest.approx(want, abs=1e-9)


def test_mergeability_of_adapters_equals_merged_models(micro_lora: dict) -> None:
    from evomerge.fitness.spec import FitnessSpec
    from evomerge.lab import ZooLab, estimate_mergeability

    spec = FitnessSpec.from_yaml(micro_lora["space"])
    labs = [ZooLab(str(micro_lora["base"]), {s: str(micro_lora["lora"] / s) for s in ("add", "rev")}, spec),
            ZooLab(str(micro_lora["base"]), {s: str(p) for s, p in micro_lora["merged"].items()}, spec)]
    for name, t in labs[1].states["add"].items():
        assert float((labs[0].states["add"][name] - t).abs().max()) <= 1e-6, name
    reports = [estimate_mergeability(lab, m=1, n=1, method="task_arithmetic", progress=False) for lab in labs]
    assert [r.mergeability for r in reports[0].rows] == pytest.approx([r.mergeability for r in reports[1].rows],
                                                                       abs=1e-9)


@pytest.mark.slow
def test_lora_build_is_deterministic(micro_zoo: Path, tmp_path: Path) -> None:
    import shutil

    from evomerge.zoo.lora import build_lora

    zoo = micro_zoo
    built = []
    for i in range(2):
        copy = tmp_path / f"zoo{i}"
        shutil.copytree(zoo, copy, ignore=shutil.ignore_patterns("lora", "*.partial"))
        built.append(build_lora(copy))
    for skill in ("add", "enc"):
        a, b = (p / skill / "adapter_model.safetensors" for p in built)
        assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("method,options", [("qp", {"basis": "full"}), ("qp", {"basis": "task", "sequential": True}),
                                            ("apl", {"level": "row"})])
def test_data_aware_methods_on_adapters_equal_merged_models(micro_lora: dict, method: str, options: dict,
                                                            tmp_path: Path) -> None:
    """qp and apl calibrate on each model's task rows: the adapters (read over the base) and PEFT's merged
    models give the same merge."""
    from safetensors.torch import load_file

    from evomerge.merge.engines.disk import merge_to_disk
    from evomerge.merge.recipe import ModelEntry, Recipe
    from evomerge.method_data import MethodDataProvider

    fitness = str(micro_lora["lora"].parent / "fitness.yaml")
    out = {}
    for kind, folders in (("lora", {s: micro_lora["lora"] / s for s in ("add", "rev")}),
                          ("merged", micro_lora["merged"])):
        recipe = Recipe(method, tuple(ModelEntry(str(p)) for p in folders.values()),
                        base_model=str(micro_lora["base"]), options={"calibration": fitness, **options}, seed=3)
        data = MethodDataProvider(None, micro_lora["base"]).for_recipe(recipe)
        merge_to_disk(recipe, tmp_path / kind, progress=False, calibration=data.calibration)
        out[kind] = load_file(str(tmp_path / kind / "model.safetensors"))
    worst = max(float((out["lora"][n] - out["merged"][n]).abs().max()) for n in out["merged"])
    assert worst <= 1e-5
