"""Built-in fitness without lm-eval: teacher-forced scoring of local jsonl examples in one forward pass.

Rows are ``{"prompt": str, "answer": str}`` (the model must continue the prompt with the answer and then the
terminator, a newline by default) or ``{"text": str}`` (plain language-model perplexity).

Why teacher forcing gives exact match: greedy decoding reproduces ``answer + terminator`` exactly iff, with the
correct prefix fed in, the arg-max token at every answer position is the correct one. So greedy exact-match
accuracy (up to arg-max ties) costs one batched forward pass instead of one pass per generated token.
Examples are tokenized and padded once per evaluator; scoring a candidate runs only forward passes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError

BUILTIN_METRICS: dict[str, bool] = {
    # name -> higher is better
    "exact_match": True,
    "token_acc": True,
    "loglik": True,
    "perplexity": False,
}


@dataclass(frozen=True)
class EncodedBatch:
    """Right-padded token ids (B, T) and a float mask (B, T-1) over the positions whose next token is scored."""

    input_ids: torch.Tensor
    target_mask: torch.Tensor


class NonFiniteOutput(RuntimeError):
    """The model produced NaN or infinite logits."""


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a jsonl file of prompt/answer or text rows; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"fitness data file {p} does not exist")
    rows: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{p}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not (
                ("prompt" in row and "answer" in row) or "text" in row
            ):
                raise ConfigError(f"{p}:{lineno}: each row needs 'prompt' and 'answer', or 'text'")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ConfigError(f"fitness data file {p} has no rows")
    return rows


@dataclass(frozen=True)
class EncodedRows:
    """Each row tokenized once: prompt + answer (+ terminator) ids and how many leading tokens are unscored.

    ``row[i]`` is the position in the file of the i-th encoded sequence (text rows under two tokens are
    skipped: they have nothing to score), so per-item results name the file's rows.
    """

    ids: tuple[tuple[int, ...], ...]
    n_prompt: tuple[int, ...]
    row: tuple[int, ...]
    pad_id: int

    @staticmethod
    def encode(tokenizer: Any, rows: list[dict[str, Any]], terminator: str = "\n",
               pad_id: int | None = None) -> EncodedRows:
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids: list[tuple[int, ...]] = []
        n_prompt: list[int] = []
        where: list[int] = []
        for r, row in enumerate(rows):
            if "text" in row and "answer" not in row:
                seq = tokenizer(str(row["text"]), add_special_tokens=False)["input_ids"]
                if len(seq) < 2:
                    continue
                ids.append(tuple(seq))
                n_prompt.append(1)
            else:
                p = tokenizer(str(row["prompt"]), add_special_tokens=False)["input_ids"]
                a = tokenizer(str(row["answer"]) + terminator, add_special_tokens=False)["input_ids"]
                if not p:
                    p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id]
                ids.append(tuple(p + a))
                n_prompt.append(len(p))
            where.append(r)
        return EncodedRows(tuple(ids), tuple(n_prompt), tuple(where), int(pad_id))

    def batches(self, batch_size: int, positions: list[int] | None = None) -> list[EncodedBatch]:
        """Padded batches of the sequences at ``positions`` (all, in order, by default)."""
        chosen = list(range(len(self.ids))) if positions is None else list(positions)
        out: list[EncodedBatch] = []
        for i in range(0, len(chosen), batch_size):
            chunk = chosen[i:i + batch_size]
            width = max(len(self.ids[j]) for j in chunk)
            ids_t = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width - 1), dtype=torch.float32)
            for r, j in enumerate(chunk):
                seq = self.ids[j]
                ids_t[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                # position k predicts token k+1: scored positions are n_prompt-1 .. len(seq)-2
                mask[r, self.n_prompt[j] - 1:len(seq) - 1] = 1.0
            out.append(EncodedBatch(ids_t, mask))
        return out


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]], batch_size: int, terminator: str = "\n",
                pad_id: int | None = None) -> list[EncodedBatch]:
    """Tokenize once: prompt ids + answer ids (+ terminator); only answer positions are scored."""
    return EncodedRows.encode(tokenizer, rows, terminator, pad_id).batches(batch_size)


@dataclass(frozen=True)
class RowStats:
    """Per-row sums of one scoring pass (the built-in metrics are weighted means of these rows)."""

    exact: torch.Tensor  # 1.0 where every scored token is the arg-max
    correct: torch.Tensor  # scored tokens that are the arg-max
    tokens: torch.Tensor  # scored tokens
    logp: torch.Tensor  # summed log-probability of the scored tokens

    def item_values(self, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-row score, per-row weight) whose weighted mean is ``metric``'s value (perplexity: its loglik)."""
        if metric == "exact_match":
            return self.exact, torch.ones_like(self.exact)
        if metric == "token_acc":
            return self.correct / self.tokens.clamp(min=1), self.tokens
        if metric in ("loglik", "perplexity"):
            return self.logp / self.tokens.clamp(min=1), self.tokens
        raise ConfigError(f"unknown built-in metric {metric!r} (known: {', '.join(BUILTIN_METRICS)})")


@torch.no_grad()
def score_rows(model: torch.nn.Module, batches: list[EncodedBatch], device: str | torch.device = "cpu"
               ) -> RowStats:
    """Per-row statistics over pre-encoded batches; raises NonFiniteOutput on NaN/inf logits."""
    exact, correct_n, tokens, logps = [], [], [], []
    for b in batches:
        ids = b.input_ids.to(device, non_blocking=True)
        mask = b.target_mask.to(device, non_blocking=True)
        # Right padding under a causal mask never changes earlier positions: no attention mask needed.
        logits = model(input_ids=ids).logits[:, :-1, :].float()
        if not torch.isfinite(logits).all():
            raise NonFiniteOutput("model produced non-finite logits")
        targets = ids[:, 1:]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        correct = (logits.argmax(dim=-1) == targets).float() * mask
        per_row_tok = mask.sum(dim=1)
        per_row_correct = correct.sum(dim=1)
        exact.append((per_row_correct == per_row_tok).float().cpu())
        correct_n.append(per_row_correct.cpu())
        tokens.append(per_row_tok.cpu())
        logps.append((logp * mask).sum(dim=1).double().cpu())
    if not batches:
        raise ConfigError("no rows to score in the fitness data")
    return RowStats(torch.cat(exact).double(), torch.cat(correct_n).double(), torch.cat(tokens).double(),
                    torch.cat(logps))


def metrics_of(stats: RowStats) -> dict[str, float]:
    """All built-in metrics of some rows.

    exact_match: fraction of rows whose every scored token is the arg-max; token_acc: fraction of scored
    tokens that are the arg-max; loglik: mean per-token log-probability of the scored tokens; perplexity:
    exp(-loglik).
    """
    n_tok = float(stats.tokens.sum())
    if n_tok == 0:
        raise ConfigError("no scored tokens in the fitness data")
    loglik = float(stats.logp.sum()) / n_tok
    if not math.isfinite(loglik):
        raise NonFiniteOutput(f"non-finite log-likelihood {loglik}")
    return {
        "exact_match": float(stats.exact.sum()) / len(stats.exact),
        "token_acc": float(stats.correct.sum()) / n_tok,
        "loglik": loglik,
        "perplexity": math.exp(min(-loglik, 700.0)),
    }


def score_batches(model: torch.nn.Module, batches: list[EncodedBatch], device: str | torch.device = "cpu"
                  ) -> dict[str, float]:
    """All built-in metrics over pre-encoded batches (see :func:`metrics_of`)."""
    return metrics_of(score_rows(model, batches, device))
