"""The evaluation dispatcher: every evaluation of a search goes through here, for the plain loop and the
population manager alike.

Like nevergrad's public ``ask``/``tell``, which own the bookkeeping while an optimizer implements only its
``_internal_*`` steps, the dispatcher owns everything between "evaluate this recipe" and "here is its archived
result", and its callers keep only their own decisions (what to ask, when to stop, what to tell):

- **bounded submit/poll** over an :class:`~evomerge.executors.base.Executor`: at most ``capacity`` jobs are in the
  executor; more are queued here and sent as slots free;
- **lost jobs** (a dead or timed-out worker) are re-queued up to ``max_retries`` times (a ``requeued`` event
  each), then recorded as failed with the penalty;
- **archiving**: one candidate row per finished search evaluation (non-finite scores become the penalty), the
  ``after_record`` kill point, timings, a ``timing`` event every ``timing_every`` evaluations;
- **progress**: the running counts (:class:`~evomerge.search.stopping.SearchProgress`), log lines for failures and
  new bests, the progress line;
- **de-duplication by recipe hash**: :meth:`archived` answers a recipe already evaluated, :meth:`follow` attaches
  an ask of a recipe in flight to it (its *followers* are told the same result by the caller);
- **re-scoring** the best candidates on another split (:meth:`rescore`), through the same retry path;
- **racing**: with a :class:`~evomerge.fitness.racing.RacingConfig`, every search job carries a
  :class:`~evomerge.fitness.racing.RaceBar`: the bar's per-item results read from the archive (the bar is the
  caller's choice, a candidate id: the incumbent for the plain loop; for the population manager the k-th best
  member, or the pair's best so far when higher), chosen once per job so a re-queued job races the same bar. The worker runs the stages on
  the model it merged once and returns one outcome (no round trip per stage or item); a stopped candidate comes
  back ``partial`` and is archived so, with the items it saw and the paired estimate as its aggregate, which is
  what callers tell their optimizers. Per-item results of every evaluation and re-score are archived with it.

A job is a caller's :class:`Ticket` (the plain loop's checkpointed ``_InFlight`` entries, or a :class:`Job`); the
dispatcher updates its ``attempt`` and ``followers`` in place, so a caller that checkpoints its tickets resumes
with them as they were. The caller writes its checkpoint between :meth:`add` (``submit=False``) and
:meth:`submit`, and tells its optimizer after :meth:`poll` returned the archived record: checkpoint before
submit, archive before tell.

Where later features go (no rewrite needed):

- **stop after N consecutive failures**: :meth:`_account` sees every archived row in order (and
  :class:`SearchProgress` is rebuilt from the archive on resume), so the streak is counted there (a field of
  ``SearchProgress``) and read by the callers' stopping rules (``StoppingRules.reason`` for the loop, the
  population session's ``_check_stop``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from evomerge.executors.base import EvalJob, EvalOutcome, Executor
from evomerge.fitness.racing import RaceBar, RacingConfig
from evomerge.fitness.result import EvalResult
from evomerge.killpoints import kill_point
from evomerge.merge.recipe import Recipe
from evomerge.search.archive import Archive, CandidateRecord
from evomerge.search.events import EventKind
from evomerge.search.progress import ProgressLine, Timings
from evomerge.search.stopping import SearchProgress

SEARCH = "search"
TIMING_EVERY = 10  # evaluations between timing snapshots in the archive


class Ticket(Protocol):
    """What the dispatcher reads from (and updates on) a caller's record of one job."""

    candidate_id: int
    recipe: Recipe
    recipe_hash: str
    genome: dict[str, Any] | None
    attempt: int
    followers: list[Any]


@dataclass
class Job:
    """A :class:`Ticket` for callers that do not checkpoint their own (pair searches, originals, re-scores)."""

    candidate_id: int
    recipe: Recipe
    recipe_hash: str
    genome: dict[str, Any] | None = None
    attempt: int = 0
    followers: list[Any] = field(default_factory=list)  # later asks of the same recipe
    candidate: Any = None  # the optimizer's candidate, if an optimizer asked for it


@dataclass
class _Slot:
    ticket: Ticket
    split: str
    parents: list[str]
    generation: int
    extra_models: dict[str, str]
    model_tasks: dict[str, tuple[str, ...]]
    bar: int | None = None  # the candidate this job races against (chosen at its first send)
    bar_chosen: bool = False


@dataclass(frozen=True)
class Finished:
    """A job done: its ticket, the candidate row (for a re-score, the candidate re-scored), the result archived."""

    ticket: Any
    record: CandidateRecord
    result: EvalResult
    new_best: bool = False


@dataclass
class Polled:
    """What one :meth:`Dispatcher.poll` saw: jobs finished (archived) and jobs re-queued after a lost worker."""

    finished: list[Finished] = field(default_factory=list)
    requeued: list[Any] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.finished or self.requeued)


class Dispatcher:
    """Evaluations of one session over ``executor``, archived in ``archive`` (see the module docstring).

    ``records``: the archive's search rows when the caller has read them already (else they are read here);
    they seed the de-duplication table and the progress counts. ``settings`` go into every archived row's
    settings (with the job's ``attempt``). ``shown``: the evaluation count the progress line displays (default:
    every archived evaluation). ``racing``: race search jobs (see the module docstring) against the candidate
    ``race_against()`` names (default: the best complete candidate so far; None: no bar yet, every item).
    """

    def __init__(self, archive: Archive, executor: Executor, *, penalty: float, max_retries: int,
                 session: int = 0, settings: Mapping[str, Any] | None = None,
                 records: Sequence[CandidateRecord] | None = None, timings: Timings | None = None,
                 t_start: float | None = None, bar: ProgressLine | None = None,
                 say: Callable[[str], None] | None = None, shown: Callable[[], int] | None = None,
                 timing_every: int = TIMING_EVERY, racing: RacingConfig | None = None,
                 race_against: Callable[[], int | None] | None = None) -> None:
        self.archive, self.executor = archive, executor
        self.racing = racing if racing is not None and racing.enabled else None
        self._race_against = race_against if race_against is not None else (lambda: self.progress.best_id)
        self._bars: dict[int, RaceBar | None] = {}
        self.penalty, self.max_retries, self.session = float(penalty), int(max_retries), session
        self.settings = dict(settings or {})
        self.timings = timings if timings is not None else Timings()
        self.t_start = time.monotonic() if t_start is None else t_start
        self.bar, self._say, self._shown, self.timing_every = bar, say, shown, timing_every
        rows = list(archive.results(SEARCH) if records is None else records)
        self.progress = SearchProgress.of((r.id, r.aggregate, r.ok, r.partial) for r in rows)
        self._archived: dict[str, CandidateRecord] = {r.recipe_hash: r for r in rows}
        self._slots: dict[tuple[int, str], _Slot] = {}
        self._by_hash: dict[str, _Slot] = {}
        self._queue: deque[_Slot] = deque()
        self._sent = 0

    def say(self, message: str) -> None:
        if self._say is not None:
            self._say(message)

    # ------------------------------------------------------------------------------------------- state

    @property
    def capacity(self) -> int:
        return max(1, int(self.executor.capacity))

    def in_flight(self) -> list[Any]:
        """Tickets added and not finished, by candidate id."""
        return [s.ticket for _, s in sorted(self._slots.items(), key=lambda kv: kv[0])]

    def busy(self) -> bool:
        return bool(self._slots)

    def archived(self, recipe_hash: str) -> CandidateRecord | None:
        """The archived search evaluation of an identical recipe, if any (the archive answers it)."""
        return self._archived.get(recipe_hash)

    def follow(self, recipe_hash: str, candidate: Any) -> bool:
        """Attach ``candidate`` to the search job of the same recipe in flight, if any (told its result)."""
        slot = self._by_hash.get(recipe_hash)
        if slot is None:
            return False
        slot.ticket.followers.append(candidate)
        return True

    # ------------------------------------------------------------------------------------------- submit

    def add(self, ticket: Ticket, *, parents: Sequence[str], generation: int = 0,
            extra_models: Mapping[str, str] | None = None,
            model_tasks: Mapping[str, tuple[str, ...]] | None = None, split: str = SEARCH,
            submit: bool = True) -> None:
        """Track ``ticket`` (an evaluation on ``split``); send it now unless ``submit`` is False (then
        :meth:`submit` sends it: the loop writes its checkpoint in between)."""
        key = (ticket.candidate_id, split)
        if key in self._slots:
            raise ValueError(f"candidate {ticket.candidate_id} ({split}) is already in flight")
        slot = _Slot(ticket, split, list(parents), generation, dict(extra_models or {}), dict(model_tasks or {}))
        self._slots[key] = slot
        if split == SEARCH:
            self._by_hash[ticket.recipe_hash] = slot
        if submit:
            self.submit(ticket, split)

    def submit(self, ticket: Ticket, split: str = SEARCH) -> None:
        """Send a tracked ticket to the executor (queued here while ``capacity`` jobs are out)."""
        self._queue.append(self._slots[(ticket.candidate_id, split)])
        self._pump()

    def _pump(self) -> None:
        while self._queue and self._sent < self.capacity:
            slot = self._queue.popleft()
            self._send(slot)
            self._sent += 1

    def _send(self, slot: _Slot) -> None:
        t = slot.ticket
        self.executor.submit(EvalJob(candidate_id=t.candidate_id, recipe=t.recipe, split=slot.split,
                                     attempt=t.attempt, extra_models=slot.extra_models,
                                     model_tasks=slot.model_tasks, race=self._race(slot)))

    def _race(self, slot: _Slot) -> RaceBar | None:
        """The bar a search job races against (chosen at its first send, so a re-queued job keeps it)."""
        if self.racing is None or slot.split != SEARCH:
            return None
        if not slot.bar_chosen:
            slot.bar, slot.bar_chosen = self._race_against(), True
        return None if slot.bar is None else self.race_bar(slot.bar)

    def race_bar(self, candidate_id: int) -> RaceBar | None:
        """Candidate ``candidate_id`` as a bar: complete and with per-item results of every task, else None."""
        if self.racing is None:
            return None
        if candidate_id not in self._bars:
            rec, bar = self.archive.get(candidate_id), None
            if rec is not None and rec.complete:
                items = self.archive.items(candidate_id, SEARCH)
                weights = {t: (float(v.get("weight", 1.0)), bool(v.get("higher_is_better", True)))
                           for t, v in rec.scores.items()}
                if items and set(items) == set(weights):
                    bar = RaceBar(self.racing, candidate_id, items, rec.aggregate, weights)
            self._bars[candidate_id] = bar
        return self._bars[candidate_id]

    # ------------------------------------------------------------------------------------------- poll

    def poll(self, timeout: float | None = 0.5) -> Polled:
        """Collect what finished (blocking up to ``timeout`` for one): archive it, re-queue lost jobs."""
        polled = Polled()
        if not self._sent:
            return polled
        t0 = time.perf_counter()
        outcomes = self.executor.poll(timeout=timeout)
        self.timings.waiting += time.perf_counter() - t0
        for outcome in outcomes:
            self._handle(outcome, polled)
        self._pump()
        return polled

    def drain(self) -> list[Finished]:
        """Poll until nothing is in flight; everything finished, in the order it finished."""
        done: list[Finished] = []
        while self._slots:
            if not self._sent and not self._queue:
                raise RuntimeError(f"tracked jobs {sorted(self._slots)} were never submitted")
            done += self.poll().finished
        return done

    def _handle(self, outcome: EvalOutcome, polled: Polled) -> None:
        slot = self._slots[(outcome.job.candidate_id, outcome.job.split)]
        result = self._retry_or_fail(slot, outcome)
        if result is None:
            polled.requeued.append(slot.ticket)
            return
        del self._slots[(slot.ticket.candidate_id, slot.split)]
        if self._by_hash.get(slot.ticket.recipe_hash) is slot:
            del self._by_hash[slot.ticket.recipe_hash]
        self._sent -= 1
        if slot.split == SEARCH:
            rec = self._archive(slot, outcome, result)
            polled.finished.append(Finished(slot.ticket, rec, result, self._account(slot, rec)))
        else:
            polled.finished.append(Finished(slot.ticket, self._archive_rescore(slot, outcome, result), result))

    def _retry_or_fail(self, slot: _Slot, outcome: EvalOutcome) -> EvalResult | None:
        """The result to archive; None when a lost job was sent again (up to ``max_retries`` times)."""
        result = outcome.result
        if not outcome.lost:
            return result
        t = slot.ticket
        if t.attempt < self.max_retries:
            t.attempt += 1
            self.archive.add_event(EventKind.REQUEUED, {"candidate": t.candidate_id, "attempt": t.attempt,
                                                        "worker": outcome.worker, "error": result.error,
                                                        "split": slot.split})
            self.say(f"candidate {t.candidate_id}: worker {outcome.worker} lost ({result.error}); re-queued "
                     f"(attempt {t.attempt + 1})")
            self._send(slot)
            return None
        return EvalResult.failure(f"worker lost {t.attempt + 1} times; last: {result.error}", self.penalty,
                                  slot.split, result.seconds, result.settings)

    # ------------------------------------------------------------------------------------------- archive

    def _archive(self, slot: _Slot, outcome: EvalOutcome, result: EvalResult) -> CandidateRecord:
        """Append the candidate row (a non-finite score becomes the penalty), count its time, return the row.
        The result's settings are recorded between the session's and the ``attempt``, so the attempt wins."""
        t = slot.ticket
        t0 = time.perf_counter()
        aggregate = result.aggregate if math.isfinite(result.aggregate) else self.penalty
        self.archive.add_candidate(
            id=t.candidate_id, recipe_hash=t.recipe_hash, recipe=t.recipe.to_dict(), parents=slot.parents,
            generation=slot.generation, method=t.recipe.method, genome=t.genome, ok=result.ok,
            scores=task_scores(result), aggregate=aggregate, split=SEARCH,
            settings={**self.settings, **result.settings, "attempt": t.attempt},
            merge_seconds=outcome.merge_seconds, eval_seconds=outcome.eval_seconds, worker=outcome.worker,
            error=result.error, session=self.session, items=result.items, partial=result.ok and result.partial)
        self.timings.archive += time.perf_counter() - t0
        self.timings.evaluation += outcome.eval_seconds
        self.timings.merging += outcome.merge_seconds
        kill_point("after_record")
        rec = self.archive.get(t.candidate_id)
        assert rec is not None
        self._archived[t.recipe_hash] = rec
        return rec

    def _account(self, slot: _Slot, rec: CandidateRecord) -> bool:
        """Count an archived evaluation: progress, log lines, progress line, timing snapshots. True: new best."""
        new_best = self.progress.add(rec.id, rec.aggregate, rec.ok, rec.partial)
        if not rec.ok:
            self.say(f"candidate {rec.id} failed: {(rec.error or '').splitlines()[0][:300] if rec.error else ''}")
        if new_best:
            self.say(f"new best: candidate {rec.id} ({rec.method}) {rec.aggregate:.6f}")
        p = self.progress
        if self.bar is not None:
            self.bar.update(self.shown(), p.best, p.best_id, rec.aggregate, force=new_best)
        if self.timing_every > 0 and p.evaluations % self.timing_every == 0:
            self.timing_event(EventKind.TIMING)
        return new_best

    def shown(self) -> int:
        """The evaluation count the progress line shows."""
        return self._shown() if self._shown is not None else self.progress.evaluations

    def timing_event(self, kind: EventKind, **extra: Any) -> None:
        """Record where this session's time went so far (``wall`` now), with the executor's stats if it has any."""
        self.timings.wall = time.monotonic() - self.t_start
        data: dict[str, Any] = {"session": self.session, "timings": self.timings.to_dict(),
                                "evaluations": self.progress.evaluations}
        stats = getattr(self.executor, "stats", None)
        if callable(stats):
            data["executor"] = stats()
        data.update(extra)
        t0 = time.perf_counter()
        self.archive.add_event(kind, data)
        self.timings.archive += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------- rescore

    def rescore(self, k: int, split: str = "test",
                inputs_of: Callable[[Mapping[int, Recipe]], Mapping[int, tuple[Mapping[str, str],
                                                                             Mapping[str, tuple[str, ...]]]]]
                | None = None) -> list[int]:
        """Score the ``k`` best search candidates on ``split`` (skipping ones already re-scored there), ``capacity``
        at a time. ``inputs_of({candidate id: recipe})`` gives each one the extra model folders and model tasks it
        needs (merged parents, all built before the first is sent). Returns the ids in the order they finished."""
        todo = [r for r in self.archive.best(k) if self.archive.rescore(r.id, split) is None]
        if not todo:
            return []
        self.say(f"scoring the {len(todo)} best candidates on the {split} split: {[r.id for r in todo]}")
        recipes = {r.id: Recipe.from_dict(r.recipe) for r in todo}
        inputs = inputs_of(recipes) if inputs_of is not None else {}
        for r in todo:
            extra, tasks = inputs.get(r.id, ({}, {}))
            self.add(Job(r.id, recipes[r.id], r.recipe_hash, r.genome), parents=[str(p) for p in r.parents],
                     generation=r.generation, extra_models=extra, model_tasks=tasks, split=split)
        return [f.record.id for f in self.drain()]

    def _archive_rescore(self, slot: _Slot, outcome: EvalOutcome, result: EvalResult) -> CandidateRecord:
        cid = slot.ticket.candidate_id
        self.archive.add_rescore(candidate_id=cid, split=slot.split, ok=result.ok, scores=task_scores(result),
                                 aggregate=result.aggregate if math.isfinite(result.aggregate) else self.penalty,
                                 settings=result.settings, merge_seconds=outcome.merge_seconds,
                                 eval_seconds=outcome.eval_seconds, worker=outcome.worker, error=result.error,
                                 items=result.items)
        self.say(f"candidate {cid}: {slot.split} {result.aggregate:.6f}" + ("" if result.ok else f" ({result.error})"))
        rec = self.archive.get(cid)
        assert rec is not None
        return rec


def task_scores(result: EvalResult) -> dict[str, Any]:
    """Per-task scores as the archive stores them."""
    return {t.task: {"metric": t.metric, "value": t.value, "higher_is_better": t.higher_is_better,
                     "weight": t.weight} for t in result.tasks}
