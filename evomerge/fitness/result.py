"""What an evaluation returns. Aggregates are always "higher is better" so the search never guesses."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from evomerge.fitness.items import ItemScores


@dataclass(frozen=True)
class TaskScore:
    """One task's metric, with its direction and weight in the aggregate."""

    task: str
    metric: str
    value: float
    higher_is_better: bool = True
    weight: float = 1.0

    @property
    def signed(self) -> float:
        return self.value if self.higher_is_better else -self.value


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model on one split; ``ok`` False carries the error and a finite penalty aggregate."""

    aggregate: float
    tasks: tuple[TaskScore, ...] = ()
    ok: bool = True
    error: str | None = None
    split: str = "search"
    seconds: float = 0.0
    forward_seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    items: dict[str, ItemScores] = field(default_factory=dict)  # per task: which items it solved
    # stopped by racing before its last stage: ``items`` holds what it saw, ``aggregate`` the paired estimate
    partial: bool = False

    @property
    def complete(self) -> bool:
        """Whether every task was scored on all of its items (not a racing stage's subset)."""
        return all(s.complete for s in self.items.values())

    @staticmethod
    def failure(error: str, penalty: float, split: str = "search", seconds: float = 0.0,
                settings: dict[str, Any] | None = None) -> EvalResult:
        return EvalResult(aggregate=penalty, ok=False, error=error, split=split, seconds=seconds,
                          settings=dict(settings or {}))

    @staticmethod
    def weighted_aggregate(tasks: tuple[TaskScore, ...]) -> float:
        """Weighted mean of signed task values (minimized metrics enter negated)."""
        total = sum(t.weight for t in tasks)
        if total <= 0:
            raise ValueError("task weights must sum to a positive number")
        value = sum(t.weight * t.signed for t in tasks) / total
        if not math.isfinite(value):
            raise ValueError(f"non-finite aggregate {value}")
        return value

    def task_values(self) -> dict[str, float]:
        return {t.task: t.value for t in self.tasks}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (per-item arrays as their storage records)."""
        out = asdict(dataclasses.replace(self, items={}))
        out["items"] = {k: v.to_json() for k, v in self.items.items()}
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> EvalResult:
        tasks = tuple(TaskScore(**t) for t in data.get("tasks", ()))
        items = {k: ItemScores.from_json(v) for k, v in (data.get("items") or {}).items()}
        return EvalResult(**{**data, "tasks": tasks, "items": items})
