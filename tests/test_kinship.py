"""Kinship: hand case, streamed vs flattened on tiny saved models, per-layer groups, recipe algebra, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_models import save_model, tiny_config

from evomerge.errors import ConfigError, ModelError
from evomerge.kinship import (
    METRICS,
    DictSource,
    PairMoments,
    kinship,
    kinship_matrix,
    linear_form,
    relatedness,
)
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe

torch.manual_seed(0)


def _flat_metrics(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Reference: direct computation on fully flattened float64 task vectors."""
    pcc = float(np.corrcoef(x, y)[0, 1])
    cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    return {"pcc": pcc, "cos": cos, "abs_cos": abs(cos), "ed": float(np.linalg.norm(x - y))}


# ------------------------------------------------------------------------------------------------ hand case


def test_hand_case_from_methods_notes() -> None:
    base = {"w": torch.zeros(3)}
    d1 = {"w": torch.tensor([1.0, 0.0, -1.0])}
    d2 = {"w": torch.tensor([2.0, 1.0, 0.0])}
    neg = {"w": -d2["w"]}
    km = kinship_matrix([d1, d2, neg], base, names=["d1", "d2", "neg"])
    assert km.value("d1", "d2", "pcc") == pytest.approx(1.0, abs=1e-12)
    assert km.value("d1", "d2", "cos") == pytest.approx(0.6325, abs=1e-4)
    assert km.value("d1", "d2", "abs_cos") == pytest.approx(0.6325, abs=1e-4)
    assert km.value("d1", "d2", "ed") == pytest.approx(1.7321, abs=1e-4)
    assert km.value("d1", "neg", "pcc") == pytest.approx(-1.0, abs=1e-12)
    assert km.value("d1", "neg", "cos") == pytest.approx(-0.6325, abs=1e-4)
    assert km.value("d1", "neg", "abs_cos") == pytest.approx(0.6325, abs=1e-4)  # the paper code's variant
    assert km.value("d1", "neg", "ed") == pytest.approx(math.sqrt(11), abs=1e-12)


def test_hand_case_split_over_tensors_equals_one_tensor() -> None:
    """Global, not a mean of per-tensor scores: splitting the vector over tensors changes nothing."""
    base = {"a": torch.zeros(2), "b": torch.zeros(1)}
    m1 = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-1.0])}
    m2 = {"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([0.0])}
    for metric, want in {"pcc": 1.0, "cos": 2 / math.sqrt(10), "ed": math.sqrt(3)}.items():
        assert kinship(m1, m2, base, metric) == pytest.approx(want, abs=1e-12)
    # the mean of per-tensor Pearson values would differ (tensor b alone has no variance)
    assert PairMoments(1, -1, 0, 1, 0, 0).pcc() != PairMoments(1, -1, 0, 1, 0, 0).pcc()  # NaN


def test_degenerate_and_bad_input() -> None:
    base = {"w": torch.zeros(3)}
    zero = {"w": torch.zeros(3)}
    other = {"w": torch.tensor([1.0, 2.0, 3.0])}
    assert math.isnan(kinship(zero, other, base, "cos"))
    assert math.isnan(kinship(zero, other, base, "pcc"))
    assert kinship(zero, other, base, "ed") == pytest.approx(math.sqrt(14))
    with pytest.raises(ConfigError, match="unknown kinship metric 'foo'"):
        kinship(zero, other, base, "foo")
    with pytest.raises(ModelError, match=r"tensor 'w' has shape \(4,\)"):
        kinship({"w": torch.zeros(4)}, other, base)
    # a NaN weight stays NaN in every similarity: never "identical" (clamping NaN into [-1, 1] gave 1.0)
    broken = {"w": torch.tensor([1.0, float("nan"), 3.0])}
    for metric in ("pcc", "cos", "abs_cos", "ed"):
        assert math.isnan(kinship(broken, other, base, metric)), metric
    # the hint names what is wrong: a larger vocabulary, or another architecture
    with pytest.raises(ModelError, match="larger vocabulary"):
        kinship({"w": torch.zeros(4, 2)}, {"w": torch.zeros(3, 2)}, {"w": torch.zeros(3, 2)})
    with pytest.raises(ModelError, match="different architectures"):
        kinship({"w": torch.zeros(3, 4)}, {"w": torch.zeros(3, 2)}, {"w": torch.zeros(3, 2)})
    with pytest.raises(ModelError, match="no tensor 'w'"):
        kinship({"v": torch.zeros(3)}, other, base)
    # vocabulary rows beyond the base's: refused by default, compared on the base's rows when asked
    big = {"w": torch.tensor([1.0, 2.0, 3.0, 99.0])}
    with pytest.raises(ModelError, match="slice_to_base"):
        kinship(big, other, base)
    assert kinship(big, other, base, "pcc", vocab_policy="slice_to_base") == pytest.approx(1.0)


def test_relatedness_orders_distance_the_other_way() -> None:
    assert relatedness(0.3, "pcc") > relatedness(0.1, "pcc")
    assert relatedness(0.3, "ed") < relatedness(0.1, "ed")


# ------------------------------------------------------------------------------------- tiny saved models


def _save_llama(path: Path, state: dict[str, torch.Tensor] | None, config: object) -> dict[str, torch.Tensor]:
    model = save_model(path, config, state)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny Llama base and three fine-tunes: two related (shared direction), one independent."""
    root = tmp_path_factory.mktemp("kin_models")
    cfg = tiny_config("llama", vocab=48, layers=3, tied=False)
    torch.manual_seed(1)
    base = _save_llama(root / "base", None, cfg)
    gen = torch.Generator().manual_seed(7)
    shared = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in base.items()}
    states = {}
    for i, name in enumerate(("a", "b", "c")):
        st = {}
        for k, v in base.items():
            noise = torch.randn(v.shape, generator=gen) * 0.01
            mix = 1.5 if name in ("a", "b") else 0.0
            st[k] = v + mix * shared[k] + noise + 0.002 * (i + 1)  # offsets make the mean matter for PCC
        states[name] = _save_llama(root / name, st, cfg)
    return {"root": root, "base": base, "states": states, "config": cfg}


def _flat_delta(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([(state[k].double() - base[k].double()).reshape(-1) for k in base]).numpy()


def test_streamed_equals_flattened_on_saved_models(tiny_family: dict) -> None:
    root, base, states = tiny_family["root"], tiny_family["base"], tiny_family["states"]
    km = kinship_matrix([root / n for n in "abc"], root / "base", names=list("abc"), per_layer=True)
    flats = {n: _flat_delta(states[n], base) for n in "abc"}
    assert km.total.n == flats["a"].size
    for i, a in enumerate("abc"):
        for b in "abc"[i + 1:]:
            want = _flat_metrics(flats[a], flats[b])
            for metric in METRICS:
                assert km.value(a, b, metric) == pytest.approx(want[metric], rel=1e-9, abs=1e-12), (a, b, metric)
    # the related pair is clearly more kin than the independent one
    assert km.value("a", "b", "pcc") > 0.5 > 0.1 > km.value("a", "c", "pcc")
    # per-layer groups: 3 decoder layers plus embedding, norm and head; each equals its own flattened slice
    assert {"layer.0", "layer.1", "layer.2", "embedding", "head", "norm"} <= set(km.per_layer)
    assert sum(acc.n for acc in km.per_layer.values()) == km.total.n
    layer1 = [k for k in base if ".layers.1." in k]
    xa = torch.cat([(states["a"][k].double() - base[k].double()).reshape(-1) for k in layer1]).numpy()
    xb = torch.cat([(states["b"][k].double() - base[k].double()).reshape(-1) for k in layer1]).numpy()
    want = _flat_metrics(xa, xb)
    got = km.layer_values("a", "b", "pcc")
    assert got["layer.1"] == pytest.approx(want["pcc"], rel=1e-9)
    assert list(got)[0] == "embedding" and list(got)[1:4] == ["layer.0", "layer.1", "layer.2"]


def test_matrix_reads_each_tensor_once_per_model(tiny_family: dict) -> None:
    root = tiny_family["root"]
    from evomerge.models.folder import ModelFolder

    class Counting(DictSource):
        def __init__(self, folder: ModelFolder) -> None:
            super().__init__(folder.state_dict(), str(folder.path), folder.config)
            self.reads: dict[str, int] = {}

        def get(self, name: str) -> torch.Tensor:
            self.reads[name] = self.reads.get(name, 0) + 1
            return super().get(name)

    srcs = [Counting(ModelFolder.open(root / n)) for n in "abc"]
    kinship_matrix(srcs, root / "base")
    for s in srcs:
        assert set(s.reads.values()) == {1}
        assert len(s.reads) == len(s.tensor_names)


# ---------------------------------------------------------------------------------------- recipe algebra


def _materialized(recipe: Recipe, root: Path, extra: dict[str, Path] | None = None) -> dict[str, torch.Tensor]:
    from evomerge.merge.engines.resident import ResidentMerger

    models = {n: root / n for n in "abc"}
    models.update(extra or {})
    merger = ResidentMerger(root / "base", models, dtype=torch.float64)
    try:
        return merger.state_dict(recipe)
    finally:
        merger.close()


def _recipes() -> list[Recipe]:
    ta = Recipe("task_arithmetic", (ModelEntry("a", {"weight": ParamValue.per_layer([0.2, 1.0, 0.5])}),
                                    ModelEntry("c", {"weight": ParamValue.constant(0.7)})),
                base_model="base", parameters={"lambda": ParamValue.constant(0.9)})
    filt = Recipe("task_arithmetic", (ModelEntry("b", {"weight": ParamValue.parse(
        [{"filter": "kind:attention", "value": 1.5}, {"value": 0.3}])}), ModelEntry("c")),
        base_model="base")
    lin = Recipe("linear", (ModelEntry("a", {"weight": ParamValue.constant(0.25)}),
                            ModelEntry("b", {"weight": ParamValue.constant(0.75)})))
    return [ta, filt, lin]


def test_linear_recipe_algebra_equals_materialized(tiny_family: dict) -> None:
    root = tiny_family["root"]
    km = kinship_matrix([root / n for n in "abc"], root / "base", names=list("abc"), keep_tensors=True)
    gram = km.gram()
    from evomerge.models.folder import ModelFolder
    from evomerge.models.layers import LayerMap

    base_folder = ModelFolder.open(root / "base")
    lm = LayerMap.from_config(base_folder.config)
    recipes = _recipes()
    forms = [linear_form(r, gram, {}, "base", lm) for r in recipes]
    assert all(f is not None for f in forms)
    states = [_materialized(r, root) for r in recipes]
    # candidates against originals and against each other
    want = kinship_matrix([DictSource(s) for s in states] + [root / n for n in "abc"], base_folder,
                          names=["r0", "r1", "r2", "a", "b", "c"])
    algebra = {f"r{i}": f for i, f in enumerate(forms)} | {n: gram.unit(n) for n in "abc"}
    for x in ("r0", "r1", "r2"):
        for y in ("r0", "r1", "r2", "a", "b", "c"):
            if x == y:
                continue
            for metric in METRICS:
                assert gram.value(algebra[x], algebra[y], metric) == pytest.approx(
                    want.value(x, y, metric), rel=1e-8, abs=1e-10), (x, y, metric)


def test_nested_linear_parent_and_non_exact_cases(tiny_family: dict, tmp_path: Path) -> None:
    """A child of a merged (linear) parent is still exact through the parent's form; others are refused."""
    from evomerge.merge.engines.disk import merge_to_disk
    from evomerge.models.folder import ModelFolder
    from evomerge.models.layers import LayerMap

    root = tiny_family["root"]
    km = kinship_matrix([root / n for n in "abc"], root / "base", names=list("abc"), keep_tensors=True)
    gram = km.gram()
    lm = LayerMap.from_config(ModelFolder.open(root / "base").config)
    parent = Recipe("task_arithmetic", (ModelEntry(str(root / "a"), {"weight": ParamValue.constant(0.6)}),
                                        ModelEntry(str(root / "b"), {"weight": ParamValue.constant(0.4)})),
                    base_model=str(root / "base"), dtype="float32")
    merge_to_disk(parent, tmp_path / "p1", progress=False)
    parent_keyed = Recipe("task_arithmetic", (ModelEntry("a", {"weight": ParamValue.constant(0.6)}),
                                              ModelEntry("b", {"weight": ParamValue.constant(0.4)})),
                          base_model="base")
    p_form = linear_form(parent_keyed, gram, {}, "base", lm)
    child = Recipe("task_arithmetic", (ModelEntry("p1", {"weight": ParamValue.per_layer([1.0, 0.5])}),
                                       ModelEntry("c", {"weight": ParamValue.constant(0.8)})), base_model="base")
    c_form = linear_form(child, gram, {"p1": p_form}, "base", lm)
    assert c_form is not None
    state = _materialized(child, root, {"p1": tmp_path / "p1"})
    want = kinship_matrix([DictSource(state), root / "a", root / "c"], root / "base", names=["child", "a", "c"])
    for metric in METRICS:
        assert gram.value(c_form, gram.unit("a"), metric) == pytest.approx(want.value("child", "a", metric), rel=1e-6)
        assert gram.value(c_form, gram.unit("c"), metric) == pytest.approx(want.value("child", "c", metric), rel=1e-6)
    # not exact: TIES, linear without weights summing to one, an unknown (non-linear) parent, another base
    ties = Recipe("ties", (ModelEntry("a"), ModelEntry("b")), base_model="base")
    assert linear_form(ties, gram, {}, "base", lm) is None
    unnorm = Recipe("linear", (ModelEntry("a"), ModelEntry("b")), options={"normalize": False})
    assert linear_form(unnorm, gram, {}, "base", lm) is None
    assert linear_form(child, gram, {}, "base", lm) is None  # p1's form unknown
    assert linear_form(parent_keyed, gram, {}, "other_base", lm) is None


def test_cli_prints_matrix_and_heatmap(tiny_family: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from evomerge.cli import main

    root = tiny_family["root"]
    out = tmp_path / "heat.png"
    rc = main(["kinship", str(root / "a"), str(root / "b"), str(root / "c"), "--base", str(root / "base"),
               "--metric", "all", "--heatmap", str(out), "--per-layer", "--json", str(tmp_path / "k.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "pcc" in text and "abs_cos" in text and "per layer: a vs b" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    data = json.loads((tmp_path / "k.json").read_text())
    flats = {n: _flat_delta(tiny_family["states"][n], tiny_family["base"]) for n in "ab"}
    assert data["global"]["pcc"][0][1] == pytest.approx(_flat_metrics(flats["a"], flats["b"])["pcc"], rel=1e-9)
    rc = main(["kinship", str(root / "a"), "--base", str(root / "base")])
    assert rc == 2


def test_chunked_accumulation_equals_one_block(tiny_family: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors are folded in float64 chunks; tiny chunks must give the same sums."""
    import evomerge.kinship as K

    root = tiny_family["root"]
    whole = kinship_matrix([root / n for n in "abc"], root / "base")
    monkeypatch.setattr(K, "_CHUNK", 7)
    chunked = kinship_matrix([root / n for n in "abc"], root / "base")
    assert chunked.total.n == whole.total.n
    np.testing.assert_allclose(chunked.total.gram, whole.total.gram, rtol=1e-12)
    np.testing.assert_allclose(chunked.total.sums, whole.total.sums, rtol=1e-10, atol=1e-15)
