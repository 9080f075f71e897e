"""The whole-genome optimizer as data: every call made on it is logged, and a fresh optimizer replays the log.

The run's checkpoint holds this log (JSON), never the optimizer object: a checkpoint is plain numbers, so a run
directory from someone else cannot run code on resume (a pickle can). A nevergrad optimizer is deterministic
given its seeded parametrization and the sequence of calls made on it (its random draws come from the
parametrization's ``random_state``), so replaying the calls on a fresh optimizer of the same name, budget,
``num_workers`` and seed gives the state the logged one had, and the next asks are the same.

Operations, in order (``ops``):

- ``["ask", n]``: ``n`` asks (asks are numbered from 0 in the order they were made);
- ``["tell", i, cid]``: ask ``i`` told the loss of archived candidate ``cid`` (its own evaluation, an identical
  recipe already archived, or the job it followed); the loss is read from the archive, so the log holds no score;
- ``["told", cid]``: archived candidate ``cid`` told without an ask, from its genome (a run resumed without a
  usable checkpoint);
- ``["budget", b]``: the optimizer's budget raised to ``b``.

Replay checks that every ask decodes to the recipe the archive holds for what it was told with (and an in-flight
ask to the recipe it was submitted as); the first difference raises :class:`ReplayMismatch`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evomerge.search.genome import Genome
from evomerge.search.optimizer import bound_archives, build_optimizer


class ReplayMismatch(Exception):
    """A replayed ask is not the one logged (another nevergrad version, or a log that does not fit the run)."""


@dataclass
class OptimizerLog:
    """How the optimizer was built and every call made on it since (see the module docstring)."""

    name: str
    budget: int
    num_workers: int
    seed: int
    ops: list[list[int | str]] = field(default_factory=list)
    asks: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "budget": self.budget, "num_workers": self.num_workers, "seed": self.seed,
                "asks": self.asks, "ops": self.ops}

    @staticmethod
    def from_json(data: Any) -> OptimizerLog:
        """Read a logged optimizer; anything but the expected plain types raises ValueError."""
        if not isinstance(data, dict):
            raise ValueError("optimizer: expected a mapping")
        name, budget, workers, seed = data.get("name"), data.get("budget"), data.get("num_workers"), data.get("seed")
        if not isinstance(name, str) or not all(_is_int(v) for v in (budget, workers, seed)):
            raise ValueError("optimizer: name, budget, num_workers and seed are required")
        ops = data.get("ops")
        if not isinstance(ops, list):
            raise ValueError("optimizer.ops: expected a list")
        asks = 0
        for op in ops:
            kind = op[0] if isinstance(op, list) and op else None
            sizes = {"ask": 2, "tell": 3, "told": 2, "budget": 2}
            if kind not in sizes or len(op) != sizes[kind] or not all(_is_int(v) for v in op[1:]):
                raise ValueError(f"optimizer.ops: bad operation {op!r}")
            if kind == "ask":
                asks += int(op[1])
            elif kind == "tell" and not 0 <= int(op[1]) < asks:
                raise ValueError(f"optimizer.ops: {op!r} tells an ask not made yet")
        if data.get("asks") != asks:
            raise ValueError(f"optimizer.asks: {data.get('asks')!r}, but the operations make {asks} asks")
        return OptimizerLog(name, int(budget), int(workers), int(seed), [list(op) for op in ops], asks)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class LoggedOptimizer:
    """A nevergrad optimizer whose asks and tells are logged (:class:`OptimizerLog`), so it can be rebuilt."""

    def __init__(self, optimizer: Any, log: OptimizerLog) -> None:
        self.optimizer, self.log = optimizer, log

    @staticmethod
    def new(genome: Genome, name: str, *, budget: int, num_workers: int, seed: int, where: str) -> LoggedOptimizer:
        num_workers = max(1, int(num_workers))
        optimizer = build_optimizer(name, genome.parametrization(seed), budget=budget, num_workers=num_workers,
                                    where=where, bounded=True)
        return LoggedOptimizer(optimizer, OptimizerLog(name, int(budget), num_workers, int(seed)))

    @property
    def parametrization(self) -> Any:
        return self.optimizer.parametrization

    def ask(self) -> tuple[int, Any]:
        """(ask number, candidate)."""
        cand = self.optimizer.ask()
        bound_archives(self.optimizer)  # inner optimizers appear at the first ask; idempotent afterwards
        index = self.log.asks
        self.log.asks += 1
        last = self.log.ops[-1] if self.log.ops else None
        if last is not None and last[0] == "ask":
            last[1] = int(last[1]) + 1
        else:
            self.log.ops.append(["ask", 1])
        return index, cand

    def tell(self, index: int, candidate: Any, candidate_id: int, loss: float) -> None:
        """Tell ask ``index`` the loss of archived candidate ``candidate_id``."""
        self.optimizer.tell(candidate, loss)
        self.log.ops.append(["tell", int(index), int(candidate_id)])

    def tell_not_asked(self, candidate: Any, candidate_id: int, loss: float) -> None:
        self.optimizer.tell(candidate, loss)
        self.log.ops.append(["told", int(candidate_id)])

    def raise_budget(self, budget: int) -> None:
        if self.optimizer.budget is None or self.optimizer.budget < budget:
            self.optimizer.budget = int(budget)
            self.log.ops.append(["budget", int(budget)])


@dataclass(frozen=True)
class ArchivedScore:
    """What replay needs of an archived candidate: its recipe hash, its aggregate and its genome."""

    recipe_hash: str
    aggregate: float
    genome: dict[str, Any] | None


def replay(log: OptimizerLog, genome: Genome, archived: Callable[[int], ArchivedScore | None], *,
           where: str) -> tuple[LoggedOptimizer, dict[int, Any]]:
    """A fresh optimizer taken through ``log``; returns it and the asks not told yet (ask number -> candidate).

    ``archived(cid)`` gives an archived candidate's score (None: not archived, a mismatch)."""
    opt = LoggedOptimizer.new(genome, log.name, budget=log.budget, num_workers=log.num_workers, seed=log.seed,
                              where=where)
    pending: dict[int, Any] = {}
    for op in log.ops:
        kind = op[0]
        if kind == "ask":
            for _ in range(int(op[1])):
                index, cand = opt.ask()
                pending[index] = cand
        elif kind == "tell":
            index, cid = int(op[1]), int(op[2])
            rec = archived(cid)
            if rec is None:
                raise ReplayMismatch(f"ask {index} was told candidate {cid}, which the archive does not hold")
            cand = pending.pop(index, None)
            if cand is None:
                raise ReplayMismatch(f"ask {index} is told twice")
            got = genome.decode(cand.value).content_hash()
            if got != rec.recipe_hash:
                raise ReplayMismatch(f"ask {index} replays as recipe {got[:12]}, but it was told candidate {cid} "
                                     f"(recipe {rec.recipe_hash[:12]})")
            opt.tell(index, cand, cid, -rec.aggregate)
        elif kind == "told":
            cid = int(op[1])
            rec = archived(cid)
            if rec is None or rec.genome is None:
                raise ReplayMismatch(f"candidate {cid} was told from its genome, which the archive does not hold")
            opt.tell_not_asked(Genome.from_json(rec.genome, opt.parametrization), cid, -rec.aggregate)
        elif kind == "budget":
            opt.raise_budget(int(op[1]))
    if opt.log.ops != log.ops:  # the replay logs itself: the same calls give the same log
        raise ReplayMismatch("the replayed operations differ from the logged ones")
    return opt, pending
