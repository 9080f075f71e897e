"""Pick the executor a search space asks for: in-process for one worker, Ray for more (or when told)."""

from __future__ import annotations

import dataclasses

from evomerge.errors import ConfigError
from evomerge.executors.base import Executor, InProcessExecutor
from evomerge.executors.ray_executor import RayExecutor
from evomerge.executors.worker import MergeEvalWorker, WorkerSpec
from evomerge.search.space import Space


def plan_methods(space: Space) -> tuple[tuple[str, ...], int | None]:
    """The methods a worker of ``space`` may merge with (the population's pair method included) and, for a
    population run, the inputs of its pair merges (2): what the memory plan counts calibration for."""
    methods = [m.name for m in space.methods]
    pair = (space.raw.population or {}).get("pair") or {}
    if isinstance(pair, dict) and isinstance(pair.get("method"), str):
        methods.append(pair["method"])
    return tuple(dict.fromkeys(methods)), (2 if space.raw.population is not None else None)


def worker_spec(space: Space, splits: tuple[str, ...] = ("search",)) -> WorkerSpec:
    """The picklable description of a worker for ``space`` (an :class:`evomerge.search.space.Space`)."""
    raw = space.raw
    methods, pair_models = plan_methods(space)
    return WorkerSpec(base=str(space.base_path), models={k: str(v) for k, v in space.models.items()},
                      fitness=space.fitness, device=raw.device, dtype=raw.dtype, splits=splits,
                      threads=raw.executor.threads_per_worker, vocab_policy=raw.vocab_policy,
                      resident=raw.resident, methods=methods, pair_models=pair_models,
                      host_workers=raw.workers if not raw.executor.address else 1)


def executor_kind(space: Space, address: str | None = None) -> str:
    raw = space.raw
    kind = raw.executor.kind
    if kind == "auto":
        kind = "ray" if raw.workers > 1 or address or raw.executor.address else "inprocess"
    if kind == "inprocess" and raw.workers > 1:
        raise ConfigError(f"{space.where}: executor.kind inprocess runs one worker; "
                          f"workers is {raw.workers} (use kind: ray or auto)")
    return kind


def make_executor(space: Space, spec: WorkerSpec, *, address: str | None = None) -> Executor:
    """An executor for ``space``: :class:`InProcessExecutor` (worker built now) or a Ray executor."""
    raw = space.raw
    if executor_kind(space, address) == "inprocess":
        if spec.threads is None and "cpus_per_worker" in raw.executor.model_fields_set:  # the stated allotment
            spec = dataclasses.replace(spec, threads=max(1, round(raw.executor.cpus_per_worker)))
        worker = MergeEvalWorker(spec)
        return InProcessExecutor(lambda: worker, penalty=space.penalty)
    return RayExecutor(spec, workers=raw.workers, address=address or raw.executor.address,
                       cpus_per_worker=raw.executor.cpus_per_worker, gpus_per_worker=raw.executor.gpus_per_worker,
                       eval_timeout=raw.executor.eval_timeout, penalty=space.penalty, prefetch=raw.executor.prefetch)
