"""The black-box search loop: nevergrad ask/tell over the whole genome; evaluations through the dispatcher.

The loop owns only the optimizer's side (ask, decode, checkpoint, tell, stopping rules); submitting, retrying,
de-duplicating and archiving are the :class:`~evomerge.search.dispatch.Dispatcher`'s.

Steady state, no generation barrier: the loop keeps ``executor.capacity`` candidates in flight and asks for a new
one as soon as one finishes. Order of one step, chosen so that any interruption is recoverable exactly:

1. ask the optimizer for candidates (identical recipes are answered from the archive, never evaluated twice);
2. write the checkpoint (the optimizer's logged calls + in-flight candidates) atomically, *then* submit the new
   jobs;
3. when a job finishes: append it to the archive, *then* tell the optimizer.

The checkpoint is JSON (:mod:`~evomerge.search.replay`): on resume a fresh optimizer replays the logged asks and
tells (scores read from the archive) and reaches the state the interrupted one had. So every archived candidate
is either told in the checkpoint or in-flight in it (told now, from its replayed ask), and every in-flight
candidate not archived is submitted again as it was. With one evaluator a resumed run produces the same archive
as an uninterrupted one. Without a usable checkpoint (none, an older pickle that is never read, a corrupt one)
the optimizer is rebuilt by telling it the archive's genomes: nothing is lost, but the continuation differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evomerge.executors.base import Executor
from evomerge.fitness.racing import RacingConfig
from evomerge.search.archive import Archive, CandidateRecord
from evomerge.search.dispatch import Dispatcher, Finished
from evomerge.search.events import EventKind
from evomerge.search.genome import Genome
from evomerge.search.optimizer import build_optimizer
from evomerge.search.progress import ProgressLine, SearchSummary, Timings
from evomerge.search.replay import ArchivedScore, LoggedOptimizer, OptimizerLog, ReplayMismatch, replay
from evomerge.search.run import CHECKPOINT_FORMAT, CorruptCheckpoint, RunDir
from evomerge.search.space import Space
from evomerge.search.stopping import StopFlag, resume_failure_streak, stopping_rules

MAX_DUPLICATES_IN_A_ROW = 200  # the optimizer has converged onto archived recipes: stop asking


@dataclass
class _InFlight:
    """A candidate asked and submitted but not yet archived (lives in the checkpoint, as :meth:`to_json`).

    The dispatcher's :class:`~evomerge.search.dispatch.Ticket`: it updates ``attempt`` and ``followers``."""

    candidate_id: int
    ask: int  # its ask number in the optimizer's log
    candidate: Any  # the nevergrad candidate (same object the optimizer asked, or its replay)
    recipe: Any  # Recipe
    recipe_hash: str
    genome: dict[str, Any]
    attempt: int = 0
    followers: list[Any] = field(default_factory=list)  # (ask number, candidate) of later asks of the same recipe

    def to_json(self) -> dict[str, Any]:
        return {"candidate_id": self.candidate_id, "ask": self.ask, "recipe_hash": self.recipe_hash,
                "genome": self.genome, "attempt": self.attempt, "followers": [int(i) for i, _ in self.followers]}


def new_optimizer(space: Space, genome: Genome, num_workers: int) -> Any:
    """The whole-genome optimizer of ``space`` (seeded by the space's seed; its archive kept small)."""
    return build_optimizer(space.optimizer_name, genome.parametrization(space.seed), budget=space.budget,
                           num_workers=num_workers, where=f"{space.where}: optimizer.name", bounded=True)


def new_logged_optimizer(space: Space, genome: Genome, num_workers: int) -> LoggedOptimizer:
    """:func:`new_optimizer` with its calls logged (what the checkpoint holds)."""
    return LoggedOptimizer.new(genome, space.optimizer_name, budget=space.budget, num_workers=num_workers,
                               seed=space.seed, where=f"{space.where}: optimizer.name")


def run_search(run: RunDir, space: Space, executor: Executor, *, progress: bool = True,
               stop: StopFlag | None = None, setup_seconds: float = 0.0,
               log: Callable[[str], None] | None = None, racing: RacingConfig | None = None) -> SearchSummary:
    """Search until a stopping rule fires (or ``stop`` is set), resuming from the run's checkpoint if any.

    ``racing``: how candidates are raced against the incumbent (default: the space's ``racing`` section)."""
    with run.archive() as archive:
        return _Loop(run, space, executor, archive, progress, stop or StopFlag(), setup_seconds, log,
                     space.racing if racing is None else racing).run()


class _Loop:
    """The optimizer's side of a search session: ask, checkpoint, tell. Evaluations go through a dispatcher."""

    def __init__(self, run: RunDir, space: Space, executor: Executor, archive: Archive, progress: bool,
                 stop: StopFlag, setup_seconds: float, log: Callable[[str], None] | None,
                 racing: RacingConfig | None = None) -> None:
        self.run_dir, self.space, self.executor, self.archive = run, space, executor, archive
        self.stop = stop
        self.genome = Genome(space)
        self.timings = Timings(setup=setup_seconds)
        self.t_start = time.monotonic() - setup_seconds
        self._log = log
        self._show_progress = progress
        self.rules = stopping_rules(space)
        self.racing = racing  # candidates race the incumbent (the best complete candidate so far)

    def say(self, message: str) -> None:
        self.run_dir.log(message)
        if self._log is not None:
            self._log(message)

    # --------------------------------------------------------------------------------- state

    def _load_state(self) -> None:
        """The optimizer and in-flight candidates from the checkpoint (replayed), else a fresh optimizer."""
        self.run_dir.clean_temporaries()
        self.inflight: dict[int, _InFlight] = {}
        self.told: set[int] = set()
        self.next_id = self.archive.max_id() + 1
        self.duplicates = 0
        self.elapsed_before = 0.0
        state = self._read_checkpoint()
        if state is not None:
            try:
                self._restore(state)
            except Exception as exc:  # noqa: BLE001 - any checkpoint that does not replay: rebuild, said loudly
                aside = self.run_dir.set_checkpoint_aside()
                self._rebuilt_because(f"the checkpoint does not replay ({exc}); it was moved to {aside}")
                state = None
                self.inflight, self.told = {}, set()
                self.next_id, self.duplicates, self.elapsed_before = self.archive.max_id() + 1, 0, 0.0
        if state is None:
            # nevergrad's num_workers: candidates asked before results come back (optimizer.batch_size)
            self.optimizer = new_logged_optimizer(self.space, self.genome,
                                                  max(self.space.batch_size, self.executor.capacity))
        self.optimizer.raise_budget(self.space.budget)

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint's data, or None (no checkpoint, an older pickle, a corrupt file: said, and set aside)."""
        try:
            state = self.run_dir.load_checkpoint()
        except CorruptCheckpoint as exc:
            aside = self.run_dir.set_checkpoint_aside()
            self._rebuilt_because(f"{exc}; it was moved to {aside}")
            return None
        if state is None and self.run_dir.legacy_checkpoint_path.is_file():
            self._rebuilt_because(f"{self.run_dir.legacy_checkpoint_path} is an older evomerge's pickle and is "
                                  "never read (unpickling a file can run code)")
        return state

    def _rebuilt_because(self, why: str) -> None:
        if self.archive.count():
            self.say(f"{why}: the optimizer is rebuilt by replaying the archive (every archived evaluation is "
                     "kept; the search continues from them, not exactly as an uninterrupted run would)")
        else:
            self.say(f"{why}: nothing was archived yet, the search starts afresh")
        self.archive.add_event(EventKind.CHECKPOINT_IGNORED, {"reason": why, "evaluations": self.archive.count()})

    def _restore(self, state: dict[str, Any]) -> None:
        """Replay the checkpoint's optimizer log; its in-flight candidates get their replayed asks back."""
        log = OptimizerLog.from_json(state["optimizer"])
        cache: dict[int, ArchivedScore | None] = {}

        def archived(cid: int) -> ArchivedScore | None:
            if cid not in cache:
                rec = self.archive.get(cid)
                cache[cid] = None if rec is None else ArchivedScore(rec.recipe_hash, rec.aggregate, rec.genome)
            return cache[cid]

        self.optimizer, pending = replay(log, self.genome, archived, where=f"{self.space.where}: optimizer.name")
        for item in state["inflight"]:
            ask, cid = int(item["ask"]), int(item["candidate_id"])
            if ask not in pending:
                raise ReplayMismatch(f"in-flight candidate {cid}: ask {ask} was not replayed")
            cand = pending.pop(ask)
            recipe = self.genome.decode(cand.value)
            if recipe.content_hash() != item["recipe_hash"]:
                raise ReplayMismatch(f"in-flight candidate {cid}: ask {ask} replays as another recipe")
            followers = []
            for f in item.get("followers", []):
                if int(f) not in pending:
                    raise ReplayMismatch(f"in-flight candidate {cid}: follower ask {f} was not replayed")
                followers.append((int(f), pending.pop(int(f))))
            self.inflight[cid] = _InFlight(cid, ask, cand, recipe, item["recipe_hash"], dict(item["genome"]),
                                           int(item.get("attempt", 0)), followers)
        if pending:
            raise ReplayMismatch(f"asks {sorted(pending)} are neither told nor in flight")
        self.told = {int(c) for c in state["told"]}
        self.next_id = int(state["next_id"])
        self.duplicates = int(state.get("duplicates", 0))
        self.elapsed_before = float(state.get("elapsed", 0.0))

    def _checkpoint(self) -> None:
        t0 = time.perf_counter()
        self.run_dir.save_checkpoint({
            "format": CHECKPOINT_FORMAT, "optimizer": self.optimizer.log.to_json(),
            "inflight": [e.to_json() for e in sorted(self.inflight.values(), key=lambda e: e.candidate_id)],
            "told": sorted(self.told), "next_id": self.next_id, "duplicates": self.duplicates,
            "elapsed": self.elapsed_before + (time.monotonic() - self.t_start),
        })
        self.timings.checkpoint += time.perf_counter() - t0

    def _reconcile(self) -> list[CandidateRecord]:
        """Tell the optimizer what the archive holds beyond the checkpoint (a kill between archive and tell);
        returns the archive's search rows."""
        records = self.archive.results("search")
        late = [r for r in records if r.id not in self.told]
        for rec in late:
            entry = self.inflight.pop(rec.id, None)
            if entry is not None:
                self._tell(entry, rec.id, rec.aggregate)
            elif rec.genome is not None:  # no checkpoint told it: tell-not-asked replay of its genome
                cand = Genome.from_json(rec.genome, self.optimizer.parametrization)
                self.optimizer.tell_not_asked(cand, rec.id, -rec.aggregate)
            self.told.add(rec.id)
        if late:
            self.archive.add_event(EventKind.REPLAYED, {"ids": [r.id for r in late]})
        return records

    # --------------------------------------------------------------------------------- ask / tell

    def _tell(self, entry: _InFlight, candidate_id: int, aggregate: float) -> None:
        t0 = time.perf_counter()
        loss = -float(aggregate)
        self.optimizer.tell(entry.ask, entry.candidate, candidate_id, loss)
        for ask, cand in entry.followers:
            self.optimizer.tell(ask, cand, candidate_id, loss)
        self.timings.optimizer += time.perf_counter() - t0

    def _ask(self) -> list[_InFlight]:
        """Fill the free slots with new candidates (answering archived recipes without evaluating them); the
        new ones are tracked by the dispatcher, not yet submitted (the checkpoint comes first)."""
        new: list[_InFlight] = []
        in_a_row = 0
        while len(self.inflight) < self.executor.capacity:
            if self._stop_reason() is not None:
                break
            t0 = time.perf_counter()
            ask, cand = self.optimizer.ask()
            recipe = self.genome.decode(cand.value)
            h = recipe.content_hash()
            self.timings.optimizer += time.perf_counter() - t0
            known = self.dispatch.archived(h)
            if known is not None:  # the archive answers
                t0 = time.perf_counter()
                self.optimizer.tell(ask, cand, known.id, -known.aggregate)
                self.timings.optimizer += time.perf_counter() - t0
                self.duplicates += 1
                in_a_row += 1
                if in_a_row >= MAX_DUPLICATES_IN_A_ROW:
                    self.converged = True
                    break
                continue
            if self.dispatch.follow(h, (ask, cand)):  # the same recipe is being evaluated: share its result
                self.duplicates += 1
                continue
            in_a_row = 0
            genome = Genome.to_json(cand, self.optimizer.parametrization)
            entry = _InFlight(self.next_id, ask, cand, recipe, h, genome)
            self.next_id += 1
            self._track(entry)
            new.append(entry)
        return new

    def _track(self, entry: _InFlight) -> None:
        self.inflight[entry.candidate_id] = entry
        self.dispatch.add(entry, parents=sorted(m.model for m in entry.recipe.models), generation=0, submit=False)

    def _stop_reason(self) -> str | None:
        if self.stop.is_set():
            return self.stop.reason or "stopped"
        if self.converged:
            return f"the optimizer proposed {MAX_DUPLICATES_IN_A_ROW} already evaluated recipes in a row (converged)"
        # the budget counts in-flight candidates too: never ask beyond it
        p = self.dispatch.progress
        if p.evaluations + len(self.inflight) >= self.rules.budget:
            return f"budget of {self.rules.budget} evaluations reached"
        elapsed = self.elapsed_before + (time.monotonic() - self.t_start)
        return self.rules.reason(p, elapsed)

    def _finished(self, done: Finished) -> None:
        """An evaluation archived by the dispatcher: tell it (archive before tell)."""
        entry = self.inflight.pop(done.record.id)
        self._tell(entry, done.record.id, done.record.aggregate)
        self.told.add(entry.candidate_id)

    # --------------------------------------------------------------------------------- main

    def run(self) -> SearchSummary:
        self.converged = False
        self.session = len(self.archive.events(EventKind.SESSION_START)) + 1
        self._load_state()
        records = self._reconcile()
        resumed = sorted(self.inflight)
        bar = ProgressLine(self.space.budget, self.space.raw.progress_interval, enabled=self._show_progress,
                           done_before=len(records))
        self.dispatch = Dispatcher(
            self.archive, self.executor, penalty=self.space.penalty, max_retries=self.space.raw.executor.max_retries,
            session=self.session, settings={"optimizer": self.space.optimizer_name, "seed": self.space.seed},
            records=records, timings=self.timings, t_start=self.t_start, bar=bar, say=self.say,
            racing=self.racing)
        for cid in resumed:
            self.dispatch.add(self.inflight[cid], parents=sorted(m.model for m in self.inflight[cid].recipe.models),
                              submit=False)
        progress = self.dispatch.progress
        resume_failure_streak(self.archive, progress, self.say)
        self.archive.add_event(EventKind.SESSION_START, {
            "session": self.session, "budget": self.space.budget, "workers": self.space.raw.workers,
            "capacity": self.executor.capacity, "test_top": self.space.raw.test_top, "resubmitted": resumed,
            "evaluations": progress.evaluations})
        if resumed:
            self.say(f"session {self.session}: resuming; re-submitting in-flight candidates {resumed}")
        new = self._ask()
        self._checkpoint()
        for entry in [self.inflight[cid] for cid in resumed] + new:
            self.dispatch.submit(entry)
        while self.dispatch.busy():
            polled = self.dispatch.poll(timeout=0.5)
            if not polled:
                continue
            for done in polled.finished:
                self._finished(done)
            new = self._ask()
            self._checkpoint()
            for entry in new:
                self.dispatch.submit(entry)
        reason = self._stop_reason() or "done"
        failed_out = self.rules.failure_reason(progress) is not None and not self.stop.is_set()
        final = not self.stop.is_set() and not failed_out
        self.dispatch.timing_event(EventKind.SESSION_END, reason=reason, duplicates=self.duplicates, final=final,
                                   failures=failed_out)
        bar.update(progress.evaluations, progress.best, progress.best_id, force=True)
        self.say(f"session {self.session} ended: {reason}")
        return SearchSummary(progress.evaluations, progress.failed, progress.best_id, progress.best, reason,
                             self.session, self.timings, final, failed_out)


def rescore_best(run: RunDir, space: Space, executor: Executor, k: int, split: str = "test",
                 log: Callable[[str], None] | None = None) -> list[int]:
    """Score the ``k`` best search candidates on the held-out ``split`` (skipping ones already re-scored)."""
    with run.archive() as archive:
        dispatch = Dispatcher(archive, executor, penalty=space.penalty, max_retries=space.raw.executor.max_retries,
                              records=(), say=log)
        return dispatch.rescore(k, split)
