"""The black-box search loop: nevergrad ask/tell over the genome, evaluations through an Executor, the archive.

Steady state, no generation barrier: the loop keeps ``executor.capacity`` candidates in flight and asks for a new
one as soon as one finishes. Order of one step, chosen so that any interruption is recoverable exactly:

1. ask the optimizer for candidates (identical recipes are answered from the archive, never evaluated twice);
2. write the checkpoint (optimizer + in-flight candidates) atomically, *then* submit the new jobs;
3. when a job finishes: append it to the archive, *then* tell the optimizer.

So on resume every archived candidate is either told in the checkpoint or in-flight in it (told now, from the
checkpoint's own candidate object), and every in-flight candidate not archived is submitted again as it was.
With one evaluator a resumed run produces the same archive as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import ConfigError
from evomerge.executors.base import EvalJob, EvalOutcome, Executor
from evomerge.fitness.result import EvalResult
from evomerge.killpoints import kill_point
from evomerge.search.archive import Archive, CandidateRecord
from evomerge.search.genome import Genome
from evomerge.search.progress import ProgressLine
from evomerge.search.run import RunDir
from evomerge.search.space import Space
from evomerge.search.stopping import SearchProgress, StoppingRules

CHECKPOINT_FORMAT = 1
MAX_DUPLICATES_IN_A_ROW = 200  # the optimizer has converged onto archived recipes: stop asking
TIMING_EVERY = 10  # evaluations between timing snapshots in the archive


class StopFlag:
    """Set from a signal handler (Ctrl-C, SIGTERM): stop asking, finish what is in flight."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass
class _InFlight:
    """A candidate asked and submitted but not yet archived (lives in the checkpoint)."""

    candidate_id: int
    candidate: Any  # the nevergrad candidate (same object the optimizer asked)
    recipe: Any  # Recipe
    recipe_hash: str
    genome: dict[str, Any]
    attempt: int = 0
    followers: list[Any] = field(default_factory=list)  # later asks of the same recipe, told with its result


@dataclass
class Timings:
    """Where this session's wall time went (seconds)."""

    setup: float = 0.0
    evaluation: float = 0.0  # inside workers: scoring (summed over workers)
    merging: float = 0.0  # inside workers: merging recipes into the resident model
    optimizer: float = 0.0  # ask, tell, decoding
    checkpoint: float = 0.0
    archive: float = 0.0
    waiting: float = 0.0  # the loop blocked on the executor (covers evaluation when in-process)
    wall: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SearchSummary:
    evaluations: int
    failed: int
    best_id: int | None
    best: float | None
    stop_reason: str
    session: int
    timings: Timings


def new_optimizer(space: Space, genome: Genome, num_workers: int) -> Any:
    import warnings

    import nevergrad as ng

    try:  # nevergrad asks CMA one candidate at a time; cma warns about it, harmlessly
        from cma.evolution_strategy import InjectionWarning

        warnings.filterwarnings("ignore", category=InjectionWarning)
    except ImportError:
        pass
    try:
        cls = ng.optimizers.registry[space.optimizer_name]
    except KeyError:
        raise ConfigError(f"{space.where}: optimizer.name: unknown nevergrad optimizer {space.optimizer_name!r}") \
            from None
    optimizer = cls(parametrization=genome.parametrization(space.seed), budget=space.budget,
                    num_workers=max(1, num_workers))
    bound_archives(optimizer)
    return optimizer


def bound_archives(optimizer: Any) -> None:
    """Keep nevergrad's own archive of told points small (up to 1000 by default, pickled with every checkpoint;
    evomerge's archive is the record), so a checkpoint stays bounded however long the run."""
    from nevergrad.optimization.utils import Pruning

    keep = max(32, 4 * max(1, int(getattr(optimizer, "num_workers", 1))))
    _limit_archives(optimizer, Pruning(min_len=keep, max_len=2 * keep), set())


def _limit_archives(optimizer: Any, pruning: Any, seen: set[int]) -> None:
    """Set ``pruning`` on an optimizer and the ones it wraps (configured and portfolio optimizers)."""
    if optimizer is None or id(optimizer) in seen or not hasattr(optimizer, "pruning"):
        return
    seen.add(id(optimizer))
    if not isinstance(optimizer.pruning, type(pruning)) or optimizer.pruning.max_len != pruning.max_len:
        optimizer.pruning = pruning
    _limit_archives(getattr(optimizer, "_optim", None), pruning, seen)
    for inner in getattr(optimizer, "optims", None) or []:
        _limit_archives(inner, pruning, seen)


def run_search(run: RunDir, space: Space, executor: Executor, *, progress: bool = True,
               stop: StopFlag | None = None, setup_seconds: float = 0.0,
               log: Callable[[str], None] | None = None) -> SearchSummary:
    """Search until a stopping rule fires (or ``stop`` is set), resuming from the run's checkpoint if any."""
    with run.archive() as archive:
        return _Loop(run, space, executor, archive, progress, stop or StopFlag(), setup_seconds, log).run()


class _Loop:
    def __init__(self, run: RunDir, space: Space, executor: Executor, archive: Archive, progress: bool,
                 stop: StopFlag, setup_seconds: float, log: Callable[[str], None] | None) -> None:
        self.run_dir, self.space, self.executor, self.archive = run, space, executor, archive
        self.stop = stop
        self.genome = Genome(space)
        self.timings = Timings(setup=setup_seconds)
        self.t_start = time.monotonic() - setup_seconds
        self._log = log
        self._show_progress = progress
        self.rules = StoppingRules(budget=space.budget, wall_time=space.raw.stopping.wall_time,
                                   no_improvement=space.raw.stopping.no_improvement, target=space.raw.stopping.target)
        self.max_retries = space.raw.executor.max_retries
        self.settings_base = {"optimizer": space.optimizer_name, "seed": space.seed}

    def say(self, message: str) -> None:
        self.run_dir.log(message)
        if self._log is not None:
            self._log(message)

    # --------------------------------------------------------------------------------- state

    def _load_state(self) -> None:
        state = self.run_dir.load_checkpoint()
        self.run_dir.clean_temporaries()
        if state is None:
            # nevergrad's num_workers: candidates asked before results come back (optimizer.batch_size)
            self.optimizer = new_optimizer(self.space, self.genome,
                                           max(self.space.batch_size, self.executor.capacity))
            self.inflight: dict[int, _InFlight] = {}
            self.told: set[int] = set()
            self.next_id = self.archive.max_id() + 1
            self.duplicates = 0
            self.elapsed_before = 0.0
            return
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{self.run_dir.checkpoint_path}: checkpoint format {state.get('format')} unknown")
        self.optimizer = state["optimizer"]
        self.inflight = {e.candidate_id: e for e in state["inflight"]}
        self.told = set(state["told"])
        self.next_id = int(state["next_id"])
        self.duplicates = int(state.get("duplicates", 0))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        if self.optimizer.budget is None or self.optimizer.budget < self.space.budget:
            self.optimizer.budget = self.space.budget

    def _checkpoint(self) -> None:
        t0 = time.perf_counter()
        bound_archives(self.optimizer)  # inner optimizers appear at the first ask
        self.run_dir.save_checkpoint({
            "format": CHECKPOINT_FORMAT, "optimizer": self.optimizer,
            "inflight": sorted(self.inflight.values(), key=lambda e: e.candidate_id), "told": sorted(self.told),
            "next_id": self.next_id, "duplicates": self.duplicates,
            "elapsed": self.elapsed_before + (time.monotonic() - self.t_start),
        })
        self.timings.checkpoint += time.perf_counter() - t0

    def _reconcile(self) -> None:
        """Tell the optimizer what the archive holds beyond the checkpoint (a kill between archive and tell)."""
        records = self.archive.results("search")
        self.progress = SearchProgress.of((r.id, r.aggregate, r.ok) for r in records)
        late = [r for r in records if r.id not in self.told]
        for rec in late:
            entry = self.inflight.pop(rec.id, None)
            if entry is not None:
                self._tell(entry, rec.aggregate)
            elif rec.genome is not None:  # archived by an older checkpoint's session: tell-not-asked replay
                cand = Genome.from_json(rec.genome, self.optimizer.parametrization)
                self.optimizer.tell(cand, -rec.aggregate)
            self.told.add(rec.id)
        if late:
            self.archive.add_event("replayed", {"ids": [r.id for r in late]})
        self.hashes = {r.recipe_hash: r for r in records}

    # --------------------------------------------------------------------------------- ask / tell

    def _tell(self, entry: _InFlight, aggregate: float) -> None:
        t0 = time.perf_counter()
        loss = -float(aggregate)
        self.optimizer.tell(entry.candidate, loss)
        for f in entry.followers:
            self.optimizer.tell(f, loss)
        self.timings.optimizer += time.perf_counter() - t0

    def _ask(self) -> list[_InFlight]:
        """Fill the free slots with new candidates (answering archived recipes without evaluating them)."""
        new: list[_InFlight] = []
        by_hash = {e.recipe_hash: e for e in self.inflight.values()}
        in_a_row = 0
        while len(self.inflight) < self.executor.capacity:
            if self._stop_reason() is not None:
                break
            t0 = time.perf_counter()
            cand = self.optimizer.ask()
            recipe = self.genome.decode(cand.value)
            h = recipe.content_hash()
            self.timings.optimizer += time.perf_counter() - t0
            if h in self.hashes:  # the archive answers
                t0 = time.perf_counter()
                self.optimizer.tell(cand, -self.hashes[h].aggregate)
                self.timings.optimizer += time.perf_counter() - t0
                self.duplicates += 1
                in_a_row += 1
                if in_a_row >= MAX_DUPLICATES_IN_A_ROW:
                    self.converged = True
                    break
                continue
            if h in by_hash:  # the same recipe is being evaluated: share its result
                by_hash[h].followers.append(cand)
                self.duplicates += 1
                continue
            in_a_row = 0
            genome = Genome.to_json(cand, self.optimizer.parametrization)
            entry = _InFlight(self.next_id, cand, recipe, h, genome)
            self.next_id += 1
            self.inflight[entry.candidate_id] = entry
            by_hash[h] = entry
            new.append(entry)
        return new

    def _submit(self, entry: _InFlight) -> None:
        self.executor.submit(EvalJob(candidate_id=entry.candidate_id, recipe=entry.recipe, split="search",
                                     attempt=entry.attempt))

    def _stop_reason(self) -> str | None:
        if self.stop.is_set():
            return self.stop.reason or "stopped"
        if self.converged:
            return f"the optimizer proposed {MAX_DUPLICATES_IN_A_ROW} already evaluated recipes in a row (converged)"
        # the budget counts in-flight candidates too: never ask beyond it
        p = self.progress
        if p.evaluations + len(self.inflight) >= self.rules.budget:
            return f"budget of {self.rules.budget} evaluations reached"
        elapsed = self.elapsed_before + (time.monotonic() - self.t_start)
        return self.rules.reason(p, elapsed)

    # --------------------------------------------------------------------------------- outcomes

    def _record(self, outcome: EvalOutcome) -> None:
        entry = self.inflight[outcome.job.candidate_id]
        result = outcome.result
        if outcome.lost:
            if entry.attempt < self.max_retries:
                entry.attempt += 1
                self.archive.add_event("requeued", {"candidate": entry.candidate_id, "attempt": entry.attempt,
                                                    "worker": outcome.worker, "error": result.error})
                self.say(f"candidate {entry.candidate_id}: worker {outcome.worker} lost "
                         f"({result.error}); re-queued (attempt {entry.attempt + 1})")
                self._submit(entry)
                return
            result = EvalResult.failure(f"worker lost {entry.attempt + 1} times; last: {result.error}",
                                        self.space.penalty, "search", result.seconds, result.settings)
        rec = archive_evaluation(
            self.archive, self.timings, outcome, result, candidate_id=entry.candidate_id,
            recipe_hash=entry.recipe_hash, recipe=entry.recipe, parents=sorted(m.model for m in entry.recipe.models),
            generation=0, genome=entry.genome, settings={**self.settings_base, "attempt": entry.attempt},
            penalty=self.space.penalty, session=self.session)
        aggregate = rec.aggregate
        self.hashes[entry.recipe_hash] = rec
        del self.inflight[entry.candidate_id]
        self._tell(entry, aggregate)
        self.told.add(entry.candidate_id)
        new_best = self.progress.add(entry.candidate_id, aggregate, result.ok)
        if not result.ok:
            self.say(f"candidate {entry.candidate_id} failed: {(result.error or '').splitlines()[0][:300]}")
        if new_best:
            self.say(f"new best: candidate {entry.candidate_id} ({entry.recipe.method}) {aggregate:.6f}")
        self.bar.update(self.progress.evaluations, self.progress.best, self.progress.best_id, aggregate,
                        force=new_best)
        if self.progress.evaluations % TIMING_EVERY == 0:
            self._timing_event("timing")

    def _timing_event(self, kind: str, **extra: Any) -> None:
        self.timings.wall = time.monotonic() - self.t_start
        data: dict[str, Any] = {"session": self.session, "timings": self.timings.to_dict(),
                                "evaluations": self.progress.evaluations, **extra}
        stats = getattr(self.executor, "stats", None)
        if callable(stats):
            data["executor"] = stats()
        t0 = time.perf_counter()
        self.archive.add_event(kind, data)
        self.timings.archive += time.perf_counter() - t0

    # --------------------------------------------------------------------------------- main

    def run(self) -> SearchSummary:
        self.converged = False
        self.session = len(self.archive.events("session_start")) + 1
        self._load_state()
        self._reconcile()
        resumed = sorted(self.inflight)
        self.archive.add_event("session_start", {"session": self.session, "budget": self.space.budget,
                                                 "workers": self.executor.capacity, "resubmitted": resumed,
                                                 "evaluations": self.progress.evaluations})
        self.bar = ProgressLine(self.space.budget, self.space.raw.progress_interval, enabled=self._show_progress,
                                done_before=self.progress.evaluations)
        if resumed:
            self.say(f"session {self.session}: resuming; re-submitting in-flight candidates {resumed}")
        t_wait = 0.0
        try:
            new = self._ask()
            self._checkpoint()
            for cid in resumed:
                self._submit(self.inflight[cid])
            for e in new:
                self._submit(e)
            while self.inflight:
                t0 = time.perf_counter()
                outcomes = self.executor.poll(timeout=0.5)
                t_wait += time.perf_counter() - t0
                if not outcomes:
                    continue
                for o in outcomes:
                    self._record(o)
                new = self._ask()
                self._checkpoint()
                for e in new:
                    self._submit(e)
        finally:
            self.timings.waiting = t_wait
        reason = self._stop_reason() or "done"
        self._timing_event("session_end", reason=reason, duplicates=self.duplicates)
        self.bar.update(self.progress.evaluations, self.progress.best, self.progress.best_id, force=True)
        self.say(f"session {self.session} ended: {reason}")
        return SearchSummary(self.progress.evaluations, self.progress.failed, self.progress.best_id,
                             self.progress.best, reason, self.session, self.timings)


def task_scores(result: EvalResult) -> dict[str, Any]:
    """Per-task scores as the archive stores them."""
    return {t.task: {"metric": t.metric, "value": t.value, "higher_is_better": t.higher_is_better,
                     "weight": t.weight} for t in result.tasks}


def archive_evaluation(archive: Archive, timings: Timings, outcome: EvalOutcome, result: EvalResult, *,
                       candidate_id: int, recipe_hash: str, recipe: Any, parents: list[str], generation: int,
                       genome: dict[str, Any] | None, settings: dict[str, Any], penalty: float,
                       session: int) -> CandidateRecord:
    """Append one evaluated candidate to the archive (a non-finite score becomes the penalty), count its time,
    and return the stored record. The result's settings are recorded between ``settings``' keys and its
    ``attempt``, so the attempt always wins."""
    t0 = time.perf_counter()
    aggregate = result.aggregate if math.isfinite(result.aggregate) else penalty
    base = {k: v for k, v in settings.items() if k != "attempt"}
    archive.add_candidate(
        id=candidate_id, recipe_hash=recipe_hash, recipe=recipe.to_dict(), parents=parents, generation=generation,
        method=recipe.method, genome=genome, ok=result.ok, scores=task_scores(result), aggregate=aggregate,
        split="search", settings={**base, **result.settings, "attempt": settings.get("attempt", 0)},
        merge_seconds=outcome.merge_seconds, eval_seconds=outcome.eval_seconds, worker=outcome.worker,
        error=result.error, session=session)
    timings.archive += time.perf_counter() - t0
    timings.evaluation += outcome.eval_seconds
    timings.merging += outcome.merge_seconds
    kill_point("after_record")
    rec = archive.get(candidate_id)
    assert rec is not None
    return rec


def rescore_best(run: RunDir, space: Space, executor: Executor, k: int, split: str = "test",
                 log: Callable[[str], None] | None = None) -> list[int]:
    """Score the ``k`` best search candidates on the held-out ``split`` (skipping ones already re-scored)."""
    from evomerge.merge.recipe import Recipe

    with run.archive() as archive:
        todo = [r for r in archive.best(k) if archive.rescore(r.id, split) is None]
        if not todo:
            return []
        if log is not None:
            log(f"scoring the {len(todo)} best candidates on the {split} split: {[r.id for r in todo]}")
        attempts = {r.id: 0 for r in todo}
        queue = [EvalJob(candidate_id=r.id, recipe=Recipe.from_dict(r.recipe), split=split) for r in todo]
        pending = 0
        done: list[int] = []
        while queue or pending:
            while queue and pending < executor.capacity:
                executor.submit(queue.pop(0))
                pending += 1
            for o in executor.poll(timeout=0.5):
                pending -= 1
                cid = o.job.candidate_id
                if o.lost and attempts[cid] < space.raw.executor.max_retries:
                    attempts[cid] += 1
                    queue.append(dataclasses.replace(o.job, attempt=attempts[cid]))
                    continue
                res = o.result
                archive.add_rescore(candidate_id=cid, split=split, ok=res.ok and not o.lost, scores=task_scores(res),
                                    aggregate=res.aggregate if math.isfinite(res.aggregate) else space.penalty,
                                    settings=res.settings, merge_seconds=o.merge_seconds,
                                    eval_seconds=o.eval_seconds, worker=o.worker, error=res.error)
                if log is not None:
                    log(f"candidate {cid}: {split} {res.aggregate:.6f}" + ("" if res.ok else f" ({res.error})"))
                done.append(cid)
        return done
