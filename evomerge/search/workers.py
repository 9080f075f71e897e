"""Pick the executor a search space asks for: in-process for one worker, Ray for more (or when told)."""

from __future__ import annotations

from evomerge.errors import ConfigError
from evomerge.executors.base import Executor, InProcessExecutor
from evomerge.executors.ray_executor import RayExecutor
from evomerge.executors.worker import MergeEvalWorker, WorkerSpec
from evomerge.search.space import Space


def worker_spec(space: Space, splits: tuple[str, ...] = ("search",)) -> WorkerSpec:
    """The picklable description of a worker for ``space`` (an :class:`evomerge.search.space.Space`)."""
    raw = space.raw
    return WorkerSpec(base=str(space.base_path), models={k: str(v) for k, v in space.models.items()},
                      fitness=space.fitness, device=raw.device, dtype=raw.dtype, splits=splits,
                      threads=raw.executor.threads_per_worker, vocab_policy=raw.vocab_policy)


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
        worker = MergeEvalWorker(spec)
        return InProcessExecutor(lambda: worker, penalty=space.penalty)
    return RayExecutor(spec, workers=raw.workers, address=address or raw.executor.address,
                       cpus_per_worker=raw.executor.cpus_per_worker, gpus_per_worker=raw.executor.gpus_per_worker,
                       eval_timeout=raw.executor.eval_timeout, penalty=space.penalty, prefetch=raw.executor.prefetch)
