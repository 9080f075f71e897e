"""The data that data-aware merge methods need, in one place for every caller.

Methods declare what they need (:class:`~evomerge.merge.methods.spec.Need`): task rows to calibrate on (qp,
apl) or the base model's score on each model's task (mergeability_weighted). :class:`MethodDataProvider` builds
it for a recipe, the same way for a search's workers, the population's parent cache, export and
``evomerge merge``:

- rows: a recipe's own ``options.calibration`` file if it names one, else the fitness's jsonl task rows; an
  original model's are the task of its own name, a merged model's the tasks of the originals it descends from,
  interleaved (``model_tasks``), so the first calibration tokens already cover every source;
- base scores: the base scored on the fitness (or on the spec named by ``options.fitness``) once, then each
  model's task value; a worker passes its own scorer (the base written into its live model) instead.

This module sits above ``fitness`` and ``merge`` (it knows both) and below the executors and the search.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.files import read_yaml
from evomerge.fitness.builtin import read_jsonl
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.spec import FitnessSpec
from evomerge.merge.calibration.rows import CalibrationSet, interleave_rows, key_candidates
from evomerge.merge.engines.disk import MergeSummary, merge_to_disk
from evomerge.merge.methods.registry import get_method
from evomerge.merge.methods.spec import Need
from evomerge.merge.recipe import BASE_KEY, ROWS_OPTION, Recipe, format_model_rows, parse_model_rows
from evomerge.models.hf import load_causal_lm, load_tokenizer
from evomerge.paths import is_absolute_or_scheme, resolve_path

CALIBRATION_LIMIT = 200  # rows per task read for calibration
CALIBRATION_SEQ_LEN = 64


@dataclass(frozen=True)
class MethodData:
    """What one recipe's method gets from its caller (None: it needs none)."""

    calibration: CalibrationSet | None = None
    base_scores: Mapping[str, float] | None = None


def task_of(key: str, tasks: Sequence[str]) -> str:
    """The fitness task a model key stands for: the key itself or its last path component."""
    for cand in key_candidates(key):
        if cand in tasks:
            return cand
    raise ConfigError(f"model {key!r} matches no fitness task (tasks: {', '.join(tasks)}); name models after tasks")


def jsonl_sources(spec: FitnessSpec, split: str = "search") -> dict[str, str]:
    """Task name -> jsonl file of the spec's jsonl tasks (lm-eval tasks carry no local rows)."""
    return {str(t.name): t.source(split) for t in spec.tasks if t.kind == "jsonl"}


def recipe_needs_rows(recipe: Recipe) -> bool:
    """Whether the recipe needs task rows from its caller's fitness (data-aware, no calibration file of its own)."""
    return Need.CALIBRATION in get_method(recipe.method).needs_for(recipe) and not recipe.options.get("calibration")


def recipe_rows(recipe: Recipe) -> dict[str, tuple[str, ...]]:
    """The tasks the recipe's ``rows`` option names per model (none: each model's own), checked against its
    models."""
    chosen = parse_model_rows(str(recipe.options.get(ROWS_OPTION) or ""), where=f"{recipe.method}: options.rows")
    unknown = [k for k in chosen if k not in {m.model for m in recipe.models}]
    if unknown:
        raise ConfigError(f"{recipe.method}: options.rows names {unknown}, which are not models of the recipe "
                          f"({', '.join(m.model for m in recipe.models)})")
    return chosen


def with_model_rows(recipe: Recipe, rows: Mapping[str, Sequence[str]]) -> Recipe:
    """``recipe`` calibrating the models of ``rows`` on those tasks (its method must have the ``rows`` option)."""
    if not rows:
        return recipe
    if get_method(recipe.method).option(ROWS_OPTION) is None:
        raise ConfigError(f"{recipe.method}: no '{ROWS_OPTION}' option (methods that calibrate on task rows have it)")
    return dataclasses.replace(recipe, options={**recipe.options, ROWS_OPTION: format_model_rows(rows)})


def recipe_needs_base_scores(recipe: Recipe) -> bool:
    """Whether some model of the recipe needs a measured base score."""
    return Need.BASE_SCORES in get_method(recipe.method).needs_for(recipe)


class MethodDataProvider:
    """Rows and base scores for data-aware recipes, drawn from one fitness spec (or a recipe's own files).

    ``base_scorer``: returns the base model's score per fitness task (a worker scores the base in its live
    model); by default the base is loaded and scored with a new :class:`Evaluator`. Everything read or measured
    is kept, so many recipes cost one read and one base evaluation.
    """

    def __init__(self, fitness: FitnessSpec | None, base_path: str | os.PathLike[str], *,
                 tokenizer: Any = None, device: str = "cpu", split: str = "search",
                 base_scorer: Callable[[], Mapping[str, float]] | None = None) -> None:
        self.fitness = fitness
        self.base_path = Path(base_path)
        self.device = device
        self.split = split
        self._tokenizer = tokenizer
        self._base_scorer = base_scorer
        self._task_rows: dict[str, list[dict[str, Any]]] | None = None
        self._calibration: CalibrationSet | None = None
        self._sources: dict[str, tuple[str, ...]] = {}  # merged model key -> the tasks its rows were built from
        self._files: dict[str, CalibrationSet] = {}
        self._task_scores: dict[str, dict[str, float]] = {}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_path)
        return self._tokenizer

    # ------------------------------------------------------------------------------------ rows

    def task_rows(self) -> dict[str, list[dict[str, Any]]]:
        """Rows of every jsonl task of the fitness (read once)."""
        if self._task_rows is None:
            if self.fitness is None:
                raise ConfigError("calibration rows need a fitness spec with jsonl tasks (none was given)")
            sources = jsonl_sources(self.fitness, self.split)
            if not sources:
                raise ConfigError("calibration needs jsonl tasks in the fitness spec (lm-eval tasks carry no local "
                                  "rows); set options.calibration to a file of rows instead")
            self._task_rows = {name: read_jsonl(resolve_path(src), limit=CALIBRATION_LIMIT)
                               for name, src in sources.items()}
        return self._task_rows

    def fitness_calibration(self) -> CalibrationSet:
        """One growing set of rows keyed by task name and by every model key given rows so far."""
        if self._calibration is None:
            rows = self.task_rows()
            terminator = getattr(self.fitness, "terminator", "\n")
            self._calibration = CalibrationSet(dict(rows), self.tokenizer, CALIBRATION_SEQ_LEN, terminator)
        return self._calibration

    def calibration(self, recipe: Recipe, model_tasks: Mapping[str, Sequence[str]] | None = None,
                    key_of: Mapping[str, str] | None = None) -> CalibrationSet:
        """Rows for every kernel input of ``recipe``: its ``options.calibration`` file, else the fitness's.

        ``model_tasks``: the tasks a (merged) model stands for; an original needs none (its own task). The
        rows are keyed by ``key_of[model]`` when the recipe names models by folders (export, parent cache).
        """
        source = str(recipe.options.get("calibration") or "")
        chosen = recipe_rows(recipe)
        if source:
            calib = self.calibration_file(source, recipe.tokenizer_source)
            if chosen:  # on a copy: the file's own rows of a model serve the recipes that name none
                calib = dataclasses.replace(calib, rows=dict(calib.rows))
            for model, wanted in chosen.items():  # the file names the tasks' rows too (an export's does)
                calib.add_union((key_of or {}).get(model, model), list(wanted))
            return calib
        calib = self.fitness_calibration()
        tasks = list(self.task_rows())
        for m in recipe.models:
            key = (key_of or {}).get(m.model, m.model)
            if m.model == recipe.base_model or m.model == BASE_KEY:
                continue
            own = key in calib.rows and key not in self._sources  # a task's own rows (an original)
            if m.model in chosen:
                bad = [t for t in chosen[m.model] if t not in tasks]
                if bad or (own and chosen[m.model] != (key,)):
                    raise ConfigError(f"options.rows: model {m.model!r}: {bad or list(chosen[m.model])} "
                                      f"{'are no jsonl tasks of the fitness' if bad else 'is not its own task'} "
                                      f"(tasks: {', '.join(tasks)}; an original is calibrated on its own task)")
            if own:
                continue
            wanted = chosen.get(m.model) or tuple((model_tasks or {}).get(m.model) or [task_of(m.model, tasks)])
            # a key keeps its rows while it stands for the same tasks; a worker reused across runs sees the same
            # member key (g2.1) stand for other tasks in the next run, and must not calibrate it on the old ones
            if self._sources.get(key) != wanted:
                calib.add_union(key, list(wanted))
                self._sources[key] = wanted
        return calib

    def calibration_file(self, source: str, tokenizer_source: str | None = None) -> CalibrationSet:
        """A calibration file (read once): a fitness spec, or a mapping of model keys to jsonl files."""
        if source not in self._files:
            tokenizer = load_tokenizer(resolve_path(tokenizer_source)) if tokenizer_source else self.tokenizer
            self._files[source] = calibration_from_file(source, tokenizer)
        return self._files[source]

    # ------------------------------------------------------------------------------------ base scores

    def base_scores(self, recipe: Recipe) -> dict[str, float]:
        """The base model's score on the task of each model of ``recipe`` that lacks a ``base_score``."""
        source = str(recipe.options.get("fitness") or "")
        values = self._base_task_scores(source)
        names = list(values)
        return {m.model: float(values[task_of(m.model, names)]) for m in recipe.models
                if m.model != recipe.base_model and "base_score" not in m.parameters}

    def _base_task_scores(self, source: str) -> dict[str, float]:
        if source not in self._task_scores:
            if source:
                spec = FitnessSpec.from_yaml(resolve_path(source))
                self._task_scores[source] = measure_base_task_scores(self.base_path, spec, self.tokenizer,
                                                                     self.split, self.device)
            elif self._base_scorer is not None:
                self._task_scores[source] = dict(self._base_scorer())
            elif self.fitness is not None:
                self._task_scores[source] = measure_base_task_scores(self.base_path, self.fitness, self.tokenizer,
                                                                     self.split, self.device)
            else:
                raise ConfigError("mergeability_weighted: base scores need a fitness spec (options.fitness) or "
                                  "a base_score per model")
        return self._task_scores[source]

    # ------------------------------------------------------------------------------------ one recipe

    def for_recipe(self, recipe: Recipe, model_tasks: Mapping[str, Sequence[str]] | None = None,
                   key_of: Mapping[str, str] | None = None) -> MethodData:
        """Everything ``recipe``'s method needs from its caller (empty for plain methods)."""
        needs = get_method(recipe.method).needs_for(recipe)
        calibration = self.calibration(recipe, model_tasks, key_of) if Need.CALIBRATION in needs else None
        scores = None
        if Need.BASE_SCORES in needs:
            by_model = self.base_scores(recipe)
            scores = {(key_of or {}).get(k, k): v for k, v in by_model.items()}
        return MethodData(calibration, scores)


def measure_base_task_scores(base_path: str | os.PathLike[str], spec: FitnessSpec, tokenizer: Any = None,
                             split: str = "search", device: str = "cpu") -> dict[str, float]:
    """The base model's value on every task of ``spec`` (one evaluation of the base)."""
    evaluator = Evaluator(spec, tokenizer if tokenizer is not None else str(base_path), device, splits=(split,))
    res = evaluator.score(load_causal_lm(resolve_path(base_path), device), split)
    if not res.ok:
        raise ConfigError(f"scoring the base model {base_path} failed: {res.error}")
    return dict(res.task_values())


# ------------------------------------------------------------------------------------------ calibration files


def calibration_from_file(path: str | os.PathLike[str], tokenizer: Any, limit: int | None = CALIBRATION_LIMIT
                          ) -> CalibrationSet:
    """A calibration file: a fitness spec (has ``tasks``; search split, keyed by task name) or a mapping
    ``model key: jsonl file`` (or a list of files, interleaved: the rows of a merged model's ancestors' tasks),
    optionally in the long form ``{models: ..., terminator, seq_len, limit}`` that export writes."""
    p = resolve_path(path)
    data = read_yaml(p, "calibration file")
    if isinstance(data, dict) and ("tasks" in data or "fitness" in data):
        spec = FitnessSpec.from_yaml(p)
        provider = MethodDataProvider(spec, p.parent, tokenizer=tokenizer)
        return provider.fitness_calibration()
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a fitness spec or a mapping of model keys to jsonl files")

    def files(value: Any) -> list[str] | None:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            return None
        return [v if is_absolute_or_scheme(v) else str(p.parent / v) for v in items]

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
        rows[str(k)] = interleave_rows([read_jsonl(resolve_path(f), limit=settings.get("limit", limit))
                                        for f in listed])
    return CalibrationSet(rows, tokenizer, int(settings.get("seq_len", CALIBRATION_SEQ_LEN)),
                          str(settings.get("terminator", "\n")))


def calibration_file_data(spec: FitnessSpec, model_tasks: Mapping[str, Sequence[str]], split: str = "search",
                          limit: int | None = CALIBRATION_LIMIT) -> dict[str, Any]:
    """The long-form calibration file that gives each model of ``model_tasks`` the rows a search's worker gave
    it (and each task its own, for recipes whose ``rows`` option names tasks), so an exported data-aware recipe
    rebuilds with ``evomerge merge`` alone."""
    sources = jsonl_sources(spec, split)
    models: dict[str, list[str]] = {}
    for key, tasks in model_tasks.items():
        missing = [t for t in tasks if t not in sources]
        if missing or not tasks:
            raise ConfigError(f"model {key!r}: task(s) {missing or list(tasks)} are not jsonl tasks of the fitness "
                              f"spec (known: {', '.join(sorted(sources))})")
        models[str(key)] = [str(resolve_path(sources[t]).resolve()) for t in tasks]
    for name, src in sources.items():  # each task's own rows too: a recipe's ``rows`` option names tasks
        models.setdefault(str(name), [str(resolve_path(src).resolve())])
    return {"terminator": str(getattr(spec, "terminator", "\n")), "seq_len": CALIBRATION_SEQ_LEN, "limit": limit,
            "models": models}


def merge_recipe_to_disk(recipe: Recipe, out_dir: str | os.PathLike[str], **kwargs: Any) -> MergeSummary:
    """:func:`~evomerge.merge.engines.disk.merge_to_disk` with the data the recipe's own options name
    (``options.calibration`` rows, base scores measured on ``options.fitness``): what ``evomerge merge`` does,
    so an exported data-aware recipe rebuilds alone."""
    base = recipe.base_model or recipe.models[0].model
    data = MethodDataProvider(None, base, device=str(kwargs.get("device", "cpu"))).for_recipe(recipe)
    return merge_to_disk(recipe, out_dir, calibration=data.calibration, base_scores=data.base_scores, **kwargs)
