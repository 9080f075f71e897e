"""Per-item results: which items of a task a model solves, not only the task's number.

Every evaluation records, per task, each item's outcome under the task's metric and the item's weight in the
task value, so the task value is the weighted mean of its items (exact match: weight 1 per row; token accuracy
and log-likelihood: the row's scored tokens; lm-eval mean metrics: weight 1 per document). Items are keyed by
their index in the task's item list (jsonl row, lm-eval document) and the list's content hash, so an edited
task file is detected. Stored compactly: one packed float32 array of scores and one of weights per task.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# metrics whose task value is a weighted mean of per-item values (so items can be raced and compared)
MEAN_METRICS = frozenset({"exact_match", "token_acc", "loglik"})


def items_hash(items: Iterable[Any]) -> str:
    """Content hash of a task's item list (rows or documents, in order)."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ItemList:
    """A task's items on one split: how many, which can be scored one by one, the list's content hash, and
    whether the task value is a weighted mean of its items (only then can items stand for the task)."""

    total: int
    scorable: tuple[int, ...]
    content: str
    mean: bool


@dataclass(frozen=True, eq=False)
class ItemScores:
    """One task's per-item outcomes on some of its items (``index`` into the task's item list)."""

    task: str
    index: np.ndarray  # int32, positions in the task's item list
    scores: np.ndarray  # float32
    weights: np.ndarray  # float32, each item's weight in the task value
    total: int  # items in the task's list
    content: str  # items_hash of the task's list

    def __post_init__(self) -> None:
        if not (len(self.index) == len(self.scores) == len(self.weights)):
            raise ValueError(f"task {self.task}: {len(self.index)} indices, {len(self.scores)} scores, "
                             f"{len(self.weights)} weights")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ItemScores):
            return NotImplemented
        return ((self.task, self.total, self.content) == (other.task, other.total, other.content)
                and np.array_equal(self.index, other.index) and np.array_equal(self.scores, other.scores)
                and np.array_equal(self.weights, other.weights))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    @staticmethod
    def of(task: str, index: Sequence[int], scores: Sequence[float], weights: Sequence[float], total: int,
           content: str) -> ItemScores:
        return ItemScores(task, np.asarray(index, dtype=np.int32), np.asarray(scores, dtype=np.float32),
                          np.asarray(weights, dtype=np.float32), int(total), content)

    @property
    def complete(self) -> bool:
        return len(self.index) == self.total

    def value(self) -> float:
        """The weighted mean of the items' scores (the task value on these items)."""
        w = self.weights.astype(np.float64)
        total = float(w.sum())
        if total <= 0:
            raise ValueError(f"task {self.task}: item weights sum to {total}")
        return float((w * self.scores.astype(np.float64)).sum() / total)

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, weights) over the whole item list, NaN / 0 where an item was not evaluated."""
        s = np.full(self.total, np.nan, dtype=np.float32)
        w = np.zeros(self.total, dtype=np.float32)
        s[self.index] = self.scores
        w[self.index] = self.weights
        return s, w

    def merged(self, other: ItemScores) -> ItemScores:
        """These items and ``other``'s (later stages of the same evaluation); ``other`` wins on overlap."""
        if (other.task, other.total, other.content) != (self.task, self.total, self.content):
            raise ValueError(f"task {self.task}: cannot merge items of different item lists")
        s, w = self.dense()
        seen = np.zeros(self.total, dtype=bool)
        seen[self.index] = True
        s[other.index] = other.scores
        w[other.index] = other.weights
        seen[other.index] = True
        idx = np.flatnonzero(seen).astype(np.int32)
        return ItemScores(self.task, idx, s[idx], w[idx], self.total, self.content)

    # ------------------------------------------------------------------------------------ storage

    def to_record(self) -> dict[str, Any]:
        """Plain data + packed arrays (bytes) for the archive."""
        full = self.complete and bool((self.index == np.arange(self.total)).all())
        return {"task": self.task, "total": self.total, "content": self.content,
                "index": None if full else self.index.astype("<i4").tobytes(),
                "scores": self.scores.astype("<f4").tobytes(), "weights": self.weights.astype("<f4").tobytes()}

    def to_json(self) -> dict[str, Any]:
        """The storage record with its arrays as base64 text (for JSON)."""
        return {k: base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v
                for k, v in self.to_record().items()}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ItemScores:
        return ItemScores.from_record({k: base64.b64decode(v) if k in ("index", "scores", "weights") and v is not None
                                       else v for k, v in data.items()})

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> ItemScores:
        scores = np.frombuffer(record["scores"], dtype="<f4").astype(np.float32)
        weights = np.frombuffer(record["weights"], dtype="<f4").astype(np.float32)
        raw = record.get("index")
        index = np.arange(len(scores), dtype=np.int32) if raw is None else np.frombuffer(raw, dtype="<i4").astype(np.int32)
        return ItemScores(str(record["task"]), index, scores, weights, int(record["total"]), str(record["content"]))
