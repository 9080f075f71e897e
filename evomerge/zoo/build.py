"""The built-in demo zoo: a small Llama-shaped base and skill specialists, trained on CPU, cached by content.

``build_zoo(out_dir, size, seed)`` pre-trains a character-level base on filler prose plus a little addition and
reversal (skills it then half-knows), fine-tunes one specialist per skill (short fine-tunes, so task vectors
stay compatible), writes per-skill jsonl splits (search and a disjoint held-out test), lm-eval task YAMLs and
FitnessSpec files, and a table of base / specialists / merges on every skill (``zoo_table.md``).
``ensure_zoo(size, seed)`` builds once into ``$EVOMERGE_CACHE`` (default ``~/.cache/evomerge``) under a hash
of the build settings and this code, atomically, so later calls are instant and interrupted builds leave
nothing. ``zoo:SIZE/REST`` paths (:func:`evomerge.paths.resolve_path`) resolve through :func:`resolve`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from evomerge.atomic import atomic_output_dir
from evomerge.errors import ConfigError
from evomerge.fitness import builtin
from evomerge.merge.methods.registry import get_method
from evomerge.paths import cache_root
from evomerge.zoo import skills as skills_module
from evomerge.zoo.skills import (
    SKILL_SETS,
    SKILLS,
    TERMINATOR,
    Skill,
    build_char_tokenizer,
    skill_splits,
    text_line,
)

ZOO_FORMAT = 1
SPECIALISTS: tuple[str, ...] = tuple(s.name for s in SKILLS)
MODEL_NAMES: tuple[str, ...] = ("base", *SPECIALISTS)


@dataclass(frozen=True)
class ZooSize:
    """Everything that shapes a zoo build (part of the cache key)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    seq_len: int
    skill_fraction: float  # share of pre-training lines that are examples of the half-known skills
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    n_search: int
    n_test: int
    ta_lambda: float
    ties_density: float
    ties_lambda: float
    skill_set: str = "demo"  # which skills (zoo.skills.SKILL_SETS): "hard" = the base never sees sort

    @property
    def skills(self) -> tuple[Skill, ...]:
        return SKILL_SETS[self.skill_set]


SIZES: dict[str, ZooSize] = {
    "micro": ZooSize(hidden=64, layers=2, heads=4, intermediate=192, pretrain_steps=200, pretrain_batch=16,
                     pretrain_lr=4e-3, seq_len=48, skill_fraction=0.3, finetune_steps=80, finetune_batch=32,
                     finetune_lr=3e-3, n_search=64, n_test=64, ta_lambda=0.6, ties_density=0.3,
                     ties_lambda=1.0),
    "demo": ZooSize(hidden=128, layers=4, heads=4, intermediate=384, pretrain_steps=700, pretrain_batch=32,
                    pretrain_lr=3e-3, seq_len=48, skill_fraction=0.3, finetune_steps=200, finetune_batch=32,
                    finetune_lr=1e-3, n_search=200, n_test=200, ta_lambda=0.6, ties_density=0.3,
                    ties_lambda=1.0),
    # the hard zoo: smaller (3 layers of 96) and cheaper to score (100 search items per task), the base
    # half-knows add, rev and enc and never sees sort (zoo.skills.HARD_SKILLS)
    "hard": ZooSize(hidden=96, layers=3, heads=4, intermediate=288, pretrain_steps=700, pretrain_batch=32,
                    pretrain_lr=3e-3, seq_len=48, skill_fraction=0.3, finetune_steps=200, finetune_batch=32,
                    finetune_lr=1e-3, n_search=100, n_test=200, ta_lambda=0.6, ties_density=0.3,
                    ties_lambda=1.0, skill_set="hard"),
}


def _log(msg: str) -> None:
    print(f"[zoo] {msg}", file=sys.stderr, flush=True)


def _code_version() -> str:
    """Hash of the source files that decide what a build produces (so code changes invalidate the cache)."""
    h = hashlib.sha256()
    for path in (Path(__file__), Path(skills_module.__file__), Path(builtin.__file__)):
        h.update(path.resolve().read_bytes())
    return h.hexdigest()[:16]


def zoo_key(size: str, seed: int) -> str:
    """Content hash of the build settings and the code version."""
    cfg = _size(size)
    blob = json.dumps({"format": ZOO_FORMAT, "size": size, "seed": seed, "cfg": asdict(cfg),
                       "code": _code_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _size(size: str) -> ZooSize:
    if size not in SIZES:
        raise ConfigError(f"unknown zoo size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size]


# ----------------------------------------------------------------------------------------------- training


def _new_model(cfg: ZooSize, vocab_size: int, tokenizer: Any, seed: int) -> torch.nn.Module:

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.05,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Character-level encoding by vocabulary lookup (same ids as the tokenizer, no length warning)."""
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    return [vocab.get(c, unk) for c in text]


def _train(model: torch.nn.Module, next_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], steps: int,
           lr: float, seed: int, label: str) -> float:
    """AdamW with linear warm-up and cosine decay; prints a progress line with rate and ETA."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    t0 = time.perf_counter()
    every = max(1, steps // 5)
    ema = float("nan")
    for step in range(steps):
        ids, labels = next_batch(step)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        val = float(loss.detach())
        ema = val if math.isnan(ema) else 0.9 * ema + 0.1 * val
        if (step + 1) % every == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            rate = (step + 1) / el
            _log(f"{label}: step {step + 1}/{steps} loss {ema:.3f} ({rate:.1f} it/s, eta {(steps - step - 1) / rate:.0f}s)")
    model.eval()
    return ema


def _pretrain_stream(cfg: ZooSize, tokenizer: Any, seed: int, train_rows: dict[str, list[dict[str, str]]]
                     ) -> torch.Tensor:
    """Token stream of prose lines with a small share of half-known skill examples."""
    rng = random.Random(f"{seed}:pretrain")
    half_known = [s.name for s in cfg.skills if s.in_pretraining]
    need = cfg.pretrain_steps * cfg.pretrain_batch * cfg.seq_len + cfg.seq_len + 1
    parts: list[str] = []
    total = 0
    cursor = dict.fromkeys(half_known, 0)
    while total < need:
        if rng.random() < cfg.skill_fraction:
            name = rng.choice(half_known)
            rows = train_rows[name]
            row = rows[cursor[name] % len(rows)]
            cursor[name] += 1
            line = row["prompt"] + row["answer"]
        else:
            line = text_line(rng)
        parts.append(line + TERMINATOR)
        total += len(line) + 1
    return torch.tensor(_encode(tokenizer, "".join(parts)), dtype=torch.long)


def _pretrain(model: torch.nn.Module, cfg: ZooSize, stream: torch.Tensor, seed: int) -> float:
    n = cfg.pretrain_batch * cfg.seq_len

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = stream[step * n: step * n + n].view(cfg.pretrain_batch, cfg.seq_len)
        return ids, ids

    return _train(model, batch, cfg.pretrain_steps, cfg.pretrain_lr, seed, "pretrain base")


def _finetune(model: torch.nn.Module, cfg: ZooSize, tokenizer: Any, rows: list[dict[str, str]], seed: int,
              label: str, steps: int | None = None) -> float:
    """Fine-tune on prompt+answer rows with the loss on the answer (and terminator) only."""
    pad = tokenizer.pad_token_id
    enc = [(_encode(tokenizer, r["prompt"]), _encode(tokenizer, r["answer"] + TERMINATOR)) for r in rows]

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = [enc[(step * cfg.finetune_batch + i) % len(enc)] for i in range(cfg.finetune_batch)]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (p, a) in enumerate(chunk):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            labels[r, len(p):len(p) + len(a)] = torch.tensor(a)
        return ids, labels

    return _train(model, batch, steps or cfg.finetune_steps, cfg.finetune_lr, seed, label)


# ----------------------------------------------------------------------------------------------- merges


def _task_vectors(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]]
                  ) -> list[dict[str, torch.Tensor]]:
    return [{k: m[k].float() - base[k].float() for k in base} for m in models]


def merge_uniform(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Model soup: the plain mean of the specialists' weights."""
    return {k: torch.stack([m[k].float() for m in models]).mean(0) for k in base}


def merge_task_arithmetic(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], lam: float
                          ) -> dict[str, torch.Tensor]:
    """theta_0 + lam * sum_t tau_t."""
    tvs = _task_vectors(base, models)
    return {k: base[k].float() + lam * sum(tv[k] for tv in tvs) for k in base}


def merge_ties(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], density: float, lam: float
               ) -> dict[str, torch.Tensor]:
    """TIES with per-tensor trim through the merge registry's kernel (the zoo table's TIES row)."""
    method = get_method("ties")
    options = method.default_options()
    tvs = _task_vectors(base, models)
    out: dict[str, torch.Tensor] = {}
    for k in base:
        b = base[k].float()
        out[k] = method.fn(b, [b + tv[k] for tv in tvs], [{"weight": 1.0, "density": density}] * len(tvs),
                           {"lambda": lam}, dict(options), None).float()
    return out


# ----------------------------------------------------------------------------------------------- files


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def lm_eval_task_name(skill: str, split: str) -> str:
    return f"evozoo_{skill}_{split}"


def _write_lm_eval_yaml(path: Path, skill: str, split: str, data_file: Path, max_gen_toks: int) -> None:
    """A generate_until exact-match task over the local jsonl (absolute path; lm-eval resolves from cwd)."""

    doc = {
        "task": lm_eval_task_name(skill, split),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": [TERMINATOR], "max_gen_toks": max_gen_toks, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def _write_specs(root: Path, final: Path, size: str) -> None:
    """FitnessSpec files: built-in exact match (fast) and lm-eval custom YAML tasks, both with absolute paths."""

    builtin_spec = {
        "batch_size": 64,
        "tasks": [{"name": s, "jsonl": {"search": str(final / "data" / s / "search.jsonl"),
                                        "test": str(final / "data" / s / "test.jsonl")},
                   "metric": "exact_match"} for s in SPECIALISTS],
    }
    lm_spec = {
        "batch_size": 64,
        "max_gen_toks": 10,
        "tasks": [{"name": s, "lm_eval_yaml": {"search": str(final / "tasks" / f"{lm_eval_task_name(s, 'search')}.yaml"),
                                               "test": str(final / "tasks" / f"{lm_eval_task_name(s, 'test')}.yaml")},
                   "metric": "exact_match,none"} for s in SPECIALISTS],
    }
    (root / "fitness.yaml").write_text(f"# built-in fitness for the {size} zoo\n" + yaml.safe_dump(builtin_spec, sort_keys=False))
    (root / "fitness_lmeval.yaml").write_text(f"# lm-eval fitness for the {size} zoo\n" + yaml.safe_dump(lm_spec, sort_keys=False))


# ----------------------------------------------------------------------------------------------- table


def score_model(model: torch.nn.Module, encoded: dict[str, Any], tables: dict[str, dict[str, dict[str, float]]],
                label: str) -> None:
    """Score ``model`` on every skill's encoded test rows into ``tables[metric][label][skill]``."""
    model.eval()
    for metric in tables:
        tables[metric][label] = {}
    for skill, enc in encoded.items():
        scores = builtin.score_batches(model, enc)
        tables["exact match"][label][skill] = scores["exact_match"]
        tables["token accuracy"][label][skill] = scores["token_acc"]


def format_table(tables: dict[str, dict[str, dict[str, float]]], skills: list[str]) -> str:
    """Markdown table; each cell shows every metric given (e.g. exact match / token accuracy)."""
    metrics = list(tables)
    rows = list(tables[metrics[0]])
    head = "| model | " + " | ".join(skills) + " | mean |"
    lines = [f"cells: {' / '.join(metrics)} on the held-out test split", "", head,
             "|" + "---|" * (len(skills) + 2)]
    for r in rows:
        cells = []
        for s in [*skills, "mean"]:
            vals = []
            for m in metrics:
                v = (sum(tables[m][r].values()) / len(skills)) if s == "mean" else tables[m][r][s]
                vals.append(f"{v:.3f}")
            cells.append(" / ".join(vals))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- build


def build_zoo(out_dir: str | os.PathLike[str], size: str = "micro", seed: int = 0, force: bool = False,
              threads: int | None = None) -> str:
    """Train and write a zoo into ``out_dir`` (atomically); returns the markdown table it printed.

    ``threads``: torch CPU threads for the build (default ``$EVOMERGE_ZOO_THREADS`` or 1). These models are
    tiny: a second thread gains little, and on a shared machine two threads waiting on each other at every op
    were measured 16x slower than one (0.26 vs 4.2 training steps/s on the demo model).
    """

    cfg = _size(size)
    target = Path(out_dir)
    if target.exists() and not force:
        raise ConfigError(f"zoo folder {target} already exists; pass --force to rebuild it")
    if threads is None:
        threads = int(os.environ.get("EVOMERGE_ZOO_THREADS", "1") or 1)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        with _sigterm_as_exit():
            return _build_atomic(target, cfg, size, seed, force)
    finally:
        torch.set_num_threads(old_threads)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit during a build so the temporary folder is removed (main thread only)."""

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _build_atomic(target: Path, cfg: ZooSize, size: str, seed: int, force: bool) -> str:

    torch_threads = torch.get_num_threads()
    t_start = time.perf_counter()
    with atomic_output_dir(target, overwrite=force) as tmp:
        table = _build_into(tmp, cfg, size, seed)
        (tmp / "zoo.json").write_text(json.dumps({
            "size": size, "seed": seed, "key": zoo_key(size, seed), "settings": asdict(cfg),
            "skills": {s.name: {"description": s.description, "in_pretraining": s.in_pretraining} for s in cfg.skills},
            "models": list(MODEL_NAMES), "build_seconds": round(time.perf_counter() - t_start, 1),
            "torch_threads": torch_threads,
        }, indent=2, sort_keys=True) + "\n")
        _write_task_files(tmp, target.resolve(), size)
    _log(f"built {size} zoo in {time.perf_counter() - t_start:.1f}s -> {target}")
    return table


def _write_task_files(tmp: Path, final: Path, size: str) -> None:
    """lm-eval YAMLs and FitnessSpec files naming the final folder (``tmp`` is renamed to it afterwards)."""
    for skill in SPECIALISTS:
        for split in ("search", "test"):
            _write_lm_eval_yaml(tmp / "tasks" / f"{lm_eval_task_name(skill, split)}.yaml", skill, split,
                                final / "data" / skill / f"{split}.jsonl", max_gen_toks=10)
    _write_specs(tmp, final, size)


def _build_into(root: Path, cfg: ZooSize, size: str, seed: int) -> str:
    skills = cfg.skills
    tokenizer = build_char_tokenizer()
    vocab = len(tokenizer)
    steps = {s.name: max(1, int(round(cfg.finetune_steps * s.finetune_scale))) for s in skills}
    splits = {s.name: skill_splits(s, cfg.n_search, cfg.n_test, seed, n_train=steps[s.name] * cfg.finetune_batch)
              for s in skills}
    for s in skills:
        for split in ("search", "test"):
            _write_jsonl(root / "data" / s.name / f"{split}.jsonl", splits[s.name][split])
    (root / "tasks").mkdir(exist_ok=True)
    train_rows = {name: sp["train"] for name, sp in splits.items()}

    _log(f"size={size} seed={seed}: Llama {cfg.layers}x{cfg.hidden}, vocab {vocab}, "
         f"{cfg.pretrain_steps} pre-training steps, {cfg.finetune_steps} fine-tuning steps x {len(skills)} skills")
    base = _new_model(cfg, vocab, tokenizer, seed)
    stream = _pretrain_stream(cfg, tokenizer, seed, train_rows)
    _pretrain(base, cfg, stream, seed)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    _save(base, tokenizer, root / "base")

    spec_states: list[dict[str, torch.Tensor]] = []
    for i, s in enumerate(skills):
        model = _new_model(cfg, vocab, tokenizer, seed)
        model.load_state_dict(base_state)
        _finetune(model, cfg, tokenizer, train_rows[s.name], seed + 1 + i, f"fine-tune {s.name}", steps[s.name])
        spec_states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        _save(model, tokenizer, root / s.name)
        del model

    _log("scoring base, specialists and merges on the held-out test split")
    merges = {
        "uniform average": merge_uniform(base_state, spec_states),
        f"task arithmetic (lambda={cfg.ta_lambda})": merge_task_arithmetic(base_state, spec_states, cfg.ta_lambda),
        f"TIES (density={cfg.ties_density}, lambda={cfg.ties_lambda})": merge_ties(
            base_state, spec_states, cfg.ties_density, cfg.ties_lambda),
    }
    probe = _new_model(cfg, vocab, tokenizer, seed)
    test = {s.name: splits[s.name]["test"] for s in skills}
    encoded = {name: builtin.encode_rows(tokenizer, rows, 64) for name, rows in test.items()}
    tables: dict[str, dict[str, dict[str, float]]] = {"exact match": {}, "token accuracy": {}}
    states = {"base": base_state, **{f"specialist {s.name}": st for s, st in zip(skills, spec_states)}, **merges}
    for name, state in states.items():
        probe.load_state_dict(state)
        score_model(probe, encoded, tables, name)
    md = format_table(tables, list(SPECIALISTS))
    notes = "\n".join(f"- `{s.name}`: {s.description}" for s in skills)
    kernel = "the merge registry's 'ties' kernel, per-tensor trim"
    merges_note = (f"Merges: uniform average = mean of the {len(skills)} specialists' weights; task arithmetic = "
                   f"base + lambda * sum of task vectors; TIES = trim to the top density of each task vector, "
                   f"elect signs, disjoint mean, base + lambda * result ({kernel}).")
    text = f"# evomerge demo zoo ({size}, seed {seed})\n\n{notes}\n\n{md}\n{merges_note}\n"
    (root / "zoo_table.md").write_text(text, encoding="utf-8")
    (root / "zoo_table.json").write_text(json.dumps(tables, indent=2, sort_keys=True) + "\n")
    print(text, flush=True)
    return text


def _save(model: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------------------------- cache


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent processes wait for one build instead of training twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def zoo_dir(size: str, seed: int = 0) -> Path:
    """Where ``ensure_zoo`` keeps this zoo (whether or not it is built yet)."""
    return cache_root() / "zoo" / f"{size}-seed{seed}-{zoo_key(size, seed)}"


def ensure_zoo(size: str = "micro", seed: int = 0) -> Path:
    """The cached zoo folder, building it first if needed (instant when cached)."""
    target = zoo_dir(size, seed)
    if (target / "zoo.json").is_file():
        return target
    with _lock(target.parent / f".{target.name}.lock"):
        if (target / "zoo.json").is_file():
            return target
        for stale in target.parent.glob(f".{target.name}.*.partial"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        # build into a temporary sibling; atomic_output_dir renames it into place only when complete
        build_zoo(target, size=size, seed=seed, force=target.exists())
    return target


def resolve(rest: str) -> Path:
    """``SIZE/REST`` (optionally ``SIZE@SEED/REST``) -> that path inside the cached zoo, built first if needed."""
    text = f"zoo:{rest}"
    head, _, tail = rest.partition("/")
    size, _, seed_text = head.partition("@")
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        raise ConfigError(f"bad zoo path {text!r}: seed {seed_text!r} is not an integer") from None
    if size not in SIZES:
        raise ConfigError(f"bad zoo path {text!r}: unknown size {size!r} (known: {', '.join(SIZES)})")
    root = ensure_zoo(size, seed)
    out = root / tail if tail else root
    if not out.exists():
        raise ConfigError(f"zoo path {text!r} does not exist (looked for {out})")
    return out
