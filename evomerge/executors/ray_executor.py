"""Ray executor: resident worker actors, one device each, steady-state scheduling, fault tolerance.

Each actor builds its worker once from a :class:`~evomerge.executors.worker.WorkerSpec` (paths, not weights),
keeps the model resident and evaluates one job at a time. Only jobs (recipes) and outcomes (scores) cross the
network. There is no generation barrier: a worker that finishes gets the next queued job at once.

A worker that dies (out of memory, killed, node lost) or runs past ``eval_timeout`` is replaced by a new actor
in the same slot and its job comes back as an outcome with ``lost=True``; the search's dispatcher decides whether to
re-queue it. Before any actor is created the cluster's resources are checked against the request, so a GPU
request on a CPU-only cluster fails with a clear message instead of pending forever.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.executors.base import EvalJob, EvalOutcome, Worker
from evomerge.executors.worker import MergeEvalWorker, WorkerSpec, _rss_bytes
from evomerge.fitness.result import EvalResult

WorkerFactory = Callable[[WorkerSpec, str], Worker]

# consecutive failed (re)starts of one slot before the executor gives up: something systematic is wrong
MAX_START_FAILURES = 3


def _default_factory(spec: WorkerSpec, name: str) -> Worker:
    return MergeEvalWorker(spec, name)


class EvalActor:
    """The body of one Ray actor: builds the worker once, then evaluates jobs one at a time.

    Startup errors are kept and reported by :meth:`ready` (so the driver can raise a clear error) instead of
    killing the actor with an opaque ``ActorDiedError``.
    """

    def __init__(self, spec: WorkerSpec, name: str, factory: WorkerFactory | None, threads: int,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.error: tuple[BaseException, str] | None = None
        self.worker: Worker | None = None
        for key, value in (env or {}).items():
            os.environ[str(key)] = str(value)
        marker = os.environ.get("EVOMERGE_TEST_HOOK_FILE")
        if marker and os.path.exists(marker):  # a test hook fires once per run, not again in the replacement
            os.environ.pop("EVOMERGE_TEST_HOOK", None)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        try:
            spec = replace(spec, device=self._device(spec), threads=spec.threads or threads)
            self.spec = spec
            self.worker = (factory or _default_factory)(spec, name)
        except BaseException as exc:  # noqa: BLE001 - reported by ready(), raised in the driver
            self.error = (exc, traceback.format_exc(limit=8))

    @staticmethod
    def _device(spec: WorkerSpec) -> str:
        """The device this actor owns: the one GPU Ray assigned (visible as cuda:0), else the spec's device."""
        if not str(spec.device).startswith("cuda"):
            return spec.device
        import ray

        ids = ray.get_gpu_ids()
        if ids:  # Ray restricted CUDA_VISIBLE_DEVICES to the assigned GPU(s); the first is cuda:0
            return "cuda:0"
        return spec.device

    def ready(self) -> dict[str, Any]:
        """Startup report: pid, device, and the startup error if the worker could not be built."""
        out: dict[str, Any] = {"pid": os.getpid(), "name": self.name}
        if self.error is not None:
            exc, tb = self.error
            try:
                import pickle

                pickle.dumps(exc)
                out["exception"] = exc
            except Exception:  # noqa: BLE001 - an unpicklable exception travels as text only
                out["exception"] = None
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = tb
        else:
            out["device"] = getattr(self.spec, "device", "?")
            out["threads"] = getattr(self.worker, "threads", None)  # torch threads the worker set
            out["tier"] = getattr(self.worker, "tier", None)
        return out

    def evaluate(self, job: EvalJob) -> tuple[EvalOutcome, float]:
        """(outcome, seconds spent in the worker); the seconds feed the busy/idle accounting."""
        t0 = time.perf_counter()
        if self.worker is None:
            msg = self.error and f"{type(self.error[0]).__name__}: {self.error[0]}"
            res = EvalResult.failure(f"worker {self.name} did not start: {msg}", -1e6, job.split)
            return EvalOutcome(job=job, result=res, worker=self.name), 0.0
        outcome = self.worker.evaluate(job)
        return outcome, time.perf_counter() - t0

    def memory_bytes(self) -> dict[str, int]:
        """Memory of this actor (the worker's own report when it has one), for leak checks."""
        fn = getattr(self.worker, "memory_bytes", None)
        if callable(fn):
            return dict(fn())
        return {"rss": _rss_bytes()}

    def pid(self) -> int:
        return os.getpid()


@dataclass
class _Slot:
    """One worker position; its actor may be replaced, its name and statistics stay."""

    name: str
    actor: Any = None
    actor_name: str = ""
    ready_ref: Any = None  # set while a (replacement) actor is starting
    starting_since: float = 0.0
    # jobs sent to the actor, in order: the first is running, the others wait in the actor's own queue
    inflight: deque[tuple[EvalJob, Any]] = field(default_factory=deque)
    running_since: float = 0.0  # when the first in-flight job started (as far as the driver knows)
    opened: float | None = None  # when the current actor became usable (for idle accounting)
    jobs: int = 0
    busy_seconds: float = 0.0
    open_seconds: float = 0.0
    restarts: int = 0
    start_failures: int = 0
    lost: int = 0
    pid: int | None = None
    threads: int | None = None  # torch threads the current actor's worker uses
    history: list[str] = field(default_factory=list)


class RayExecutor:
    """The :class:`~evomerge.executors.base.Executor` protocol over Ray actors (see module docstring).

    ``capacity`` is ``workers × (1 + prefetch)``: each actor runs one job and holds ``prefetch`` more in its own
    queue, so a finishing worker never waits for the driver. ``worker_factory`` (a top-level function, so it
    pickles by reference) builds something other than :class:`MergeEvalWorker`, e.g. the simulated worker;
    ``worker_env`` sets environment variables in chosen workers (``"*"``: all), e.g. test hooks.
    """

    def __init__(self, spec: WorkerSpec, workers: int, *, address: str | None = None,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float | None = None,
                 eval_timeout: float | None = None, penalty: float = -1e6,
                 worker_factory: WorkerFactory | None = None, ray_init_kwargs: dict[str, Any] | None = None,
                 worker_env: Mapping[str, Mapping[str, str]] | None = None,
                 startup_timeout: float = 600.0, prefetch: int = 1) -> None:
        if workers <= 0:
            raise ConfigError(f"workers: must be positive, got {workers}")
        if cpus_per_worker < 0:
            raise ConfigError(f"executor.cpus_per_worker: must be >= 0, got {cpus_per_worker}")
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if str(spec.device).startswith("cuda") else 0.0
        if gpus_per_worker < 0:
            raise ConfigError(f"executor.gpus_per_worker: must be >= 0, got {gpus_per_worker}")
        if eval_timeout is not None and eval_timeout <= 0:
            raise ConfigError(f"executor.eval_timeout: must be positive, got {eval_timeout}")
        import ray

        self._ray = ray
        self.spec = spec
        self.workers = int(workers)
        self.cpus = float(cpus_per_worker)
        self.gpus = float(gpus_per_worker)
        self.eval_timeout = eval_timeout
        self.penalty = float(penalty)
        self.factory = worker_factory
        # environment variables per worker slot name ("*": every worker), set before the worker is built
        self.worker_env = {k: dict(v) for k, v in (worker_env or {}).items()}
        self.threads = int(spec.threads or max(1, round(self.cpus)))
        self.address = address
        self.startup_timeout = float(startup_timeout)
        # jobs queued at each actor beyond the running one: a worker that finishes starts its next job at
        # once, without a round trip through the driver (which may be busy recording and checkpointing)
        self.prefetch = max(0, int(prefetch))
        self._queue: deque[EvalJob] = deque()
        self._done: list[EvalOutcome] = []
        self._closed = False
        self._started_ray = False
        self._prefix = f"evomerge-{uuid.uuid4().hex[:8]}"
        self._init_ray(address, ray_init_kwargs)
        try:
            self._check_resources()
            self._actor_cls = ray.remote(EvalActor)
            self._slots = [_Slot(name=f"w{i}") for i in range(self.workers)]
            for slot in self._slots:
                self._start_actor(slot)
            self._wait_started(startup_timeout)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ setup

    def _init_ray(self, address: str | None, extra: dict[str, Any] | None) -> None:
        """Join ``address`` (or an already initialized Ray) or start a local instance sized for the request."""
        ray = self._ray
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"namespace": "evomerge", "log_to_driver": False,
                                  "logging_level": logging.WARNING, "configure_logging": True}
        if address:
            kwargs["address"] = address
        else:
            needed = math.ceil(self.workers * self.cpus - 1e-9)
            kwargs.update(num_cpus=max(1, needed, os.cpu_count() or 1), include_dashboard=False)
        kwargs.update(extra or {})
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address!r}: {exc} (start one with `ray start "
                              "--head` on the head node, then pass its address, e.g. --ray-address HOST:6379)") \
                from exc
        self._started_ray = True

    def _where(self) -> str:
        return f"the Ray cluster at {self.address}" if self.address else "the local Ray instance"

    def _check_resources(self) -> None:
        """Raise ConfigError when the cluster cannot place every worker (instead of waiting forever)."""
        ray = self._ray
        total = ray.cluster_resources()
        have_cpu, have_gpu = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
        ask = f"asked for {self.workers} workers × {self.cpus:g} CPU" + (
            f" and {self.gpus:g} GPU" if self.gpus else "")
        if self.gpus > 0 and have_gpu < self.gpus:
            raise ConfigError(f"{ask} but {self._where()} has {have_gpu:g} GPUs (use device: cpu, set "
                              "executor.gpus_per_worker: 0, or join a cluster with GPUs via --ray-address)")
        fit = 0
        for node in ray.nodes():
            if not node.get("Alive", node.get("alive", False)):
                continue
            res = node.get("Resources", {})
            n_cpu, n_gpu = float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))
            per = [math.floor(n_cpu / self.cpus + 1e-9) if self.cpus > 0 else self.workers,
                   math.floor(n_gpu / self.gpus + 1e-9) if self.gpus > 0 else self.workers]
            fit += min(per)
        if fit < self.workers:
            raise ConfigError(f"{ask} but {self._where()} can place only {fit} such workers "
                              f"({have_cpu:g} CPUs, {have_gpu:g} GPUs in all); lower workers or cpus/gpus per "
                              "worker, or add nodes")

    def _start_actor(self, slot: _Slot) -> None:
        slot.actor_name = f"{self._prefix}-{slot.name}-r{slot.restarts}"
        options: dict[str, Any] = {"name": slot.actor_name, "num_cpus": self.cpus, "num_gpus": self.gpus,
                                   "max_restarts": 0, "max_task_retries": 0}
        env = {**self.worker_env.get("*", {}), **self.worker_env.get(slot.name, {})}
        slot.actor = self._actor_cls.options(**options).remote(self.spec, slot.name, self.factory, self.threads,
                                                               env)
        slot.ready_ref = slot.actor.ready.remote()
        slot.opened, slot.pid, slot.starting_since = None, None, time.monotonic()

    def _wait_started(self, timeout: float) -> None:
        """Block until every actor has built its worker; raise the first startup error clearly."""
        ray = self._ray
        refs = {slot.ready_ref: slot for slot in self._slots}
        deadline = time.monotonic() + timeout
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                names = ", ".join(refs[r].name for r in pending)
                raise EvomergeError(f"Ray workers {names} did not start within {timeout:g} s on {self._where()} "
                                    f"(each asks for {self.cpus:g} CPU, {self.gpus:g} GPU; see `ray status`)")
            for ref in ready:
                self._on_ready(refs[ref], ref, raise_errors=True)

    def _on_ready(self, slot: _Slot, ref: Any, raise_errors: bool) -> bool:
        """Handle a finished ``ready()`` call; True when the slot's actor is usable."""
        ray = self._ray
        slot.ready_ref = None
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:
            info = {"error": f"{type(exc).__name__}: {exc}", "exception": None, "traceback": ""}
        if "error" in info:
            slot.start_failures += 1
            exc = info.get("exception")
            msg = f"Ray worker {slot.name} could not start: {info['error']}"
            if raise_errors or slot.start_failures >= MAX_START_FAILURES:
                self._kill(slot)
                if isinstance(exc, EvomergeError):
                    raise type(exc)(msg) from exc
                raise EvomergeError(f"{msg}\n{info.get('traceback', '')}".rstrip())
            self._replace(slot, f"start failed: {info['error']}")
            return False
        slot.start_failures = 0
        slot.pid = info.get("pid")
        slot.threads = info.get("threads")
        slot.opened = time.perf_counter()
        return True

    # -------------------------------------------------------------------------------------- protocol

    @property
    def capacity(self) -> int:
        return self.workers * (1 + self.prefetch)

    def submit(self, job: EvalJob) -> None:
        if self._closed:
            raise RuntimeError("submit() on a closed RayExecutor")
        self._queue.append(job)
        self._dispatch()

    def pending(self) -> int:
        return len(self._queue) + sum(len(s.inflight) for s in self._slots) + len(self._done)

    def poll(self, timeout: float | None = None) -> list[EvalOutcome]:
        """Finished outcomes; blocks up to ``timeout`` (None: until one) when jobs are in flight."""
        ray = self._ray
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatch()
            if self._done:
                break
            waiting = {s.inflight[0][1]: s for s in self._slots if s.inflight}  # running jobs
            starting = {s.ready_ref: s for s in self._slots if s.ready_ref is not None}
            if not waiting and not self._queue:
                break
            wait_for = self._next_wake(deadline)
            refs = list(waiting) + list(starting)
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=wait_for)
                if ready:
                    rest = [r for r in refs if r not in set(ready)]
                    more, _ = ray.wait(rest, num_returns=len(rest), timeout=0) if rest else ([], [])
                    ready = list(ready) + list(more)
                done_refs = set(ready)
                for slot in {waiting[r].name: waiting[r] for r in ready if r in waiting}.values():
                    self._collect(slot, done_refs)
                for ref in ready:
                    if ref in starting:
                        self._on_ready(starting[ref], ref, raise_errors=False)
            elif wait_for is None or wait_for > 0:
                time.sleep(min(wait_for if wait_for is not None else 0.05, 0.05))
            self._check_timeouts()
            self._check_stalled()
            if self._done or (deadline is not None and time.monotonic() >= deadline):
                break
        out, self._done = self._done, []
        return out

    def close(self) -> None:
        """Kill the actors (their memory goes with them); shut Ray down only if this executor started it."""
        if self._closed:
            return
        self._closed = True
        now = time.perf_counter()
        for slot in getattr(self, "_slots", []):
            self._close_window(slot, now)
            self._kill(slot)
        self._queue.clear()
        for slot in getattr(self, "_slots", []):
            slot.inflight.clear()
        if self._started_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- internals

    def _dispatch(self) -> None:
        """Send queued jobs to started workers: idle ones first, then up to ``prefetch`` more per worker."""
        for depth in range(1 + self.prefetch):
            for slot in self._slots:
                if not self._queue:
                    return
                if len(slot.inflight) == depth and slot.ready_ref is None and slot.actor is not None:
                    job = self._queue.popleft()
                    if not slot.inflight:
                        slot.running_since = time.monotonic()
                    slot.inflight.append((job, slot.actor.evaluate.remote(job)))

    def _next_wake(self, deadline: float | None) -> float | None:
        """Seconds to wait: until the poll deadline or the earliest evaluation timeout, whichever is first."""
        now = time.monotonic()
        ends = [] if deadline is None else [deadline]
        if self.eval_timeout is not None:
            ends += [s.running_since + self.eval_timeout for s in self._slots if s.inflight]
        if not ends:
            return None
        return max(0.0, min(ends) - now)

    def _collect(self, slot: _Slot, ready: set[Any]) -> None:
        """Take the finished jobs at the head of a worker's pipeline (the actor runs them in order)."""
        ray = self._ray
        while slot.inflight:
            ref = slot.inflight[0][1]
            if ref not in ready and not ray.wait([ref], num_returns=1, timeout=0)[0]:
                return
            job, _ = slot.inflight.popleft()
            slot.running_since = time.monotonic()
            try:
                outcome, seconds = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the actor lives; this job failed unexpectedly
                res = EvalResult.failure(f"{type(exc).__name__}: {exc}", self.penalty, job.split)
                self._done.append(EvalOutcome(job=job, result=res, worker=slot.name))
                slot.jobs += 1
                continue
            except ray.exceptions.RayError as exc:  # actor died, node lost, object lost: replace the worker
                self._lose(slot, job, f"worker {slot.name} died during the evaluation ({type(exc).__name__}: "
                                      f"{_first_line(exc)})")
                return
            slot.jobs += 1
            slot.busy_seconds += float(seconds)
            self._done.append(outcome)

    def _check_timeouts(self) -> None:
        if self.eval_timeout is None:
            return
        now = time.monotonic()
        for slot in self._slots:
            if slot.inflight and now - slot.running_since > self.eval_timeout:
                job, _ = slot.inflight.popleft()
                self._lose(slot, job, f"evaluation on worker {slot.name} ran past eval_timeout "
                                      f"{self.eval_timeout:g} s; worker killed")

    def _check_stalled(self) -> None:
        """Raise when no worker is usable and replacements have waited past the startup timeout (e.g. the
        node with the GPUs is gone): better a clear error than a search that waits forever."""
        if any(s.ready_ref is None and s.actor is not None for s in self._slots):
            return
        now = time.monotonic()
        if all(s.ready_ref is not None and now - s.starting_since > self.startup_timeout for s in self._slots):
            raise EvomergeError(f"no Ray worker could be (re)started within {self.startup_timeout:g} s on "
                                f"{self._where()} (each asks for {self.cpus:g} CPU, {self.gpus:g} GPU; see "
                                "`ray status`); the run can be resumed once the cluster has the resources")

    def _lose(self, slot: _Slot, job: EvalJob, reason: str) -> None:
        """Report the running job lost (the caller may re-queue it), put the never-started ones back at the
        front of the queue (no attempt is charged for them), and replace the worker."""
        slot.lost += 1
        res = EvalResult.failure(reason, self.penalty, job.split)
        self._done.append(EvalOutcome(job=job, result=res, worker=slot.name, lost=True))
        while slot.inflight:
            self._queue.appendleft(slot.inflight.pop()[0])
        self._replace(slot, reason)

    def _replace(self, slot: _Slot, reason: str) -> None:
        self._close_window(slot, time.perf_counter())
        self._kill(slot)
        slot.history.append(reason)
        slot.restarts += 1
        if not self._closed:
            self._start_actor(slot)

    def _close_window(self, slot: _Slot, now: float) -> None:
        if slot.opened is not None:
            slot.open_seconds += now - slot.opened
            slot.opened = None

    def _kill(self, slot: _Slot) -> None:
        if slot.actor is not None:
            with contextlib.suppress(Exception):  # already gone
                self._ray.kill(slot.actor, no_restart=True)
        slot.actor, slot.ready_ref = None, None

    # ---------------------------------------------------------------------------------------- extras

    def stats(self) -> dict[str, Any]:
        """Per worker: jobs, busy/idle seconds (idle = usable but without a job), restarts, lost jobs."""
        now = time.perf_counter()
        per: dict[str, dict[str, Any]] = {}
        for slot in self._slots:
            open_s = slot.open_seconds + (now - slot.opened if slot.opened is not None else 0.0)
            per[slot.name] = {"jobs": slot.jobs, "busy_seconds": slot.busy_seconds,
                              "idle_seconds": max(0.0, open_s - slot.busy_seconds), "open_seconds": open_s,
                              "restarts": slot.restarts, "lost": slot.lost, "pid": slot.pid, "threads": slot.threads}
        busy = sum(p["busy_seconds"] for p in per.values())
        opened = sum(p["open_seconds"] for p in per.values())
        return {"workers": per, "busy_seconds": busy, "open_seconds": opened,
                "idle_fraction": (1.0 - busy / opened) if opened > 0 else 0.0,
                "restarts": sum(p["restarts"] for p in per.values()), "queued": len(self._queue)}

    def reset_stats(self) -> None:
        """Start the busy/idle accounting afresh (e.g. after a warm-up)."""
        now = time.perf_counter()
        for slot in self._slots:
            slot.jobs, slot.busy_seconds, slot.open_seconds = 0, 0.0, 0.0
            if slot.opened is not None:
                slot.opened = now

    def call(self, worker: str, method: str, *args: Any, timeout: float | None = 60.0) -> Any:
        """Call an actor method (``memory_bytes``, ``pid``) on one worker; for tests and status."""
        slot = next(s for s in self._slots if s.name == worker)
        if slot.actor is None:
            raise RuntimeError(f"worker {worker} has no live actor")
        return self._ray.get(getattr(slot.actor, method).remote(*args), timeout=timeout)

    def worker_pids(self) -> dict[str, int | None]:
        return {s.name: s.pid for s in self._slots}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
