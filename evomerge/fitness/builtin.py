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


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]], batch_size: int, terminator: str = "\n",
                pad_id: int | None = None) -> list[EncodedBatch]:
    """Tokenize once: prompt ids + answer ids (+ terminator); only answer positions are scored."""
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs: list[tuple[list[int], int]] = []  # (ids, number of leading unscored tokens)
    for row in rows:
        if "text" in row and "answer" not in row:
            ids = tokenizer(str(row["text"]), add_special_tokens=False)["input_ids"]
            if len(ids) < 2:
                continue
            seqs.append((ids, 1))
        else:
            p = tokenizer(str(row["prompt"]), add_special_tokens=False)["input_ids"]
            a = tokenizer(str(row["answer"]) + terminator, add_special_tokens=False)["input_ids"]
            if not p:
                p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id]
            seqs.append((p + a, len(p)))
    batches: list[EncodedBatch] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids_t = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width - 1), dtype=torch.float32)
        for r, (ids, n_prompt) in enumerate(chunk):
            ids_t[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            # position j predicts token j+1: scored positions are n_prompt-1 .. len(ids)-2
            mask[r, n_prompt - 1:len(ids) - 1] = 1.0
        batches.append(EncodedBatch(ids_t, mask))
    return batches


@torch.no_grad()
def score_batches(model: torch.nn.Module, batches: list[EncodedBatch], device: str | torch.device = "cpu"
                  ) -> dict[str, float]:
    """All built-in metrics over pre-encoded batches; raises NonFiniteOutput on NaN/inf logits.

    exact_match: fraction of rows whose every scored token is the arg-max; token_acc: fraction of scored
    tokens that are the arg-max; loglik: mean per-token log-probability of the scored tokens; perplexity:
    exp(-loglik).
    """
    n_rows = 0
    n_exact = 0.0
    n_tok = 0.0
    n_correct = 0.0
    sum_logp = 0.0
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
        n_exact += float((correct.sum(dim=1) == per_row_tok).float().sum())
        n_correct += float(correct.sum())
        n_tok += float(per_row_tok.sum())
        sum_logp += float((logp * mask).sum())
        n_rows += ids.shape[0]
    if n_tok == 0:
        raise ConfigError("no scored tokens in the fitness data")
    loglik = sum_logp / n_tok
    if not math.isfinite(loglik):
        raise NonFiniteOutput(f"non-finite log-likelihood {loglik}")
    return {
        "exact_match": n_exact / n_rows,
        "token_acc": n_correct / n_tok,
        "loglik": loglik,
        "perplexity": math.exp(min(-loglik, 700.0)),
    }
