"""Calibration rows: a few task examples per model, tokenized on demand for activation statistics and task losses.

Model keys: rows are looked up by the model key, then by the key's last path component (``zoo:demo/add`` ->
``add``), so a fitness spec's task names match the demo zoo's model folders. Where rows come from (a run's
fitness, a calibration file) is decided by the caller (:mod:`evomerge.method_data`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.errors import ConfigError

Tensor = torch.Tensor


def key_candidates(key: str) -> list[str]:
    out = [key]
    stripped = key.rstrip("/")
    tail = stripped.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    if tail and tail not in out:
        out.append(tail)
    return out


@dataclass
class CalibrationSet:
    """Task rows per model key and the tokenizer that encodes them.

    ``rows[key]``: dicts with ``prompt`` and ``answer`` (the answer tokens are the task-loss targets) or ``text``.
    """

    rows: dict[str, list[dict[str, Any]]]
    tokenizer: Any
    seq_len: int = 64
    terminator: str = "\n"

    def rows_for(self, key: str) -> list[dict[str, Any]]:
        for cand in key_candidates(key):
            if cand in self.rows:
                return self.rows[cand]
        raise ConfigError(
            f"no calibration data for model {key!r} (calibration has: {', '.join(sorted(self.rows)) or 'nothing'})"
        )

    def add_union(self, key: str, sources: Sequence[str]) -> None:
        """Rows for ``key`` (a merged model): the rows of ``sources`` (its ancestors' tasks) interleaved, so the
        first calibration tokens already cover every source."""
        if not sources:
            raise ConfigError(f"model {key!r}: no calibration sources given")
        self.rows[key] = interleave_rows([self.rows_for(s) for s in sources])

    def content_hash(self, keys: Sequence[str] | None = None) -> str:
        """A hash of the rows (of ``keys`` only, when given: adding another model's rows keeps it)."""
        rows = self.rows if keys is None else {k: self.rows_for(k) for k in keys}
        blob = json.dumps({"rows": rows, "seq_len": self.seq_len, "term": self.terminator,
                           "vocab": len(self.tokenizer)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _text(self, row: Mapping[str, Any]) -> str:
        if "prompt" in row:
            return f"{row['prompt']}{row.get('answer', '')}{self.terminator}"
        return f"{row['text']}{self.terminator}"

    def token_batches(self, key: str, max_tokens: int = 512) -> list[Tensor]:
        """Up to ``max_tokens`` tokens of the model's task rows, packed into (n, seq_len) id batches."""
        if max_tokens <= 0:
            raise ConfigError(f"calibration_tokens must be positive, got {max_tokens}")
        ids: list[int] = []
        for row in self.rows_for(key):
            ids.extend(self.tokenizer(self._text(row), add_special_tokens=False)["input_ids"])
            if len(ids) >= max_tokens:
                break
        ids = ids[:max_tokens]
        if not ids:
            raise ConfigError(f"calibration data for model {key!r} encodes to no tokens")
        full = len(ids) // self.seq_len * self.seq_len
        out = []
        if full:
            out.append(torch.tensor(ids[:full], dtype=torch.long).view(-1, self.seq_len))
        if full < len(ids):
            out.append(torch.tensor(ids[full:], dtype=torch.long).view(1, -1))
        return out

    def loss_batch(self, key: str, n_examples: int = 16) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids, attention_mask, labels) of the first ``n_examples`` rows; labels only on answer tokens."""
        rows = self.rows_for(key)[:n_examples]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        seqs: list[tuple[list[int], int]] = []
        for row in rows:
            if "prompt" in row:
                p = self.tokenizer(str(row["prompt"]), add_special_tokens=False)["input_ids"]
                a = self.tokenizer(str(row["answer"]) + self.terminator, add_special_tokens=False)["input_ids"]
                seqs.append((p + a, len(p)))
            else:
                ids = self.tokenizer(self._text(row), add_special_tokens=False)["input_ids"]
                seqs.append((ids, 0))
        if not seqs:
            raise ConfigError(f"calibration data for model {key!r} has no rows")
        width = max(len(s) for s, _ in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for r, (ids, n_prompt) in enumerate(seqs):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
            labels[r, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        return input_ids, mask, labels


def interleave_rows(sources: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Round-robin over ``sources``: a0, b0, a1, b1, ... (the longer ones continue alone)."""
    out: list[dict[str, Any]] = []
    for i in range(max((len(s) for s in sources), default=0)):
        out.extend(s[i] for s in sources if i < len(s))
    return out
