"""LoRA adapters as fine-tunes: every engine and method on adapters equals the same merge on the full models
PEFT's own ``merge_and_unload`` makes of them; the resident store keeps them factored; tiers are bit-identical."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers.tiny_models import build_llamas, build_loras, load_state, save_tiny
from test_resident import CASES, KEYS, _recipe

from evomerge.errors import ConfigError, ModelError
from evomerge.kinship import kinship_matrix
from evomerge.merge.engines.disk import merge_to_disk
from evomerge.merge.engines.resident import ResidentMerger
from evomerge.merge.formats.recipe_yaml import load_recipe, mergekit_yaml
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.models.adapter import AdapterFolder, open_weights, split_ref
from evomerge.models.hf import load_causal_lm

TOL = 1e-5


@pytest.fixture(scope="module")
def loras(tiny_llamas: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("loras")
    base = tiny_llamas[0]
    adapters, merged = build_loras(root, base)
    names = list(adapters)
    return {"base": base, "adapters": [adapters[n] for n in names], "merged": [merged[n] for n in names],
            "full": build_llamas(root / "full", 3, seed=3)}


@pytest.fixture(scope="module")
def mergers(loras: dict) -> dict[str, ResidentMerger]:
    base = loras["base"]
    out = {"adapters": ResidentMerger(base, dict(zip(KEYS, loras["adapters"]))),
           "merged": ResidentMerger(base, dict(zip(KEYS, loras["merged"])))}
    mixed = {"a": loras["adapters"][0], "b": loras["merged"][1], "c": loras["adapters"][2]}
    for tier in ("device", "cpu", "disk"):
        out[f"mixed-{tier}"] = ResidentMerger(base, mixed, resident=tier)
        out[f"full-{tier}"] = ResidentMerger(loras["full"][0], dict(zip(KEYS, loras["full"][1:])), resident=tier)
    return out


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def test_adapter_reads_as_peft_merge_and_unload(loras: dict) -> None:
    for adapter, merged in zip(loras["adapters"], loras["merged"]):
        want = load_state(merged)
        with open_weights(adapter, base=loras["base"]) as src:
            assert isinstance(src, AdapterFolder)
            assert _worst({n: src.get(n) for n in want}, want) <= 1e-6
            # the exact task vector is the difference, and zero where the adapter does not reach
            base = load_state(loras["base"])
            for n in want:
                d = src.delta(n)
                if d is None:
                    assert torch.equal(want[n], base[n]), n
                else:
                    torch.testing.assert_close(base[n] + d, want[n], rtol=0, atol=1e-6)
            # pieces of a tensor (the disk engine's elementwise path) compute only the rows they cover
            name = "model.layers.0.self_attn.q_proj.weight"
            full = src.get(name).view(-1)
            piece = torch.empty(77)
            src.read_range(name, 45, piece)
            torch.testing.assert_close(piece, full[45:122], rtol=0, atol=1e-7)


def test_loader_adds_the_adapter(loras: dict) -> None:
    for adapter, merged in zip(loras["adapters"], loras["merged"]):
        got = load_causal_lm(adapter, base=loras["base"]).state_dict()
        want = load_causal_lm(merged).state_dict()
        assert _worst(got, want) <= 1e-6
    ref = f"{loras['base']}+{loras['adapters'][0]}"
    assert split_ref(ref) == (str(loras["base"]), str(loras["adapters"][0]))
    assert _worst(load_causal_lm(ref).state_dict(), load_causal_lm(loras["merged"][0]).state_dict()) <= 1e-6


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_method_on_adapters_equals_merged_models(case: tuple, loras: dict, mergers: dict,
                                                       tmp_path: Path) -> None:
    method, keys, uses_base, per_model, glob, options = case
    recipe = _recipe(method, keys, "base" if uses_base else None, per_model, glob, options)
    factored = mergers["adapters"].state_dict(recipe)
    full = mergers["merged"].state_dict(recipe)
    assert _worst(factored, full) <= TOL, f"resident {method}"
    # the disk engine reads the adapter folders over the recipe's base
    out = {}
    for kind in ("adapters", "merged"):
        paths = {"base": str(loras["base"]), **{k: str(p) for k, p in zip(KEYS, loras[kind])}}
        if not uses_base and "base" not in keys:
            continue  # a base-free recipe: the adapters' base comes from their config (checked below)
        disk = _recipe(method, tuple(paths[k] for k in keys), paths["base"] if uses_base else None,
                       {paths[k]: v for k, v in per_model.items()}, glob, options)
        if not uses_base:
            disk = Recipe(disk.method, disk.models, base_model=None, parameters=disk.parameters,
                          options=disk.options, seed=disk.seed)
        merge_to_disk(disk, tmp_path / kind, dtype="float32", progress=False)
        out[kind] = load_state(tmp_path / kind)
    if out:
        assert _worst(out["adapters"], out["merged"]) <= TOL, f"disk {method}"
        assert _worst(out["adapters"], factored) <= TOL


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("models", ["mixed", "full"])
def test_tiers_are_bit_identical(case: tuple, models: str, mergers: dict) -> None:
    method, keys, uses_base, per_model, glob, options = case
    recipe = _recipe(method, keys, "base" if uses_base else None, per_model, glob, options)
    ref = mergers[f"{models}-device"].state_dict(recipe)
    for tier in ("cpu", "disk"):
        got = mergers[f"{models}-{tier}"].state_dict(recipe)
        bad = [n for n in ref if not torch.equal(got[n], ref[n])]
        assert not bad, f"{method} in the {tier} tier differs on {bad[:3]}"


def test_store_keeps_adapters_factored(loras: dict, mergers: dict) -> None:
    factored, full = mergers["adapters"], mergers["merged"]
    base_bytes = sum(t.numel() * 4 for t in load_state(loras["base"]).values())
    assert full.resident_bytes == 4 * base_bytes  # base + three dense task vectors
    factor_bytes = 0
    for adapter in loras["adapters"]:
        with open_weights(adapter, base=loras["base"]) as src:
            for n in src.tensor_names:
                f = src.factor(n)
                if f is not None:
                    factor_bytes += (f.a.numel + f.b.numel) * 4
    own = 64 * 32 * 4  # the lm_head that adapter lc stores in full (its saved embedding equals the base's)
    assert factored.resident_bytes == base_bytes + factor_bytes + own
    assert factored.adapter_keys == list(KEYS)
    assert mergers["mixed-disk"].resident_bytes == factor_bytes - sum(
        (f.a.numel + f.b.numel) * 4 for f in open_weights(loras["adapters"][1], base=loras["base"]).layout.factors.values())


def test_apply_in_place_and_models_added_later(loras: dict) -> None:
    for tier in ("device", "disk"):
        m = ResidentMerger(loras["base"], {"a": loras["adapters"][0]}, resident=tier)
        m.add_model("c", loras["adapters"][2])
        m.add_model("b", loras["merged"][1])
        assert m.keys == ["a", "c", "b"]
        model = m.new_model()
        recipe = _recipe("task_arithmetic", ("a", "b", "c"), "base", {"a": {"weight": 0.5}, "b": {"weight": 0.3},
                                                                       "c": {"weight": [0.2, 1.0]}})
        stats = m.apply(recipe, into=model)
        assert stats.fused
        want = ResidentMerger(loras["base"], {k: p for k, p in zip(KEYS, loras["merged"])}).state_dict(recipe)
        got = {n: p.detach() for n, p in model.state_dict().items() if n in want}
        assert _worst(got, want) <= TOL
        m.remove_model("c")
        assert m.keys == ["a", "b"]
        m.close()


def test_kinship_of_adapters_equals_merged_models(loras: dict) -> None:
    a = kinship_matrix(loras["adapters"], loras["base"], per_layer=True)
    b = kinship_matrix(loras["merged"], loras["base"], per_layer=True)
    for metric in ("pcc", "cos", "ed"):
        assert abs(a.matrix(metric) - b.matrix(metric)).max() <= TOL
    assert a.layer_values(0, 2) == pytest.approx(b.layer_values(0, 2), abs=TOL, nan_ok=True)


def test_mergekit_lora_syntax(loras: dict, tmp_path: Path) -> None:
    base, (la, lb, _) = loras["base"], loras["adapters"]
    (tmp_path / "mk.yml").write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": f"{base}+{la}", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": f"{base}+{lb}", "parameters": {"weight": 0.4, "density": 0.7}}]}))
    merge_to_disk(load_recipe(tmp_path / "mk.yml"), tmp_path / "a", progress=False)
    full = Recipe("ties", (ModelEntry(str(loras["merged"][0]), {"weight": _c(0.6), "density": _c(0.5)}),
                           ModelEntry(str(loras["merged"][1]), {"weight": _c(0.4), "density": _c(0.7)})),
                  base_model=str(base))
    merge_to_disk(full, tmp_path / "b", progress=False)
    assert _worst(load_state(tmp_path / "a"), load_state(tmp_path / "b")) <= TOL
    # an adapter folder in a recipe is written in mergekit's BASE+LORA form
    plain = Recipe("ties", (ModelEntry(str(la), {"weight": _c(1.0), "density": _c(0.5)}),), base_model=str(base))
    assert f"{base}+{la}" in mergekit_yaml(plain)


def _c(v: float):
    from evomerge.merge.params import ParamValue

    return ParamValue.constant(v)


def test_refusals(loras: dict, tmp_path: Path) -> None:
    base, la = loras["base"], loras["adapters"][0]

    def variant(name: str, src: Path = la, **changes: object) -> Path:
        out = tmp_path / name
        out.mkdir()
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg.update(changes)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        (out / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
        return out

    with pytest.raises(ModelError, match="DoRA"):
        open_weights(variant("dora", use_dora=True), base=base)
    with pytest.raises(ModelError, match="IA3"):
        open_weights(variant("ia3", peft_type="IA3"), base=base)
    other = build_llamas(tmp_path / "other", 0, seed=5)[0]
    with pytest.raises(ModelError, match="different local model"):
        open_weights(la, base=other)
    with pytest.raises(ModelError, match="rank 4 .* r = 5"):
        open_weights(variant("rank", r=5, rank_pattern={}), base=base)
    wide = build_llamas(tmp_path / "wide", 0, vocab=80)[0]
    cfg = json.loads((la / "adapter_config.json").read_text())
    bad = variant("anybase", base_model_name_or_path="org/unknown-model")
    assert cfg["base_model_name_or_path"] == str(base)
    with pytest.raises(ModelError, match="embed_tokens.*B @ A is \\(64, 32\\).*has shape \\(80, 32\\)"):
        open_weights(variant("lcwide", loras["adapters"][2], base_model_name_or_path="org/x"), base=wide)
    with pytest.raises(ModelError, match="no base model given"):
        open_weights(bad)
    assert isinstance(open_weights(bad, base=base), AdapterFolder)  # a hub id is not checked against the base
    with pytest.raises(ConfigError, match="BASE\\+ADAPTER"):
        split_ref(f"{base}+{la}+{la}")


def test_fan_in_fan_out_gpt2(tmp_path: Path) -> None:
    import peft

    save_tiny("gpt2", tmp_path / "base", vocab=50, n_embd=24)
    adapters, merged = build_loras(tmp_path, tmp_path / "base", {"g": {
        "r": 3, "lora_alpha": 5, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}})
    with open_weights(adapters["g"], base=tmp_path / "base") as src:
        assert any(f.transpose for f in src.layout.factors.values())
        want = load_state(merged["g"])
        assert _worst({n: src.get(n) for n in want}, want) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        del peft


def test_auto_tier_and_store_accounting(loras: dict) -> None:
    m = ResidentMerger(loras["base"], {"a": loras["adapters"][0], "b": loras["merged"][1]}, resident="auto")
    assert m.tier == "device"  # tiny models fit anywhere; on a CPU device device and cpu are one store
    assert m.store_bytes()["host"] == m.resident_bytes and m.store_bytes()["device"] == 0
    disk = ResidentMerger(loras["base"], {"a": loras["adapters"][0], "b": loras["merged"][1]}, resident="disk")
    mapped = disk.store_bytes()["mapped"]
    assert mapped == 2 * sum(t.numel() * 4 for t in load_state(loras["base"]).values())  # base + b, mapped
    with pytest.raises(ConfigError, match="resident"):
        ResidentMerger(loras["base"], {"a": loras["adapters"][0]}, resident="gpu")
    disk.close()
