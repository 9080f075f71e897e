"""The merge-and-score worker: data-hungry methods get the fitness's data; diagnostics are recorded."""

from __future__ import annotations

import pytest
from helpers.spaces import micro_space

from evomerge.executors.base import EvalJob
from evomerge.executors.worker import MergeEvalWorker
from evomerge.search.genome import Genome
from evomerge.search.space import space_from_dict
from evomerge.search.workers import worker_spec

pytestmark = pytest.mark.usefixtures("micro_zoo")  # the spaces name zoo:micro paths


@pytest.mark.parametrize(("method", "genes"), [
    ("qp", {"weight": [0.0, 1.0]}),
    ("apl", {"density": [0.3, 0.9]}),
    ("mergeability_weighted", {"tau": [0.05, 1.0]}),
])
def test_seed_methods_work_as_search_genes(method: str, genes: dict) -> None:
    space = space_from_dict(micro_space(methods={method: genes}))
    worker = MergeEvalWorker(worker_spec(space))
    genome = Genome(space)
    out = worker.evaluate(EvalJob(1, genome.decode(genome.parametrization(0).value)))
    assert out.result.ok, out.result.error
    assert 0.0 <= out.result.aggregate <= 1.0
    if method == "qp":
        assert 0.0 <= out.result.settings["qp_rho"] <= 1.0
    if method == "mergeability_weighted":
        # the base's own task scores, measured once by the worker on the live model
        base = worker.evaluator.score(_base_model(space), "search").task_values()
        assert worker.merger.base_scores == pytest.approx({k: base[k] for k in ("add", "rev", "sort", "enc")})


def _base_model(space: object) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(space.base_path), dtype=torch.float32)  # type: ignore[attr-defined]


def test_a_member_key_named_with_another_folder_is_loaded_again() -> None:
    """A worker reused across runs (benchmarks) sees the same member key (g1.1) for other weights."""
    from evomerge.merge.recipe import ModelEntry, Recipe

    space = space_from_dict(micro_space())
    worker = MergeEvalWorker(worker_spec(space))
    alone = Recipe("linear", (ModelEntry("g1.1"),))
    first = worker.evaluate(EvalJob(1, alone, extra_models={"g1.1": str(space.models["add"])})).result
    second = worker.evaluate(EvalJob(2, alone, extra_models={"g1.1": str(space.models["rev"])})).result
    rev = worker.evaluate(EvalJob(3, Recipe("linear", (ModelEntry("rev"),)))).result
    assert first.ok and second.ok and rev.ok
    assert second.aggregate == pytest.approx(rev.aggregate, abs=1e-6)
    assert first.aggregate != pytest.approx(second.aggregate, abs=1e-3)
