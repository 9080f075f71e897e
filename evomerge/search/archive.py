"""The archive: an embedded, append-only SQLite database (WAL) holding everything a run has learned.

Tables (rows are never updated or deleted; triggers refuse it):

- ``candidates``: one row per finished evaluation on the search split: id, recipe hash and JSON, parents,
  generation, method, genome, status (ok | failed), per-task scores, aggregate (higher is better; failures hold
  the penalty), split, evaluation settings, merge/eval seconds, worker, error text, creation time, session,
  ``partial`` (1: stopped by racing before its last stage; its aggregate is the paired estimate and its items
  are those it saw). A recipe hash appears at most once: identical recipes are never evaluated twice.
- ``rescores``: re-scores of a candidate on another split (the held-out test split at the end of a search).
- ``items``: per-item results, one row per candidate, split and task: the task's item count and content hash,
  the items' indices (NULL: every item, in order), scores and weights as packed little-endian arrays (int32,
  float32, float32); written in the transaction of the candidate row or the re-score it belongs to.
- ``events``: time, kind, JSON payload (session starts/ends, timing snapshots, duplicates, stops, ...).
- ``kinship``: cache of (a, b, metric) -> value for the population manager.
- ``meta``: run-level key/values (schema version, model keys, space fingerprint); insert-only too.

It is the single source of truth for ``status``, ``export``, reports and resume. Many readers may open it while
one search writes (``Archive.open(path, readonly=True)``). A file that is not a healthy archive raises
:class:`~evomerge.errors.RunDirError` and is never modified.

Archives written before per-item results (no ``items`` table, no ``partial`` column) read as they are (no item
results, nothing partial); opened for writing, they gain both (a new table and a column with default 0, no row
changed), so a resumed old run goes on with per-item results.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.atomic import disk_full_error, is_disk_full
from evomerge.errors import RunDirError
from evomerge.fitness.items import ItemScores
from evomerge.killpoints import kill_point
from evomerge.search.events import MERGE_EVENTS, EventKind

SCHEMA_VERSION = "1"
FILE_NAME = "archive.sqlite"
_TABLES = ("meta", "candidates", "rescores", "events", "kinship")  # every archive has these
_ADDED_TABLES = ("items",)  # added later: created when an older archive is opened for writing

# how an evaluation went: a candidate's first one and every re-score on another split
_OUTCOME_COLUMNS = ("settings TEXT NOT NULL, merge_seconds REAL NOT NULL, eval_seconds REAL NOT NULL, worker TEXT, "
                    "error TEXT, created_at REAL NOT NULL,")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    recipe_hash TEXT NOT NULL,
    recipe TEXT NOT NULL,
    parents TEXT NOT NULL,
    generation INTEGER NOT NULL,
    method TEXT NOT NULL,
    genome TEXT,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    scores TEXT NOT NULL,
    aggregate REAL NOT NULL,
    split TEXT NOT NULL,
    {_OUTCOME_COLUMNS}
    session INTEGER NOT NULL,
    partial INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS candidates_hash ON candidates (recipe_hash, split);
CREATE TABLE IF NOT EXISTS rescores (
    candidate_id INTEGER NOT NULL REFERENCES candidates (id),
    split TEXT NOT NULL,
    status TEXT NOT NULL,
    scores TEXT NOT NULL,
    aggregate REAL NOT NULL,
    {_OUTCOME_COLUMNS}
    PRIMARY KEY (candidate_id, split)
);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, time REAL NOT NULL, kind TEXT NOT NULL,
    data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS kinship (a TEXT NOT NULL, b TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (a, b, metric));
"""
_ITEMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    candidate_id INTEGER NOT NULL,
    split TEXT NOT NULL,
    task TEXT NOT NULL,
    total INTEGER NOT NULL,
    content TEXT NOT NULL,
    idx BLOB,
    scores BLOB NOT NULL,
    weights BLOB NOT NULL,
    PRIMARY KEY (candidate_id, split, task)
);
"""


def _triggers(tables: Sequence[str]) -> str:
    return "".join(
        f"CREATE TRIGGER IF NOT EXISTS {t}_no_{op} BEFORE {op.upper()} ON {t} "
        f"BEGIN SELECT RAISE(ABORT, 'the archive is append-only ({t})'); END;\n"
        for t in tables for op in ("update", "delete"))


_TRIGGERS = _triggers(_TABLES + _ADDED_TABLES)


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """What one evaluation of a candidate gave: its first one (a :class:`CandidateRecord`) or a re-score."""

    split: str
    status: str
    scores: dict[str, Any]
    aggregate: float
    settings: dict[str, Any]
    merge_seconds: float
    eval_seconds: float
    worker: str | None
    error: str | None
    created_at: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True, kw_only=True)
class CandidateRecord(Evaluation):
    """One archived evaluation with what the candidate is (recipe, lineage, genome)."""

    id: int
    recipe_hash: str
    recipe: dict[str, Any]
    parents: list[Any]
    generation: int
    method: str
    genome: dict[str, Any] | None
    session: int
    partial: bool = False  # stopped by racing: aggregate is the paired estimate, items those it saw

    @property
    def complete(self) -> bool:
        """A successful evaluation on every item (what best, leaderboards, exports and re-scores use)."""
        return self.ok and not self.partial


@dataclass(frozen=True, kw_only=True)
class Rescore(Evaluation):
    """A candidate scored on another split (the held-out test split)."""

    candidate_id: int


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class Archive:
    """Append-only SQLite archive of a run (one writer, any number of readers)."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, create: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        exists = self.path.is_file()
        if not exists and not create:
            raise RunDirError(f"{self.path}: no archive here (is this a run directory?)")
        if exists and create:
            raise RunDirError(f"{self.path}: an archive already exists; refusing to create a new one")
        try:
            if readonly:
                uri = f"file:{self.path.resolve()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None,
                                           check_same_thread=False)
            else:
                self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                           check_same_thread=False)
        except sqlite3.Error as exc:
            raise RunDirError(f"{self.path}: cannot open the archive ({exc})") from None
        try:
            if exists:
                self._check_healthy()
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            if create:
                # executescript commits on its own: the schema goes in as one script-level transaction
                self._db.executescript("BEGIN IMMEDIATE;\n" + _SCHEMA + _ITEMS_SCHEMA + _TRIGGERS
                                       + f"INSERT INTO meta (key, value) VALUES ('schema', '{SCHEMA_VERSION}');\n"
                                       + "COMMIT;\n")
            elif not readonly:
                self._upgrade()
            self._features()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if is_disk_full(exc):  # SQLITE_FULL is a DatabaseError too: not a corrupt archive
                raise self._disk_full() from None
            raise RunDirError(f"{self.path}: the archive is corrupt or not an evomerge archive ({exc}); "
                              "nothing was changed. Restore it from a backup or start a new run") from None

    @staticmethod
    def create(path: str | os.PathLike[str]) -> Archive:
        return Archive(path, create=True)

    @staticmethod
    def open(path: str | os.PathLike[str], readonly: bool = False) -> Archive:
        return Archive(path, readonly=readonly)

    def _check_healthy(self) -> None:
        row = self._db.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else 'no answer'}")
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = [t for t in _TABLES if t not in tables]
        if missing:
            raise sqlite3.DatabaseError(f"missing tables {missing}")
        version = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"archive schema {version[0] if version else '?'}, "
                                        f"this evomerge reads schema {SCHEMA_VERSION}")

    def _features(self) -> None:
        """Which later additions this archive has (an older one, opened read-only, has neither)."""
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        self.has_items = "items" in tables
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(candidates)")}
        self.has_partial = "partial" in columns
        self._cols = self._BASE_COLS + (", partial" if self.has_partial else ", 0")

    def _upgrade(self) -> None:
        """Give an archive written before per-item results the ``items`` table and the ``partial`` column
        (additions only: no existing row changes, and older readers still read it)."""
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(candidates)")}
        if "items" in tables and "partial" in columns:
            return
        script = "BEGIN IMMEDIATE;\n"
        if "partial" not in columns:
            script += "ALTER TABLE candidates ADD COLUMN partial INTEGER NOT NULL DEFAULT 0;\n"
        if "items" not in tables:
            script += _ITEMS_SCHEMA + _triggers(_ADDED_TABLES)
        self._db.executescript(script + "COMMIT;\n")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise RunDirError(f"{self.path}: opened read-only")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if is_disk_full(exc):  # the row is not archived; the caller's checkpoint still holds its job
                raise self._disk_full() from None
            raise

    def _disk_full(self) -> Exception:
        return disk_full_error(self.path, 1 << 20, f"the archive {self.path.name}",
                               "Nothing is lost (every archived evaluation is kept; the one being written is "
                               f"evaluated again): free some space, then continue with `evomerge resume "
                               f"{self.path.parent}`")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ meta

    def set_meta(self, key: str, value: Any) -> None:
        """Record a run-level value once (a second, different value for the same key is refused)."""
        text = _dumps(value)
        old = self.get_meta(key)
        if old is not None:
            if _dumps(old) != text:
                raise RunDirError(f"{self.path}: meta {key!r} is already set to a different value")
            return
        with self._tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, text))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None:
            return default
        return row[0] if key == "schema" else json.loads(row[0])

    # ------------------------------------------------------------------------------------------ candidates

    def add_candidate(self, *, id: int, recipe_hash: str, recipe: Mapping[str, Any], parents: Sequence[Any],
                      generation: int, method: str, genome: Mapping[str, Any] | None, ok: bool,
                      scores: Mapping[str, Any], aggregate: float, split: str, settings: Mapping[str, Any],
                      merge_seconds: float, eval_seconds: float, worker: str | None, error: str | None,
                      session: int, created_at: float | None = None,
                      items: Mapping[str, ItemScores] | None = None, partial: bool = False) -> None:
        """Append one finished evaluation with its per-item results, in one transaction (refuses a second row
        for the same recipe and split)."""
        if not math.isfinite(aggregate):
            raise ValueError(f"candidate {id}: non-finite aggregate {aggregate}")
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO candidates (id, recipe_hash, recipe, parents, generation, method, genome, status,"
                    " scores, aggregate, split, settings, merge_seconds, eval_seconds, worker, error, created_at,"
                    " session, partial) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (int(id), recipe_hash, _dumps(recipe), _dumps(list(parents)), int(generation), method,
                     None if genome is None else _dumps(genome), "ok" if ok else "failed", _dumps(scores),
                     float(aggregate), split, _dumps(settings), float(merge_seconds), float(eval_seconds), worker,
                     error, time.time() if created_at is None else float(created_at), int(session), int(partial)),
                )
                self._insert_items(db, int(id), split, items)
                kill_point("archive_commit")
        except sqlite3.IntegrityError as exc:
            raise RunDirError(f"{self.path}: candidate {id} ({recipe_hash[:12]}) not archived: {exc}") from None

    def _row(self, row: Sequence[Any]) -> CandidateRecord:
        return CandidateRecord(
            id=int(row[0]), recipe_hash=row[1], recipe=json.loads(row[2]), parents=json.loads(row[3]),
            generation=int(row[4]), method=row[5], genome=_loads(row[6]), status=row[7], scores=json.loads(row[8]),
            aggregate=float(row[9]), split=row[10], settings=json.loads(row[11]), merge_seconds=float(row[12]),
            eval_seconds=float(row[13]), worker=row[14], error=row[15], created_at=float(row[16]),
            session=int(row[17]), partial=bool(row[18]),
        )

    _BASE_COLS = ("id, recipe_hash, recipe, parents, generation, method, genome, status, scores, aggregate, split, "
                  "settings, merge_seconds, eval_seconds, worker, error, created_at, session")

    def results(self, split: str = "search") -> list[CandidateRecord]:
        """Every archived evaluation of ``split``, in the order they finished."""
        rows = self._db.execute(
            f"SELECT {self._cols} FROM candidates WHERE split=? ORDER BY rowid", (split,)).fetchall()
        return [self._row(r) for r in rows]

    def get(self, candidate_id: int) -> CandidateRecord | None:
        row = self._db.execute(f"SELECT {self._cols} FROM candidates WHERE id=?", (int(candidate_id),)).fetchone()
        return None if row is None else self._row(row)

    def by_hash(self, recipe_hash: str, split: str = "search") -> CandidateRecord | None:
        """The evaluation of an identical recipe, if any (the dedup lookup)."""
        row = self._db.execute(f"SELECT {self._cols} FROM candidates WHERE recipe_hash=? AND split=?",
                               (recipe_hash, split)).fetchone()
        return None if row is None else self._row(row)

    def count(self, split: str = "search") -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM candidates WHERE split=?", (split,)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        """Evaluations by status (search split; ``partial``: stopped by racing, counted in ``ok``), rescores and
        events."""
        out = {"ok": 0, "failed": 0}
        for status, n in self._db.execute(
                "SELECT status, COUNT(*) FROM candidates WHERE split='search' GROUP BY status"):
            out[status] = int(n)
        out["evaluations"] = out["ok"] + out["failed"]
        out["partial"] = int(self._db.execute(
            "SELECT COUNT(*) FROM candidates WHERE split='search' AND partial=1").fetchone()[0]) if self.has_partial else 0
        out["rescores"] = int(self._db.execute("SELECT COUNT(*) FROM rescores").fetchone()[0])
        out["events"] = int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        return out

    def max_id(self) -> int:
        row = self._db.execute("SELECT MAX(id) FROM candidates").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def best(self, k: int = 1, rank_by: str = "search") -> list[CandidateRecord]:
        """The top ``k`` complete candidates (successful, not stopped by racing) by search aggregate, or by
        test rescore (``rank_by="test"``)."""
        if rank_by == "search":
            rows = self._db.execute(
                f"SELECT {self._cols} FROM candidates WHERE split='search' AND status='ok'{self._complete()} "
                "ORDER BY aggregate DESC, id ASC LIMIT ?", (int(k),)).fetchall()
            return [self._row(r) for r in rows]
        cols = ", ".join("c." + c.strip() for c in self._BASE_COLS.split(","))
        rows = self._db.execute(
            f"SELECT {cols}, {'c.partial' if self.has_partial else '0'} FROM candidates c "
            f"JOIN rescores r ON r.candidate_id = c.id WHERE r.split=? AND r.status='ok'{self._complete('c.')} "
            "ORDER BY r.aggregate DESC, c.id ASC LIMIT ?", (rank_by, int(k))).fetchall()
        return [self._row(r) for r in rows]

    def _complete(self, prefix: str = "") -> str:
        return f" AND {prefix}partial=0" if self.has_partial else ""

    def lineage(self, candidate_id: int) -> dict[str, Any]:
        """The candidate's ancestry as a tree: parents are earlier candidates (``cand:ID``) or original models."""
        models = self.get_meta("models", {}) or {}
        merged = self.member_candidates()
        seen: set[int] = set()

        def node(cid: int) -> dict[str, Any]:
            rec = self.get(cid)
            if rec is None:
                return {"candidate": cid, "missing": True}
            if cid in seen:
                return {"candidate": cid, "cycle": True}
            seen.add(cid)
            parents = []
            for p in rec.parents:
                if isinstance(p, str) and p.startswith("cand:"):
                    parents.append(node(int(p[5:])))
                elif isinstance(p, str) and p in merged and p not in models:
                    parents.append({"member": p, **node(merged[p])})
                else:
                    parents.append({"model": p, "path": models.get(p)})
            return {"candidate": cid, "method": rec.method, "aggregate": rec.aggregate,
                    "generation": rec.generation, "parents": parents}

        return node(int(candidate_id))

    def member_candidates(self) -> dict[str, int]:
        """Merged population members (model keys such as ``g1.3``) -> the candidate that made them."""
        return {str(e["data"]["child"]): int(e["data"]["candidate_id"]) for e in self.events()
                if e["kind"] in MERGE_EVENTS and "child" in e["data"] and "candidate_id" in e["data"]}

    # ------------------------------------------------------------------------------------------ rescores

    def add_rescore(self, *, candidate_id: int, split: str, ok: bool, scores: Mapping[str, Any], aggregate: float,
                    settings: Mapping[str, Any], merge_seconds: float, eval_seconds: float, worker: str | None,
                    error: str | None, items: Mapping[str, ItemScores] | None = None) -> None:
        """Append a re-score of a candidate on ``split`` with its per-item results, in one transaction."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO rescores (candidate_id, split, status, scores, aggregate, settings, merge_seconds,"
                " eval_seconds, worker, error, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (int(candidate_id), split, "ok" if ok else "failed", _dumps(scores), float(aggregate),
                 _dumps(settings), float(merge_seconds), float(eval_seconds), worker, error, time.time()),
            )
            self._insert_items(db, int(candidate_id), split, items)

    def rescores(self, candidate_id: int | None = None) -> list[Rescore]:
        q = ("SELECT candidate_id, split, status, scores, aggregate, settings, merge_seconds, eval_seconds, worker,"
             " error, created_at FROM rescores")
        args: tuple[Any, ...] = ()
        if candidate_id is not None:
            q += " WHERE candidate_id=?"
            args = (int(candidate_id),)
        return [Rescore(candidate_id=int(r[0]), split=r[1], status=r[2], scores=json.loads(r[3]), aggregate=float(r[4]),
                        settings=json.loads(r[5]), merge_seconds=float(r[6]), eval_seconds=float(r[7]), worker=r[8],
                        error=r[9], created_at=float(r[10])) for r in self._db.execute(q + " ORDER BY rowid", args)]

    def rescore(self, candidate_id: int, split: str) -> Rescore | None:
        return next((r for r in self.rescores(candidate_id) if r.split == split), None)

    # ------------------------------------------------------------------------------------------ per-item results

    def _insert_items(self, db: sqlite3.Connection, candidate_id: int, split: str,
                      items: Mapping[str, ItemScores] | None) -> None:
        for task, scores in sorted((items or {}).items()):
            rec = scores.to_record()
            db.execute("INSERT INTO items (candidate_id, split, task, total, content, idx, scores, weights) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (candidate_id, split, str(task), int(rec["total"]), str(rec["content"]), rec["index"],
                        rec["scores"], rec["weights"]))

    def items(self, candidate_id: int, split: str = "search") -> dict[str, ItemScores]:
        """One candidate's per-item results on ``split``, by task (empty: none recorded, e.g. an older run)."""
        return self.items_of([candidate_id], split).get(int(candidate_id), {})

    def items_of(self, candidate_ids: Sequence[int] | None = None, split: str = "search"
                 ) -> dict[int, dict[str, ItemScores]]:
        """Per-item results of many candidates (all of ``split`` when ``candidate_ids`` is None)."""
        if not self.has_items:
            return {}
        q = "SELECT candidate_id, task, total, content, idx, scores, weights FROM items WHERE split=?"
        args: list[Any] = [split]
        if candidate_ids is not None:
            ids = [int(c) for c in candidate_ids]
            if not ids:
                return {}
            q += f" AND candidate_id IN ({', '.join('?' * len(ids))})"
            args += ids
        out: dict[int, dict[str, ItemScores]] = {}
        for cid, task, total, content, idx, sc, w in self._db.execute(q + " ORDER BY candidate_id, task", args):
            out.setdefault(int(cid), {})[task] = ItemScores.from_record(
                {"task": task, "total": total, "content": content, "index": idx, "scores": sc, "weights": w})
        return out

    def item_matrix(self, candidate_ids: Sequence[int], split: str = "search"
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per task: (scores, weights) as ``len(candidate_ids) x items`` arrays in the given order, NaN / 0 where
        a candidate has no result on an item (not seen by a raced candidate, or nothing recorded). A task whose
        item list differs between candidates (an edited task file) keeps the first candidate's list."""
        found = self.items_of(candidate_ids, split)
        first: dict[str, ItemScores] = {}
        for cid in candidate_ids:
            for task, it in found.get(int(cid), {}).items():
                first.setdefault(task, it)
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for task, ref in first.items():
            s = np.full((len(candidate_ids), ref.total), np.nan, dtype=np.float32)
            w = np.zeros((len(candidate_ids), ref.total), dtype=np.float32)
            for row, cid in enumerate(candidate_ids):
                it = found.get(int(cid), {}).get(task)
                if it is not None and (it.total, it.content) == (ref.total, ref.content):
                    s[row], w[row] = it.dense()
            out[task] = (s, w)
        return out

    def item_counts(self, split: str = "search") -> dict[str, int]:
        """``evaluated``: item evaluations recorded on ``split``; ``candidates``: rows of ``split`` that have
        per-item results; ``full``: what those rows would have cost on every item."""
        if not self.has_items:
            return {"evaluated": 0, "candidates": 0, "full": 0}
        row = self._db.execute(
            "SELECT COALESCE(SUM(CASE WHEN idx IS NULL THEN total ELSE length(idx) / 4 END), 0), "
            "COUNT(DISTINCT candidate_id), COALESCE(SUM(total), 0) FROM items WHERE split=?", (split,)).fetchone()
        return {"evaluated": int(row[0]), "candidates": int(row[1]), "full": int(row[2])}

    # ------------------------------------------------------------------------------------------ events

    def add_event(self, kind: EventKind | str, data: Mapping[str, Any] | None = None) -> None:
        """Append one event; the kind is stored as its plain string (``EventKind`` values)."""
        with self._tx() as db:
            db.execute("INSERT INTO events (time, kind, data) VALUES (?, ?, ?)",
                       (time.time(), str(kind), _dumps(dict(data or {}))))

    def events(self, kind: EventKind | str | None = None) -> list[dict[str, Any]]:
        """Events in the order they were written (of one kind, if given); ``kind`` is the stored string."""
        q = "SELECT id, time, kind, data FROM events"
        args: tuple[Any, ...] = ()
        if kind is not None:
            q += " WHERE kind=?"
            args = (str(kind),)
        return [{"id": int(r[0]), "time": float(r[1]), "kind": r[2], "data": json.loads(r[3])}
                for r in self._db.execute(q + " ORDER BY id", args)]

    # ------------------------------------------------------------------------------------------ kinship cache

    def put_kinship(self, a: str, b: str, metric: str, value: float) -> None:
        """Cache a kinship value (symmetric: stored under the sorted pair; an existing entry is kept)."""
        x, y = sorted((str(a), str(b)))
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO kinship (a, b, metric, value) VALUES (?, ?, ?, ?)",
                       (x, y, metric, float(value)))

    def get_kinship(self, a: str, b: str, metric: str) -> float | None:
        x, y = sorted((str(a), str(b)))
        row = self._db.execute("SELECT value FROM kinship WHERE a=? AND b=? AND metric=?", (x, y, metric)).fetchone()
        return None if row is None else float(row[0])

    def kinship_table(self, metric: str | None = None) -> dict[tuple[str, str, str], float]:
        q = "SELECT a, b, metric, value FROM kinship"
        args: tuple[Any, ...] = ()
        if metric is not None:
            q += " WHERE metric=?"
            args = (metric,)
        return {(r[0], r[1], r[2]): float(r[3]) for r in self._db.execute(q, args)}
