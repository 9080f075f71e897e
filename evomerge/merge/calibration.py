"""Calibration data and activation statistics for data-aware merges (qp, apl, mergeability analyses).

- :class:`CalibrationSet`: a few task examples per model (prompt/answer or text rows), tokenized on demand
  into packed token batches (for Grams) or labelled batches (for task losses).
- :func:`collect_grams`: forward hooks on every ``nn.Linear`` accumulating the input Gram ``X X^T``.
- :func:`sequential_grams`: the sequential layer-wise mode of the QP merge (reconstruction of seed d):
  linears are visited in forward order, grouped by shared input (q/k/v, gate/up); each group's Grams are
  collected on a model whose earlier groups are ALREADY MERGED, then the group is solved and written in.
  Non-linear tensors are merged first with the fallback method.
- :func:`merge_in_memory`: a plain in-memory merge of state dicts through the registry (the reference path
  used by analyses and tests; the streaming/resident engines are ``engine.py``/``resident.py``).

Model keys: a calibration set is looked up by the model key, then by the key's last path component
(``zoo:demo/add`` -> ``add``), so a fitness spec's task names match the demo zoo's model folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.recipe import Recipe

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


# ------------------------------------------------------------------------------------------ calibration set


def _key_candidates(key: str) -> list[str]:
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
        for cand in _key_candidates(key):
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


def _read_rows(path: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    from evomerge.fitness.builtin import read_jsonl

    return read_jsonl(_resolve(path), limit=limit)


def _resolve(path: str | os.PathLike[str]) -> Path:
    text = os.fspath(path)
    if text.startswith("zoo:"):
        from evomerge.fitness.zoo import resolve_path

        return resolve_path(text)
    return Path(text).expanduser()


def calibration_from_jsonl(paths: Mapping[str, str | os.PathLike[str]], tokenizer: Any, limit: int | None = 200,
                           seq_len: int = 64) -> CalibrationSet:
    """One jsonl file (prompt/answer or text rows) per model key."""
    return CalibrationSet({k: _read_rows(p, limit) for k, p in paths.items()}, tokenizer, seq_len)


def calibration_from_spec(spec: Any, tokenizer: Any, split: str = "search", limit: int | None = 200,
                          task_of_model: Mapping[str, str] | None = None, seq_len: int = 64) -> CalibrationSet:
    """Rows of a FitnessSpec's jsonl tasks, keyed by task name (or by model key via ``task_of_model``)."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for task in spec.tasks:
        if task.kind != "jsonl":
            continue
        by_task[str(task.name)] = _read_rows(task.source(split), limit)
    if not by_task:
        raise ConfigError("calibration needs jsonl tasks in the fitness spec (lm-eval tasks carry no local rows)")
    rows = dict(by_task)
    for model, task in (task_of_model or {}).items():
        if task not in by_task:
            raise ConfigError(f"model {model!r}: task {task!r} is not a jsonl task of the fitness spec "
                              f"(known: {', '.join(sorted(by_task))})")
        rows[model] = by_task[task]
    return CalibrationSet(rows, tokenizer, seq_len, getattr(spec, "terminator", "\n"))


def calibration_for_models(spec: Any, tokenizer: Any, model_tasks: Mapping[str, Sequence[str]],
                           split: str = "search", limit: int | None = 200) -> CalibrationSet:
    """The fitness spec's task rows with each model of ``model_tasks`` (a key or a folder) given the rows of its
    tasks, interleaved: what a search's worker gives the same models."""
    calib = calibration_from_spec(spec, tokenizer, split, limit)
    for key, tasks in model_tasks.items():
        calib.add_union(str(key), list(tasks))
    return calib


def calibration_file_data(spec: Any, model_tasks: Mapping[str, Sequence[str]], split: str = "search",
                          limit: int | None = 200, seq_len: int = 64) -> dict[str, Any]:
    """The long-form calibration file (see :func:`calibration_from_file`) that gives each model of
    ``model_tasks`` the rows a search's worker gave it (:func:`calibration_from_spec` + ``add_union``), so an
    exported data-aware recipe rebuilds with ``evomerge merge`` alone."""
    sources = {str(t.name): t.source(split) for t in spec.tasks if t.kind == "jsonl"}
    models: dict[str, list[str]] = {}
    for key, tasks in model_tasks.items():
        missing = [t for t in tasks if t not in sources]
        if missing or not tasks:
            raise ConfigError(f"model {key!r}: task(s) {missing or list(tasks)} are not jsonl tasks of the fitness "
                              f"spec (known: {', '.join(sorted(sources))})")
        models[str(key)] = [str(_resolve(sources[t]).resolve()) for t in tasks]
    return {"terminator": str(getattr(spec, "terminator", "\n")), "seq_len": seq_len, "limit": limit,
            "models": models}


def calibration_from_file(path: str | os.PathLike[str], tokenizer: Any, limit: int | None = 200) -> CalibrationSet:
    """A calibration file: a FitnessSpec (has ``tasks``; search split) or a mapping ``model key: jsonl path``
    (or a list of paths, interleaved: the rows of a merged model's ancestors' tasks)."""
    import yaml

    p = _resolve(path)
    if not p.is_file():
        raise ConfigError(f"calibration file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({exc})") from None
    if isinstance(data, dict) and ("tasks" in data or "fitness" in data):
        from evomerge.fitness.spec import FitnessSpec

        return calibration_from_spec(FitnessSpec.from_yaml(p), tokenizer, "search", limit)
    def files(value: Any) -> list[str] | None:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            return None
        return [v if v.startswith("zoo:") or Path(v).is_absolute() else str(p.parent / v) for v in items]

    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a fitness spec or a mapping of model keys to jsonl files")
    settings: dict[str, Any] = {}
    if isinstance(data.get("models"), dict):  # the long form: models + how rows are encoded
        settings = {k: v for k, v in data.items() if k != "models"}
        unknown = sorted(set(settings) - {"terminator", "seq_len", "limit"})
        if unknown:
            raise ConfigError(f"{p}: unknown key(s) {unknown} (known: models, terminator, seq_len, limit)")
        data = data["models"]
    rows: dict[str, list[dict[str, Any]]] = {}
    for k, v in data.items():
        listed = files(v)
        if listed is None:
            raise ConfigError(f"{p}: model {k!r}: expected a jsonl file or a list of them, got {v!r}")
        rows[str(k)] = interleave_rows([_read_rows(f, settings.get("limit", limit)) for f in listed])
    return CalibrationSet(rows, tokenizer, int(settings.get("seq_len", 64)), str(settings.get("terminator", "\n")))


# ------------------------------------------------------------------------------------------ models


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    p = _resolve(path)
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer from {p}: {exc}") from None


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.nn.Module:
    """A causal LM in float32 (weights loaded offline, no remote code), in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    p = _resolve(path)
    # a search loads merged parents many times: no "Loading weights" bar each time (restored afterwards)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load model {p}: {exc}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def model_state(model: torch.nn.Module) -> StateDict:
    """Detached copy of the parameters (tied duplicates appear under each name)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


MAX_CACHED = 8  # model states / Gram sets a prepare cache keeps (a population run meets many merged parents)


def lru_get(cache: dict[str, Any], section: str, key: Any, make: Callable[[], Any], limit: int = MAX_CACHED) -> Any:
    """``cache[section][key]``, made on a miss; the least recently used entries beyond ``limit`` are dropped."""
    from collections import OrderedDict

    entries = cache.setdefault(section, OrderedDict())
    if key in entries:
        entries.move_to_end(key)
        return entries[key]
    value = entries[key] = make()
    while len(entries) > limit:
        entries.popitem(last=False)
    return value


def cached_state(cache: dict[str, Any], path: str | os.PathLike[str]) -> StateDict:
    """Load a model's state once per ``cache`` (the prepare context's cross-recipe cache; bounded LRU)."""
    return lru_get(cache, "states", str(_resolve(path)), lambda: model_state(load_model(path)))


def layer_info(config: Mapping[str, Any] | Any) -> Callable[[str], tuple[int | None, str | None, int]]:
    """name -> (layer index, kind, number of layers): the models package's LayerMap when present, else a regex."""
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    try:
        try:
            from evomerge.models.layers import LayerMap
        except ImportError:
            from evomerge.models import LayerMap  # type: ignore[attr-defined,no-redef]

        lm = LayerMap.from_config(dict(cfg))
        return lambda name: (lm.layer_of(name), lm.kind_of(name), int(lm.num_layers))
    except Exception:  # noqa: BLE001 - models package not available yet, or an unknown family
        n = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
        pat = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")

        def info(name: str) -> tuple[int | None, str | None, int]:
            m = pat.search(name)
            layer = int(m.group(1)) if m else None
            low = name.lower()
            if "embed" in low or "wte" in low or "wpe" in low:
                kind = "embedding"
            elif "lm_head" in low:
                kind = "head"
            elif "norm" in low or "ln_" in low:
                kind = "norm"
            elif "attn" in low or "attention" in low:
                kind = "attention"
            elif "mlp" in low:
                kind = "mlp"
            else:
                kind = "other"
            return layer, kind, n

        return info


# ------------------------------------------------------------------------------------------ grams


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Weight tensor name -> ``nn.Linear`` module (tied lm_head included under its own name)."""
    return {f"{name}.weight": mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


class _StopForward(Exception):
    pass


def collect_grams(
    model: torch.nn.Module,
    batches: Iterable[Tensor],
    names: Sequence[str] | None = None,
    normalize: str = "mean",
    stop_after: bool = False,
) -> dict[str, Tensor]:
    """Input Gram ``X^T X`` (float64, (in, in)) of each hooked ``nn.Linear`` over every token of ``batches``.

    ``normalize``: ``mean`` divides by the token count (each task weighs the same), ``sum`` keeps the sum.
    ``stop_after``: abort each forward pass once every hooked module has fired (sequential mode).
    Modules sharing one input tensor (q/k/v) share one accumulated Gram object.
    """
    if normalize not in ("mean", "sum"):
        raise ValueError(f"gram_normalize must be mean or sum, got {normalize!r}")
    mods = linear_modules(model)
    wanted = list(mods) if names is None else list(names)
    missing = [n for n in wanted if n not in mods]
    if missing:
        raise ValueError(f"not nn.Linear weights: {missing}")
    grams: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    fired: set[str] = set()
    last_input: dict[int, tuple[Tensor, str]] = {}  # id -> (input kept alive, so ids are not reused, owner)
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            seen_input = last_input.get(id(x))
            owner = seen_input[1] if seen_input is not None and seen_input[0] is x else None
            if owner is not None and owner in grams and owner != name and owner in fired:
                grams[name] = grams[owner]  # same input object: share the Gram
                counts[name] = counts[owner]
            else:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                if name not in grams:
                    grams[name] = torch.zeros((flat.shape[1], flat.shape[1]), dtype=torch.float64, device=flat.device)
                    counts[name] = 0
                grams[name].addmm_(flat.T, flat)
                counts[name] += flat.shape[0]
                last_input[id(x)] = (x, name)
            fired.add(name)
            if stop_after and all(n in fired for n in wanted):
                raise _StopForward

        return hook

    for n in wanted:
        handles.append(mods[n].register_forward_pre_hook(make_hook(n)))
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for batch in batches:
                fired.clear()
                last_input.clear()
                with contextlib.suppress(_StopForward):
                    model(input_ids=batch.to(device))
    finally:
        for h in handles:
            h.remove()
    out: dict[str, Tensor] = {}
    seen: dict[int, Tensor] = {}
    for n in wanted:
        if n not in grams:
            continue
        g = grams[n]
        if id(g) not in seen:
            seen[id(g)] = g / max(1, counts[n]) if normalize == "mean" else g
        out[n] = seen[id(g)]
    return out


# ------------------------------------------------------------------------------------------ in-memory merge


def merge_in_memory(
    recipe: Recipe,
    states: Mapping[str, StateDict],
    config: Mapping[str, Any] | Any,
    prepared: Mapping[str, Mapping[str, Any]] | None = None,
    names: Iterable[str] | None = None,
) -> StateDict:
    """Merge full state dicts (keyed like the recipe's models) through the registry, tensor by tensor."""
    from evomerge.merge.registry import (
        plan_inputs,
        prepared_options,
        resolve_options,
        resolve_tensor_params,
        tensor_generator,
        validate_recipe,
    )

    method = validate_recipe(recipe)
    plan = plan_inputs(recipe, method)
    opts = resolve_options(recipe, method)
    info = layer_info(config)
    for k in [*([plan.base] if plan.base else []), *plan.models]:
        if k not in states:
            raise ConfigError(f"merge_in_memory: no state for model {k!r}")
    ref = states[plan.base] if plan.base else states[plan.models[0]]
    out: StateDict = {}
    for name in (names if names is not None else ref):
        layer, kind, n_layers = info(name)
        mp, glob = resolve_tensor_params(recipe, method, name, layer, n_layers, kind)
        gen = tensor_generator(recipe.seed, name) if method.uses_generator else None
        base = states[plan.base][name] if plan.base else None
        tensors = [states[k][name] for k in plan.models]
        merged = method.fn(base, tensors, mp, glob, {**opts, **prepared_options(prepared, name)}, gen)
        out[name] = merged.to(ref[name].dtype)
    return out


# ------------------------------------------------------------------------------------------ qp prepare


def _forward_groups(model: torch.nn.Module, batch: Tensor) -> list[list[str]]:
    """Linear weights in forward order, grouped when consecutive modules read the same input tensor."""
    mods = linear_modules(model)
    order: list[tuple[str, int]] = []
    handles = []
    keep: list[Tensor] = []  # keep inputs alive so ids are not reused within the pass

    def make(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            keep.append(args[0])
            order.append((name, id(args[0])))

        return hook

    for n, m in mods.items():
        handles.append(m.register_forward_pre_hook(make(n)))
    try:
        with torch.no_grad():
            model(input_ids=batch[:1].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    prev_id = None
    for name, ident in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and ident == prev_id:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev_id = ident
    return groups


def sequential_grams(
    recipe: Recipe,
    base_path: str | os.PathLike[str],
    states: Mapping[str, StateDict],
    batches: Sequence[Sequence[Tensor]],
    normalize: str = "mean",
    progress: bool = False,
    model: torch.nn.Module | None = None,
) -> dict[str, list[Tensor]]:
    """Grams per linear weight and model, collected with the earlier groups already merged (qp sequential).

    ``batches[t]``: calibration token batches of the t-th kernel input model. Each group is solved with the
    ``qp`` kernel exactly as the engine will solve it (same options and generator), so the engine's result
    equals the model the later groups were calibrated on. ``model``: a loaded copy of the base architecture
    to work in (reset to the base weights first; a search reuses one instead of loading the base per candidate).
    """
    from evomerge.merge.qp import qp as qp_kernel
    from evomerge.merge.registry import (
        get_method,
        plan_inputs,
        resolve_options,
        resolve_tensor_params,
        tensor_generator,
    )

    method = get_method(recipe.method)
    plan = plan_inputs(recipe, method)
    opts = resolve_options(recipe, method)
    base_state = states[str(plan.base)]
    if model is None:
        model = load_model(base_path)
    else:
        model.load_state_dict(base_state, strict=False)
    info = layer_info(model.config)
    mods = linear_modules(model)
    # non-linear tensors first, with the fallback (the kernel without Grams)
    non_linear = [n for n in base_state if n not in mods]
    merged = merge_in_memory(recipe, states, model.config, None, non_linear)
    model.load_state_dict(merged, strict=False)
    groups = _forward_groups(model, batches[0][0])
    params = dict(model.named_parameters())
    out: dict[str, list[Tensor]] = {}
    for gi, group in enumerate(groups):
        per_model = [collect_grams(model, batches[t], group, normalize, stop_after=True) for t in range(len(plan.models))]
        for name in group:
            grams = [pm[name] for pm in per_model]
            out[name] = grams
            layer, kind, n_layers = info(name)
            mp, glob = resolve_tensor_params(recipe, method, name, layer, n_layers, kind)
            gen = tensor_generator(recipe.seed, name) if method.uses_generator else None
            w = qp_kernel(base_state[name], [states[k][name] for k in plan.models], mp, glob,
                          {**opts, "qp_grams": grams}, gen)
            with torch.no_grad():
                params[name].copy_(w.to(params[name].dtype))
        if progress:
            print(f"[qp] sequential group {gi + 1}/{len(groups)}: {', '.join(group)}", flush=True)
    return out


def context_calibration(ctx: Any, opts: Mapping[str, Any], base_path: Any, need: str) -> CalibrationSet:
    """The rows a prepare hook works on: the caller's (a search passes its fitness data), else the file named by
    ``options.calibration`` (read once per file and kept in ``ctx.cache``)."""
    if ctx.calibration is not None:
        return ctx.calibration
    source = str(opts.get("calibration") or "")
    if not source:
        raise ConfigError(f"method {need}: set options.calibration to a fitness spec or a mapping of model keys "
                          "to jsonl files (a search passes its fitness data)")
    key = f"calib:{source}"
    if key not in ctx.cache:
        ctx.cache[key] = calibration_from_file(source, load_tokenizer(ctx.recipe.tokenizer_source or base_path))
    return ctx.cache[key]


def prepare_qp_context(ctx: Any) -> dict[str, dict[str, Any]]:
    """The ``qp`` prepare hook (see :func:`evomerge.merge.qp.prepare_qp`)."""
    from evomerge.merge.qp import QPReport
    from evomerge.merge.registry import get_method, plan_inputs, resolve_options

    recipe: Recipe = ctx.recipe
    method = get_method(recipe.method)
    plan = plan_inputs(recipe, method)
    opts = resolve_options(recipe, method)
    paths = ctx.model_paths
    if plan.base is None or plan.base not in paths:
        raise ConfigError(f"qp: no path for the base model {plan.base!r}")
    calib = context_calibration(ctx, opts, paths[plan.base], "qp needs calibration data")
    tokens = int(opts.get("calibration_tokens", 512))
    normalize = str(opts.get("gram_normalize", "mean"))
    batches = [calib.token_batches(k, tokens) for k in plan.models]
    states = {k: cached_state(ctx.cache, paths[k]) for k in [plan.base, *plan.models]}
    probe = ctx.cache.get("probe_model")
    if probe is None:
        probe = ctx.cache["probe_model"] = load_model(paths[plan.base])
    if bool(opts.get("sequential", False)):
        grams = sequential_grams(recipe, paths[plan.base], states, batches, normalize, model=probe)
    else:
        activations = str(opts.get("activations", "finetuned"))
        gk = (activations, normalize, tokens, calib.content_hash(plan.models),
              tuple(str(paths[k]) for k in [plan.base, *plan.models]))

        def collect() -> dict[str, list[Tensor]]:
            per_model = []
            for t, k in enumerate(plan.models):
                probe.load_state_dict(states[plan.base] if activations == "base" else states[k])
                per_model.append(collect_grams(probe, batches[t], normalize=normalize))
            probe.load_state_dict(states[plan.base])
            return {n: [pm[n] for pm in per_model] for n in per_model[0]}

        grams = lru_get(ctx.cache, "qp_grams", gk, collect)
    report = QPReport()
    ctx.cache["qp_report"] = report
    out: dict[str, dict[str, Any]] = {"*": {"qp_report": report}}
    for name in states[plan.base]:
        entry: dict[str, Any] = {"qp_tensor": name}
        if name in grams:
            entry["qp_grams"] = grams[name]
        out[name] = entry
    return out
