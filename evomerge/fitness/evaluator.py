"""Evaluator: scores an in-memory model on a FitnessSpec, fast enough to call thousands of times.

Built once per worker: jsonl tasks are tokenized and padded once (scoring is then pure forward passes);
lm-eval tasks get ONE TaskManager (custom YAML folders only, no scan of lm-eval's bundled tasks unless a task
names one) and task objects built once, then ``lm_eval.evaluator.evaluate`` runs on that prebuilt dict for
every candidate with an HFLM around the same model object (whose weights the search rewrites in place).
lm-eval's request cache is never used: it keys answers by prompt, so it would hand one candidate's answers to
the next. ``score`` never raises for a bad candidate: exceptions, NaN/inf outputs and out-of-memory become
``EvalResult.failure`` with the error text and the spec's penalty.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
import os
import random
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import evomerge
from evomerge.errors import ConfigError
from evomerge.fitness import builtin
from evomerge.fitness.items import MEAN_METRICS, ItemList, ItemScores, items_hash
from evomerge.fitness.result import EvalResult, TaskScore
from evomerge.fitness.spec import SPLITS, FitnessSpec, TaskSpec
from evomerge.models.hf import load_tokenizer
from evomerge.paths import resolve_path

log = logging.getLogger(__name__)


def set_offline_env() -> None:
    """lm-eval on local tasks must never try the hub (no network on CI and most clusters)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def versions() -> dict[str, str]:
    out = {"evomerge": evomerge.__version__, "torch": torch.__version__}
    try:
        out["lm_eval"] = version("lm_eval")
        out["transformers"] = version("transformers")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        pass
    return out


def _resolve_source(value: str) -> str:
    return str(resolve_path(value))


def _yaml_task_name(path: Path) -> str:
    """The ``task:`` name inside a custom lm-eval YAML (tolerating lm-eval's !function tags)."""

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    if not path.is_file():
        raise ConfigError(f"lm-eval task YAML {path} does not exist")
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    name = doc.get("task") if isinstance(doc, dict) else None
    if not isinstance(name, str):
        raise ConfigError(f"{path}: a custom lm-eval task YAML needs a 'task: NAME' entry")
    return name


def check_sources(spec: FitnessSpec, splits: Sequence[str] = SPLITS) -> None:
    """Every task's data of ``splits`` exists and reads, without a model or a tokenizer (what a search checks
    before it creates a run directory, so a broken test split is not found after the whole search): jsonl files
    have valid rows; lm-eval task YAMLs name a task and every lm-eval task name is one lm-eval knows."""
    lm_names: list[tuple[TaskSpec, str, str]] = []  # (task, split, lm-eval name)
    yaml_dirs: list[str] = []
    need_defaults = False
    for task in spec.tasks:
        for split in splits:
            source = task.source(split)
            try:
                if task.kind == "jsonl":
                    builtin.read_jsonl(_resolve_source(source), limit=spec.task_limit(task))
                elif task.kind == "lm_eval_yaml":
                    path = Path(_resolve_source(source)).resolve()
                    lm_names.append((task, split, _yaml_task_name(path)))
                    if str(path.parent) not in yaml_dirs:
                        yaml_dirs.append(str(path.parent))
                else:
                    lm_names.append((task, split, source))
                    need_defaults = True
            except ConfigError as exc:
                raise ConfigError(f"fitness task {task.name!r} ({split} split): {exc}") from None
    if not lm_names:
        return
    set_offline_env()
    import lm_eval.tasks  # noqa: F401  (TaskManager lives here and needs the explicit import)
    from lm_eval.tasks import TaskManager  # lm-eval only for fitnesses that use it

    known = set(TaskManager(include_path=yaml_dirs or None, include_defaults=need_defaults).all_tasks)
    for task, split, name in lm_names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"fitness task {task.name!r} ({split} split): lm-eval knows no task {name!r}{hint}")


@dataclass
class _BuiltinTask:
    spec: TaskSpec
    rows: builtin.EncodedRows
    batches: list[builtin.EncodedBatch]  # every row, batched once
    n_rows: int
    content: str  # items_hash of the file's rows


@dataclass
class _LmEvalGroup:
    """lm-eval tasks that share one limit, evaluated in one ``evaluate`` call."""

    limit: int | None
    loaded: dict[str, Any]
    specs: dict[str, TaskSpec]  # lm-eval task name -> spec
    frozen: bool = False  # requests built once and reused (see _freeze_requests)
    docs: dict[str, tuple[int, str]] = field(default_factory=dict)  # task name -> (documents, items_hash)
    mean_metric: dict[str, bool] = field(default_factory=dict)  # task name -> its value is a mean over documents


@dataclass
class _Prepared:
    builtin_tasks: list[_BuiltinTask] = field(default_factory=list)
    lm_groups: list[_LmEvalGroup] = field(default_factory=list)
    order: list[str] = field(default_factory=list)


class _ForwardTimer:
    """Forward hooks on the model: wall time inside forward passes and a non-finite-logits flag."""

    def __init__(self, model: torch.nn.Module, check_finite: bool) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.non_finite = False
        self._t0 = 0.0
        self._cuda = any(p.is_cuda for p in model.parameters())
        self._check = check_finite
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if self._check and isinstance(logits, torch.Tensor) and not bool(torch.isfinite(logits).all()):
            self.non_finite = True
        if self._cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class Evaluator:
    """Scores models on a FitnessSpec; build once, call ``score`` for every candidate."""

    def __init__(self, spec: FitnessSpec, tokenizer: Any, device: str | torch.device = "cpu",
                 splits: tuple[str, ...] = ("search",)) -> None:
        if not isinstance(spec, FitnessSpec):
            spec = FitnessSpec.from_dict(spec)
        self.spec = spec
        self.tokenizer = load_tokenizer(tokenizer)
        self.device = torch.device(device)
        self._prepared: dict[str, _Prepared] = {}
        self._task_manager: Any = None
        self._lm: Any = None
        self._lm_model_id: int | None = None
        self._versions = versions()
        if any(t.kind != "jsonl" for t in spec.tasks):
            set_offline_env()
        for split in splits:
            self.prepare(split)

    # -------------------------------------------------------------------------------------------- build

    def prepare(self, split: str) -> None:
        """Build the task objects of ``split`` once (raises ConfigError for a bad spec or missing data)."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if split in self._prepared:
            return
        prep = _Prepared()
        lm_tasks: list[tuple[TaskSpec, str]] = []  # (spec, lm-eval name)
        yaml_dirs: list[str] = []
        need_defaults = False
        for task in self.spec.tasks:
            prep.order.append(str(task.name))
            source = task.source(split)
            if task.kind == "jsonl":
                rows = builtin.read_jsonl(_resolve_source(source), limit=self.spec.task_limit(task))
                encoded = builtin.EncodedRows.encode(self.tokenizer, rows, self.spec.terminator)
                prep.builtin_tasks.append(_BuiltinTask(task, encoded, encoded.batches(self.spec.batch_size),
                                                       len(rows), items_hash(rows)))
            elif task.kind == "lm_eval_yaml":
                path = Path(_resolve_source(source)).resolve()
                lm_tasks.append((task, _yaml_task_name(path)))
                if str(path.parent) not in yaml_dirs:
                    yaml_dirs.append(str(path.parent))
            else:
                lm_tasks.append((task, source))
                need_defaults = True
        if lm_tasks:
            prep.lm_groups = self._build_lm_groups(lm_tasks, yaml_dirs, need_defaults)
        self._prepared[split] = prep

    def _build_lm_groups(self, lm_tasks: list[tuple[TaskSpec, str]], yaml_dirs: list[str],
                         need_defaults: bool) -> list[_LmEvalGroup]:

        set_offline_env()
        if self._task_manager is None or need_defaults or any(
                d not in (self._task_manager.include_path or []) for d in yaml_dirs):
            import lm_eval.tasks  # noqa: F401  (TaskManager lives here and needs the explicit import)
            from lm_eval.tasks import TaskManager  # lm-eval is imported only by fitnesses that use it (1.5 s)

            self._task_manager = TaskManager(include_path=yaml_dirs or None, include_defaults=need_defaults)
        by_limit: dict[int | None, list[tuple[TaskSpec, str]]] = {}
        for task, name in lm_tasks:
            by_limit.setdefault(self.spec.task_limit(task), []).append((task, name))
        groups = []
        for limit, items in by_limit.items():
            names = [n for _, n in items]
            try:
                loaded = self._task_manager.load(names)
            except Exception as exc:
                raise ConfigError(f"lm-eval cannot load task(s) {', '.join(names)}: {exc}") from None
            specs: dict[str, TaskSpec] = {}
            for task, name in items:
                fewshot = self.spec.task_fewshot(task)
                objs = [t for tn, t in loaded["tasks"].items() if tn == name or name in loaded.get("groups", {})]
                for obj in objs:
                    if obj.get_config("output_type") == "generate_until":
                        obj.set_config(key="generation_kwargs",
                                       value={"max_gen_toks": self.spec.max_gen_toks, "do_sample": False},
                                       update=True)
                    if fewshot is not None:
                        obj.set_config(key="num_fewshot", value=fewshot)
                    elif obj.get_config("num_fewshot") is None:
                        obj.set_config(key="num_fewshot", value=0)
                specs[name] = task
            group = _LmEvalGroup(limit, loaded, specs)
            for name in specs:
                obj = loaded["tasks"].get(name)
                if obj is not None:  # a single task (a group's value is not a mean of its documents)
                    docs = list(obj.eval_docs)[: limit if limit is not None else None]
                    group.docs[name] = (len(docs), items_hash(docs))
                    if specs[name].metric is not None:
                        group.mean_metric[name] = _is_mean(obj, str(specs[name].metric).split(",")[0])
            groups.append(group)
        return groups

    # -------------------------------------------------------------------------------------------- items

    def item_lists(self, split: str = "search") -> dict[str, ItemList]:
        """Each task's item list: how many items, which of them can be scored alone, its content hash."""
        self.prepare(split)
        prep = self._prepared[split]
        out: dict[str, ItemList] = {}
        for bt in prep.builtin_tasks:
            out[str(bt.spec.name)] = ItemList(bt.n_rows, bt.rows.row, bt.content,
                                              str(bt.spec.metric) in MEAN_METRICS)
        for group in prep.lm_groups:
            for name, spec in group.specs.items():
                if name in group.docs:
                    n, content = group.docs[name]
                    out[str(spec.name)] = ItemList(n, tuple(range(n)), content, group.mean_metric.get(name, False))
        return out

    # -------------------------------------------------------------------------------------------- score

    def settings(self, split: str = "search") -> dict[str, Any]:
        """Everything that decides a score, stored with it so scores are comparable and reproducible."""
        return {
            "split": split,
            "device": str(self.device),
            "batch_size": self.spec.batch_size,
            "max_gen_toks": self.spec.max_gen_toks,
            "seed": self.spec.seed,
            "penalty": self.spec.effective_penalty,
            "tasks": [
                {"name": t.name, "kind": t.kind, "source": t.source(split), "metric": t.metric,
                 "direction": t.direction, "weight": t.weight, "limit": self.spec.task_limit(t),
                 "num_fewshot": self.spec.task_fewshot(t)}
                for t in self.spec.tasks
            ],
            "versions": dict(self._versions),
        }

    def score(self, model: torch.nn.Module, split: str = "search",
              items: Mapping[str, Sequence[int]] | None = None) -> EvalResult:
        """Score ``model`` on ``split``; never raises for a bad candidate (returns a recorded failure).

        ``items``: per task, the items (positions in its item list, see :meth:`item_lists`) to score; tasks
        not named are scored on every item, a task named with no item is skipped (a racing stage that adds no
        item of it). The result carries each task's per-item outcomes.
        """
        t0 = time.perf_counter()
        settings = self.settings(split) if split in SPLITS else {"split": split}
        penalty = self.spec.effective_penalty
        timer: _ForwardTimer | None = None
        try:
            self.prepare(split)
            prep = self._prepared[split]
            was_training = model.training
            model.eval()
            timer = _ForwardTimer(model, check_finite=bool(prep.lm_groups))
            try:
                scores, per_item = self._score_prepared(model, prep, items or {})
            finally:
                timer.remove()
                if was_training:
                    model.train()
            if timer.non_finite:
                raise builtin.NonFiniteOutput("model produced non-finite logits")
            ordered = tuple(scores[name] for name in prep.order if name in scores)
            if not ordered:
                raise ConfigError("no item to score: every task was given an empty item list")
            for s in ordered:
                if not math.isfinite(s.value):
                    raise builtin.NonFiniteOutput(f"task {s.task}: non-finite {s.metric} {s.value}")
            aggregate = EvalResult.weighted_aggregate(ordered)
            return EvalResult(aggregate=aggregate, tasks=ordered, ok=True, split=split,
                              seconds=time.perf_counter() - t0, forward_seconds=timer.seconds, settings=settings,
                              items=per_item)
        except Exception as exc:  # noqa: BLE001 - a bad candidate must never crash the search
            if isinstance(exc, ConfigError) and split not in self._prepared:
                err = f"ConfigError: {exc}"
            else:
                err = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
            log.debug("evaluation failed: %s", traceback.format_exc())
            res = EvalResult.failure(err, penalty, split=split, seconds=time.perf_counter() - t0,
                                     settings=settings)
            if timer is not None:
                res = EvalResult(**{**res.__dict__, "forward_seconds": timer.seconds})
            return res

    def _score_prepared(self, model: torch.nn.Module, prep: _Prepared, items: Mapping[str, Sequence[int]]
                        ) -> tuple[dict[str, TaskScore], dict[str, ItemScores]]:
        out: dict[str, TaskScore] = {}
        per_item: dict[str, ItemScores] = {}
        with _seeded(self.spec.seed):
            for bt in prep.builtin_tasks:
                name = str(bt.spec.name)
                metric = str(bt.spec.metric)
                if name in items and not items[name]:
                    continue
                if name in items:
                    positions = _positions(bt.rows.row, items[name], name)
                    stats = builtin.score_rows(model, bt.rows.batches(self.spec.batch_size, positions), self.device)
                    rows = [bt.rows.row[i] for i in positions]
                else:
                    stats = builtin.score_rows(model, bt.batches, self.device)
                    rows = list(bt.rows.row)
                value = builtin.metrics_of(stats)[metric]
                scores, weights = stats.item_values(metric)
                per_item[name] = ItemScores.of(name, rows, scores.tolist(), weights.tolist(), bt.n_rows, bt.content)
                out[name] = TaskScore(name, metric, float(value), bt.spec.direction != "minimize", bt.spec.weight)
            for group in prep.lm_groups:
                scores_g, items_g = self._run_lm_eval(model, group, items)
                out.update(scores_g)
                per_item.update(items_g)
        return out, per_item

    def _hflm(self, model: torch.nn.Module) -> Any:
        """One HFLM per model object (the search rewrites the same object's weights in place)."""
        if self._lm is not None and self._lm_model_id == id(model) and self._lm._model is model:
            return self._lm

        from lm_eval.models.huggingface import HFLM

        self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.spec.batch_size,
                        device=str(self.device), max_length=_max_length(model))
        self._lm_model_id = id(model)
        return self._lm

    def _run_lm_eval(self, model: torch.nn.Module, group: _LmEvalGroup, items: Mapping[str, Sequence[int]]
                     ) -> tuple[dict[str, TaskScore], dict[str, ItemScores]]:
        lm = self._hflm(model)
        for obj in group.loaded["tasks"].values():
            obj.set_fewshot_seed(seed=self.spec.seed)  # the sampler's RNG advances per call: reset it
        named = {name: sorted(int(i) for i in items[str(spec.name)]) for name, spec in group.specs.items()
                 if str(spec.name) in items and name in group.docs}
        skipped = {name for name, ids in named.items() if not ids}  # lm-eval reads an empty list as "all"
        if skipped and len(skipped) == len(group.loaded["tasks"]):
            return {}, {}
        task_dict = group.loaded
        if skipped:
            if group.loaded.get("groups"):
                raise ConfigError(f"lm-eval tasks {sorted(skipped)} belong to a group: they cannot be skipped")
            task_dict = {**group.loaded, "tasks": {n: t for n, t in group.loaded["tasks"].items() if n not in skipped}}
        subsets = {name: ids for name, ids in named.items() if ids}
        if subsets and len(subsets) < len(task_dict["tasks"]):  # lm-eval takes samples for every task or none
            for name in task_dict["tasks"]:
                if name not in subsets:
                    n = group.docs[name][0] if name in group.docs else len(list(task_dict["tasks"][name].eval_docs))
                    subsets[name] = list(range(n if group.limit is None else min(n, group.limit)))
        with _quiet_lm_eval(), _compiled_templates():
            from lm_eval.evaluator import evaluate

            res = evaluate(lm=lm, task_dict=task_dict, limit=None if subsets else group.limit,
                           samples=subsets or None, cache_requests=False, bootstrap_iters=0, log_samples=True,
                           verbosity="ERROR")
        if not group.frozen and not subsets and not skipped:  # the template holds every document's requests
            for obj in group.loaded["tasks"].values():
                _freeze_requests(obj)
            group.frozen = True
        if res is None:
            raise RuntimeError("lm-eval returned no results")
        out: dict[str, TaskScore] = {}
        per_item: dict[str, ItemScores] = {}
        for name, task in group.specs.items():
            if name in skipped:
                continue
            results = res["results"].get(name)
            if results is None:
                raise RuntimeError(f"lm-eval returned no results for task {name}")
            metric_key = _pick_metric(task.metric, results, name)
            base_metric = metric_key.split(",")[0]
            if task.direction is not None:
                higher = task.direction == "maximize"
            else:
                higher = bool(res.get("higher_is_better", {}).get(name, {}).get(base_metric, True))
            out[str(task.name)] = TaskScore(str(task.name), metric_key, float(results[metric_key]), higher,
                                            task.weight)
            if name in group.docs:
                group.mean_metric.setdefault(name, _is_mean(group.loaded["tasks"][name], base_metric))
                per_doc = _document_values(res.get("samples", {}).get(name, []), metric_key)
                n, content = group.docs[name]
                index = sorted(per_doc)
                per_item[str(task.name)] = ItemScores.of(str(task.name), index, [per_doc[i] for i in index],
                                                        [1.0] * len(index), n, content)
        return out, per_item


def _positions(rows: Sequence[int], wanted: Sequence[int], task: str) -> list[int]:
    """Positions among the encoded rows of the file rows ``wanted`` (rows that cannot be scored are refused)."""
    at = {r: i for i, r in enumerate(rows)}
    missing = [int(w) for w in wanted if int(w) not in at]
    if missing:
        raise ConfigError(f"task {task}: items {missing[:5]} are not scorable rows of its data")
    return sorted(at[int(w)] for w in wanted)


def _document_values(samples: Sequence[Mapping[str, Any]], metric_key: str) -> dict[int, float]:
    """doc_id -> the document's value of ``metric`` under ``filter`` (``metric_key`` is ``metric,filter``)."""
    metric, _, filter_key = metric_key.partition(",")
    out: dict[int, float] = {}
    for s in samples:
        if filter_key and s.get("filter") not in (filter_key, None):
            continue
        value = s.get(metric)
        if isinstance(value, (int, float, bool)):
            out[int(s["doc_id"])] = float(value)
    return out


def _is_mean(task: Any, metric: str) -> bool:
    """Whether lm-eval aggregates ``metric`` of ``task`` as the mean over documents."""
    try:
        from lm_eval.api.metrics import mean

        return task.aggregation().get(metric) is mean
    except Exception:  # noqa: BLE001 - an unusual task: treat it as not itemizable
        return False


def _pick_metric(metric: str | None, results: dict[str, Any], task: str) -> str:
    """Exact key, ``metric,none``, or (when the spec names none) the first reported metric."""
    keys = [k for k in results if "_stderr" not in k and k != "alias" and isinstance(results[k], (int, float))]
    if metric is None:
        if not keys:
            raise RuntimeError(f"lm-eval task {task} reported no metric")
        return keys[0]
    for cand in (metric, f"{metric},none"):
        if cand in results:
            return cand
    raise ConfigError(f"lm-eval task {task} has no metric {metric!r}; it reports {', '.join(keys)}")


def _max_length(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed every RNG lm-eval or a sampling generator might use, as simple_evaluate does."""

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


def _freeze_requests(task: Any) -> None:
    """Reuse a task's requests for every later candidate instead of re-rendering every prompt.

    The requests (prompts, few-shot contexts with the fixed seed, generation arguments) depend only on the
    task, its limit and few-shot settings, which are fixed per evaluator; only the model's responses change.
    This replaces ``build_all_requests`` on OUR task object (built by this evaluator's TaskManager) with one
    that hands out fresh copies (empty responses) of the first build's instances.
    """
    template = [copy.copy(inst) for inst in getattr(task, "_instances", None) or []]
    if not template:
        return

    def build_all_requests(*args: Any, samples: Sequence[int] | None = None, **kwargs: Any) -> None:
        # lm-eval numbers the documents of a ``samples`` subset 0..k-1 in document order
        rank = {d: i for i, d in enumerate(sorted(samples))} if samples else None
        fresh = []
        for inst in template:
            if rank is not None and inst.doc_id not in rank:
                continue
            c = copy.copy(inst)
            c.resps = []
            c.filtered_resps = {}
            if rank is not None:
                c.doc_id = rank[inst.doc_id]
            fresh.append(c)
        task._instances = fresh

    task.build_all_requests = build_all_requests


@contextlib.contextmanager
def _compiled_templates() -> Iterator[None]:
    """lm-eval recompiles each Jinja template for every document; compile each template string once.

    Scoped to our evaluate calls: ``lm_eval.utils.apply_template`` is restored afterwards.
    """

    import lm_eval.utils as lm_utils

    original = lm_utils.apply_template
    cache = _TEMPLATE_CACHE

    def apply_template(template: str, doc: dict) -> str:
        compiled = cache.get(template)
        if compiled is None:
            compiled = cache[template] = lm_utils.env.from_string(template)
        return compiled.render(**doc)

    lm_utils.apply_template = apply_template
    try:
        yield
    finally:
        lm_utils.apply_template = original


_TEMPLATE_CACHE: dict[str, Any] = {}


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs several INFO/WARNING lines per call; thousands of calls would drown the search log."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)
