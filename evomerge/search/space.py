"""Search spaces: the validated YAML that defines a search (models, fitness, genes, optimizer, stopping).

Every error is a :class:`~evomerge.errors.ConfigError` (or ``ModelError`` for unusable model folders) naming the
file and the field path, e.g. ``demo.yaml: methods.ties.density: bounds inverted (0.9 > 0.1)``.

Schema (see ``search_spaces/README.md`` for the documented version)::

    name: demo                      # optional, default run name
    seed: 0
    models: {base: PATH, fine_tunes: {NAME: PATH, ...}}   # or fine_tunes: [PATH, ...]
    fitness: {...FitnessSpec...}    # or a path to a FitnessSpec YAML, or builtin:NAME
    methods:                        # the categorical gene: which methods the search may use
      ties: {weight: [0, 1], density: [0.1, 1], lambda: 1.0, options: {sign_rule: mass}}
    granularity: per_layer          # | {layer_groups: N} | tensor_kind | {tensor_kind: [attention, mlp]} | per_model
    optimizer: {name: CMA, budget: 80, batch_size: null}
    workers: 1
    device: cpu
    dtype: float32
    vocab_policy: refuse            # or slice_to_base: larger vocabularies cut to the base's rows
    resident: auto                  # device | cpu | disk | auto (the store's memory tier; see `evomerge plan`)
    stopping: {wall_time: 2h, no_improvement: 40, target: 0.9, max_consecutive_failures: 10}
    population: {...}               # passed through untouched (population manager)
    racing: {stages: [0.0625, 0.125, 0.25, 0.5, 1], level: 0.05, min_items: 32, margin: 0}  # or false; default: on where safe

A gene is ``[low, high]`` (searched within those bounds); a number is a fixed value. Fields that may change on
resume without invalidating the run: ``SAFE_ON_RESUME``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from evomerge.errors import ConfigError, ModelError
from evomerge.fitness.items import MEAN_METRICS
from evomerge.fitness.racing import RacingConfig
from evomerge.fitness.spec import FitnessSpec, packaged_spec
from evomerge.merge.methods.registry import get_method, validate_recipe
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.models.adapter import open_weights
from evomerge.models.compat import VOCAB_FIELD_HINT, check_compatible
from evomerge.models.layers import KINDS, LayerMap
from evomerge.paths import resolve_path, scheme_of
from evomerge.search.optimizer import optimizer_class

# dotted field paths that may differ between the snapshot and a resumed space
SAFE_ON_RESUME: tuple[str, ...] = ("optimizer.budget", "workers", "stopping", "progress_interval", "name",
                                   "executor", "test_top", "resident")
DEFAULT_KINDS: tuple[str, ...] = ("attention", "mlp")
GRANULARITIES: tuple[str, ...] = ("per_layer", "layer_groups", "tensor_kind", "per_model")
DEFAULT_MAX_CONSECUTIVE_FAILURES = 10


# ------------------------------------------------------------------------------------------- raw schema

# seconds, or a string such as "90s", "30m", "2h" (see parse_duration)
Duration = Annotated[float | None, BeforeValidator(lambda v: None if v is None else parse_duration(v))]


class ModelsSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field(min_length=1)
    fine_tunes: dict[str, str] | list[str] = Field(min_length=1)


class OptimizerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "CMA"
    budget: int = Field(default=100, gt=0)
    batch_size: int | None = Field(default=None, gt=0)


class StoppingSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wall_time: Duration = None
    no_improvement: int | None = Field(default=None, gt=0)
    target: float | None = None
    # failed evaluations in a row that stop the search (a NaN model, a timeout every candidate hits); null: never
    max_consecutive_failures: int | None = Field(default=DEFAULT_MAX_CONSECUTIVE_FAILURES, gt=0)


class ExecutorSection(BaseModel):
    """Where candidates are evaluated: in this process (``workers: 1``) or on Ray workers."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "inprocess", "ray"] = "auto"  # auto: in-process for 1 worker, else Ray
    address: str | None = None  # an existing Ray cluster (ray start --head); None starts a local instance
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float | None = Field(default=None, ge=0)  # None: 1 when device is cuda, else 0
    eval_timeout: Duration = None  # an evaluation running longer is treated as a lost worker
    max_retries: int = Field(default=2, ge=0)  # re-queues of a candidate whose worker died, then failed
    threads_per_worker: int | None = Field(default=None, gt=0)
    prefetch: int = Field(default=1, ge=0)  # jobs queued in each Ray worker beyond the running one (no idle gap)


class SpaceModel(BaseModel):
    """The YAML as validated (before models are opened)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    seed: int = 0
    models: ModelsSection
    fitness: dict[str, Any] | str
    methods: dict[str, dict[str, Any]] = Field(min_length=1)
    granularity: str | dict[str, Any] = "per_layer"
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    workers: int = Field(default=1, gt=0)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # where each worker keeps base + task vectors: device, (pinned) cpu memory, memory-mapped files, or what fits
    # (merges are bit-identical in every tier; `evomerge plan` shows the numbers)
    resident: Literal["device", "cpu", "disk", "auto"] = "auto"
    stopping: StoppingSection = Field(default_factory=StoppingSection)
    progress_interval: float = Field(default=5.0, ge=0)
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    test_top: int = Field(default=3, ge=0)  # best candidates re-scored on the held-out test split at the end
    # models with a larger vocabulary than the base: refuse, or cut their embedding/head rows to the base's
    vocab_policy: Literal["refuse", "slice_to_base"] = "refuse"
    population: dict[str, Any] | None = None  # owned by the population manager; passed through untouched
    racing: bool | dict[str, Any] | None = None  # None: on where safe (see racing_config)


def parse_duration(value: float | int | str) -> float:
    """Seconds from a number or ``90s``, ``30m``, ``2h``, ``1d`` (also ``1h30m``)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"duration must be positive, got {value!r}")
        return float(value)
    text = str(value).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd])", "", text).strip():
        raise ValueError(f"expected a duration such as 90s, 30m, 2h or a number of seconds, got {value!r}")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    total = sum(float(n) * unit[u] for n, u in parts)
    if total <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return total


# ------------------------------------------------------------------------------------------- resolved


@dataclass(frozen=True)
class Gene:
    """One searched parameter of one method: bounds, and whether each fine-tune gets its own values."""

    method: str
    param: str
    low: float
    high: float
    per_model: bool


@dataclass(frozen=True)
class MethodSpace:
    """A method the search may pick: its genes, fixed parameter values and fixed options."""

    name: str
    genes: tuple[Gene, ...]
    fixed: Mapping[str, float]
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Granularity:
    """How many values a gene holds along the network: per layer, per group of layers, per tensor kind, one."""

    kind: str
    groups: int | None = None
    kinds: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "layer_groups":
            return f"layer_groups: {self.groups}"
        if self.kind == "tensor_kind":
            return f"tensor_kind: {list(self.kinds)} + rest"
        return self.kind


@dataclass(frozen=True)
class Space:
    """A validated search space with model paths resolved and the fitness spec parsed."""

    path: Path | None
    text: str
    raw: SpaceModel
    base_path: Path
    models: Mapping[str, Path]  # fine-tune key -> resolved folder
    model_refs: Mapping[str, str]  # key -> path as written (base included)
    fitness: Any  # evomerge.fitness.spec.FitnessSpec
    methods: tuple[MethodSpace, ...]
    granularity: Granularity
    num_layers: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "search space"

    @property
    def seed(self) -> int:
        return self.raw.seed

    @property
    def budget(self) -> int:
        return self.raw.optimizer.budget

    @property
    def optimizer_name(self) -> str:
        return self.raw.optimizer.name

    @property
    def batch_size(self) -> int:
        return self.raw.optimizer.batch_size or self.raw.workers

    @property
    def penalty(self) -> float:
        return float(self.fitness.effective_penalty)

    @property
    def racing(self) -> RacingConfig:
        """How search candidates are raced (stages over items, stopped below the level; see racing_config)."""
        return racing_config(self.raw.racing, self.fitness, self.seed, self.where)

    def model_paths(self) -> dict[str, str]:
        """Every model key (base included) -> resolved folder."""
        return {BASE_KEY: str(self.base_path), **{k: str(v) for k, v in self.models.items()}}

    def comparable(self) -> dict[str, Any]:
        """The space minus fields safe to change on resume (what a resumed space must match)."""
        data = self.raw.model_dump(mode="json")
        for dotted in SAFE_ON_RESUME:
            node = data
            *head, last = dotted.split(".")
            for part in head:
                node = node.get(part, {})
            node.pop(last, None)
        return data

    def with_overrides(self, *, budget: int | None = None, workers: int | None = None) -> Space:
        """A copy with the budget or worker count replaced (both safe on resume)."""
        raw = self.raw
        if budget is not None:
            if budget <= 0:
                raise ConfigError(f"--budget {budget}: must be positive")
            raw = raw.model_copy(update={"optimizer": raw.optimizer.model_copy(update={"budget": int(budget)})})
        if workers is not None:
            if workers <= 0:
                raise ConfigError(f"--workers {workers}: must be positive")
            raw = raw.model_copy(update={"workers": int(workers)})
        return Space(self.path, self.text, raw, self.base_path, self.models, self.model_refs, self.fitness,
                     self.methods, self.granularity, self.num_layers, dict(self.extra))


# ------------------------------------------------------------------------------------------- loading


def _format_validation(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in err["loc"]).replace(".[", "[")
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "missing" else f" (got {value!r})"
        parts.append(f"{where}: {loc}: {err['msg'].removeprefix('Value error, ')}{shown}")
    return "; ".join(parts)


def load_space(path: str | os.PathLike[str], *, check_models: bool = True) -> Space:
    """Read, validate and resolve a search space file (opens the model folders' headers when ``check_models``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"search space {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"search space {p} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{p}: invalid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    return space_from_dict(data, where=str(p), base_dir=p.parent, text=text, path=p, check_models=check_models)


def space_from_dict(data: Any, *, where: str = "search space", base_dir: str | os.PathLike[str] | None = None,
                    text: str | None = None, path: Path | None = None, check_models: bool = True) -> Space:
    """Validate a parsed search space (see :func:`load_space`)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        raw = SpaceModel.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, where)) from None
    root = Path(base_dir) if base_dir is not None else Path.cwd()

    # models
    refs: dict[str, str] = {BASE_KEY: raw.models.base}
    if isinstance(raw.models.fine_tunes, list):
        for i, ref in enumerate(raw.models.fine_tunes):
            key = Path(ref.rstrip("/")).name or f"model{i}"
            if key in refs:
                key = f"{key}_{i}"
            refs[key] = ref
    else:
        for key, ref in raw.models.fine_tunes.items():
            if key == BASE_KEY:
                raise ConfigError(f"{where}: models.fine_tunes.{key}: the name '{BASE_KEY}' is reserved for the base")
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
                raise ConfigError(f"{where}: models.fine_tunes.{key}: names may use letters, digits, _ . - only")
            refs[key] = ref
    resolved = {k: _resolve_model(ref, root, f"{where}: models." + ("base" if k == BASE_KEY else f"fine_tunes.{k}"),
                                  check_models) for k, ref in refs.items()}

    # fitness
    if isinstance(raw.fitness, str):
        ref = raw.fitness
        if ref.startswith("builtin:"):
            fpath = packaged_spec(ref[len("builtin:"):])
        else:
            fpath = Path(ref).expanduser()
            fpath = fpath if fpath.is_absolute() else root / fpath
        if not fpath.is_file():
            raise ConfigError(f"{where}: fitness: spec file {fpath} does not exist")
        fdata = yaml.safe_load(fpath.read_text(encoding="utf-8"))
        if isinstance(fdata, Mapping) and "fitness" in fdata and "tasks" not in fdata:
            fdata = fdata["fitness"]
        fitness = FitnessSpec.from_dict(fdata, where=f"{where}: fitness ({fpath})", base_dir=fpath.parent)
    else:
        fitness = FitnessSpec.from_dict(raw.fitness, where=f"{where}: fitness", base_dir=root)

    # optimizer, racing
    optimizer_class(raw.optimizer.name, f"{where}: optimizer.name")
    racing_config(raw.racing, fitness, raw.seed, where)

    # layers
    num_layers = _num_layers(resolved, refs, where, check_models, raw.vocab_policy)
    granularity = _parse_granularity(raw.granularity, num_layers, where)

    # methods
    fine_tune_keys = [k for k in refs if k != BASE_KEY]
    methods = tuple(_parse_method(name, spec, fine_tune_keys, where) for name, spec in raw.methods.items())

    return Space(
        path=path, text=text if text is not None else yaml.safe_dump(dict(data), sort_keys=False), raw=raw,
        base_path=resolved[BASE_KEY], models={k: v for k, v in resolved.items() if k != BASE_KEY},
        model_refs=refs, fitness=fitness, methods=methods, granularity=granularity, num_layers=num_layers,
    )


def racing_config(value: bool | Mapping[str, Any] | None, fitness: FitnessSpec, seed: int,
                  where: str = "search space") -> RacingConfig:
    """The ``racing:`` section (``false``, ``true`` or a mapping: ``stages``, ``level``, ``min_items``,
    ``margin``), seeded by the run seed. Unset, racing is on where it is safe: when every task's value is a
    weighted mean of its items (jsonl exact_match, token_acc, loglik; lm-eval tasks whose metric lm-eval
    aggregates by the mean, which the worker checks, scoring a task that is not on every item). A jsonl task that
    is not a mean (perplexity) turns the default off, and refuses an explicit racing section, naming the task."""
    at = f"{where}: racing"
    unsafe = [f"{t.name} ({t.metric})" for t in fitness.tasks if t.kind == "jsonl" and str(t.metric) not in MEAN_METRICS]
    if value is None:
        return RacingConfig(enabled=not unsafe, seed=seed)
    cfg = RacingConfig.from_value(value, seed=seed, where=at)
    if cfg.enabled and unsafe:
        raise ConfigError(f"{at}: task(s) {', '.join(unsafe)}: the value is not a mean of the items, so a subset "
                          f"cannot stand for it; racing needs every task to be one (exact_match, token_acc, "
                          f"loglik), or set racing: false")
    return cfg


def _resolve_model(ref: str, root: Path, where: str, check: bool) -> Path:
    if scheme_of(ref) is not None:
        try:
            return resolve_path(ref)
        except ConfigError as exc:
            raise ModelError(f"{where}: {exc}") from None
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else (root / p)
    if check:
        if not p.is_dir():
            raise ModelError(f"{where}: model folder {p} does not exist")
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise ModelError(f"{where}: {p} has no config.json (not a Hugging Face model folder) and no "
                             "adapter_config.json (not a PEFT adapter folder)")
    return p.resolve() if p.exists() else p


def _num_layers(paths: Mapping[str, Path], refs: Mapping[str, str], where: str, check: bool,
                vocab_policy: str = "refuse") -> int:
    """Layer count of the base; with ``check``, every model is opened and checked for compatibility."""

    if not check:
        cfg_file = paths[BASE_KEY] / "config.json"
        if cfg_file.is_file():
            return LayerMap.from_config(json.loads(cfg_file.read_text())).num_layers
        return 0  # unknown until the models exist
    folders = {}
    try:
        for key, p in paths.items():
            try:  # the base first (refs list it first): a LoRA adapter fine-tune is read over it
                folders[key] = open_weights(p, base=folders.get(BASE_KEY) if key != BASE_KEY else None)
            except ModelError as exc:
                field_ = "models.base" if key == BASE_KEY else f"models.fine_tunes.{key}"
                raise ModelError(f"{where}: {field_}: {exc}") from None
        try:
            check_compatible(folders[BASE_KEY], [f for k, f in folders.items() if k != BASE_KEY],
                             vocab_policy=vocab_policy, vocab_hint=VOCAB_FIELD_HINT)
        except ModelError as exc:
            raise ModelError(f"{where}: models: incompatible models: {exc}") from None
        return LayerMap.from_config(folders[BASE_KEY].config).num_layers
    finally:
        for f in folders.values():
            close = getattr(f, "close", None)
            if close is not None:
                close()


def _parse_granularity(value: str | Mapping[str, Any], num_layers: int, where: str) -> Granularity:
    at = f"{where}: granularity"
    if isinstance(value, str):
        if value in ("per_layer", "per_model"):
            return Granularity(value)
        if value == "tensor_kind":
            return Granularity("tensor_kind", kinds=DEFAULT_KINDS)
        if value == "layer_groups":
            raise ConfigError(f"{at}: layer_groups needs a group count, e.g. {{layer_groups: 2}}")
        raise ConfigError(f"{at}: unknown granularity {value!r}; use one of {', '.join(GRANULARITIES)}")
    if len(value) != 1:
        raise ConfigError(f"{at}: expected one key (layer_groups or tensor_kind), got {sorted(value)}")
    (key, arg), = value.items()
    if key == "layer_groups":
        if isinstance(arg, bool) or not isinstance(arg, int) or arg < 1:
            raise ConfigError(f"{at}.layer_groups: expected a positive integer, got {arg!r}")
        if num_layers and arg > num_layers:
            raise ConfigError(f"{at}.layer_groups: {arg} groups for a model of {num_layers} layers")
        return Granularity("layer_groups", groups=int(arg))
    if key == "tensor_kind":
        kinds = tuple(arg) if isinstance(arg, (list, tuple)) else ()
        if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise ConfigError(f"{at}.tensor_kind: expected a list of distinct kinds from {list(KINDS)}, got {arg!r}")
        return Granularity("tensor_kind", kinds=kinds)
    raise ConfigError(f"{at}: unknown granularity {key!r}; use one of {', '.join(GRANULARITIES)}")


def _parse_method(name: str, spec: Mapping[str, Any], fine_tunes: list[str], where: str) -> MethodSpace:
    at = f"{where}: methods.{name}"
    try:
        method = get_method(name)
    except ConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from None
    if spec is None:
        spec = {}
    genes: list[Gene] = []
    fixed: dict[str, float] = {}
    options = spec.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{at}.options: expected a mapping of option names to values")
    for pname, value in spec.items():
        if pname == "options":
            continue
        pspec = method.param(pname)
        if pspec is None:
            known = ", ".join(p.name for p in method.params) or "none"
            raise ConfigError(f"{at}.{pname}: unknown parameter for method {name} (known: {known})")
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{at}.{pname}: a gene is [low, high] (two numbers), got {value!r}")
            low, high = float(value[0]), float(value[1])
            if low > high:
                raise ConfigError(f"{at}.{pname}: bounds inverted ({low:g} > {high:g}); write [low, high]")
            if low == high:
                raise ConfigError(f"{at}.{pname}: empty range [{low:g}, {high:g}]; write a number to fix the value")
            for bound in (low, high):
                pspec.check(bound, f"{at}.{pname}", name)
            genes.append(Gene(name, pname, low, high, pspec.per_model))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            pspec.check(float(value), f"{at}.{pname}", name)
            fixed[pname] = float(value)
        else:
            raise ConfigError(f"{at}.{pname}: expected [low, high] (a gene) or a number (fixed), got {value!r}")
    # a representative recipe must pass the registry (model counts, base, options)
    mids = {g.param: (g.low + g.high) / 2 for g in genes}
    per_model = {k: v for k, v in {**fixed, **mids}.items() if method.param(k).per_model}  # type: ignore[union-attr]
    global_ = {k: v for k, v in {**fixed, **mids}.items() if not method.param(k).per_model}  # type: ignore[union-attr]
    recipe = Recipe(
        method=name,
        models=tuple(ModelEntry(k, {p: ParamValue.constant(v) for p, v in per_model.items()}) for k in fine_tunes),
        base_model=BASE_KEY,
        parameters={p: ParamValue.constant(v) for p, v in global_.items()},
        options=dict(options),
    )
    validate_recipe(recipe, where=at)
    if not genes:
        raise ConfigError(f"{at}: no gene to search (give at least one parameter as [low, high])")
    return MethodSpace(name, tuple(genes), fixed, dict(options))
