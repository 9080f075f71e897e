"""FitnessSpec: what a candidate is scored on (the ``fitness:`` section of a search space).

Each task has exactly one source:
- ``lm_eval: NAME`` a task known to lm-eval (its bundled tasks, for users with data access);
- ``lm_eval_yaml: PATH`` a custom lm-eval task YAML (e.g. over local jsonl files);
- ``jsonl: PATH`` local prompt/answer (or text) rows scored by evomerge's built-in metrics
  (exact_match, token_acc, loglik, perplexity) without lm-eval.
A source is either one value (used for both splits) or ``{search: ..., test: ...}`` so a search scores on one
split and the final model is re-scored on the disjoint held-out one. Relative paths resolve from the spec
file's folder; ``zoo:SIZE/REST`` paths name the built-in demo zoo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.files import read_yaml_mapping
from evomerge.fitness.builtin import BUILTIN_METRICS

Split = Literal["search", "test"]
SPLITS: tuple[str, ...] = ("search", "test")
SourceValue = str | dict[Split, str]
SOURCE_KINDS: tuple[str, ...] = ("lm_eval", "lm_eval_yaml", "jsonl")
# metric-name fragments that are minimized when the spec does not say (lm-eval tasks report their own)
_MINIMIZED_HINTS = ("perplexity", "bits_per_byte", "loss")


class TaskSpec(BaseModel):
    """One scored task: source, metric and its direction, weight in the aggregate, per-task limits."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    lm_eval: SourceValue | None = None
    lm_eval_yaml: SourceValue | None = None
    jsonl: SourceValue | None = None
    weight: float = Field(default=1.0, gt=0)
    metric: str | None = None
    direction: Literal["maximize", "minimize"] | None = None
    limit: int | None = Field(default=None, gt=0)
    num_fewshot: int | None = Field(default=None, ge=0)

    @field_validator("lm_eval", "lm_eval_yaml", "jsonl")
    @classmethod
    def _non_empty(cls, value: SourceValue | None) -> SourceValue | None:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        if isinstance(value, dict):
            missing = [s for s in SPLITS if s not in value]
            if missing:
                raise ValueError(f"split mapping needs both 'search' and 'test' (missing {', '.join(missing)})")
        return value

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        given = [k for k in SOURCE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SOURCE_KINDS)} (got {', '.join(given) or 'none'})")
        if self.kind == "jsonl":
            if self.metric is None:
                self.metric = "exact_match"
            if self.metric not in BUILTIN_METRICS:
                raise ValueError(f"metric {self.metric!r} is not a built-in metric "
                                 f"({', '.join(BUILTIN_METRICS)})")
            if self.direction is None:
                self.direction = "maximize" if BUILTIN_METRICS[self.metric] else "minimize"
            if self.num_fewshot:
                raise ValueError("num_fewshot applies to lm-eval tasks only")
        elif self.direction is None and self.metric is not None and any(
                h in self.metric for h in _MINIMIZED_HINTS):
            self.direction = "minimize"
        if self.name is None:
            src = self.source("search")
            self.name = Path(src).stem if self.kind != "lm_eval" else src
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SOURCE_KINDS if getattr(self, k) is not None)

    def source(self, split: str) -> str:
        """The task name or path used for ``split``."""
        value = getattr(self, self.kind)
        if isinstance(value, dict):
            return value[split]
        return value


class FitnessSpec(BaseModel):
    """Tasks plus evaluation settings (all recorded with every score)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskSpec] = Field(min_length=1)
    batch_size: int = Field(default=32, gt=0)
    max_gen_toks: int = Field(default=16, gt=0)
    seed: int = 0
    penalty: float | None = None
    limit: int | None = Field(default=None, gt=0)
    num_fewshot: int | None = Field(default=None, ge=0)
    terminator: str = "\n"

    @model_validator(mode="after")
    def _check(self) -> FitnessSpec:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique (repeated: {', '.join(map(str, dup))}); set 'name'")
        return self

    def with_metric(self, metric: str) -> FitnessSpec:
        """The same spec scoring every task with ``metric`` (direction re-derived from the metric)."""
        return FitnessSpec.from_dict({**self.model_dump(exclude_none=True), "tasks": [
            {**t.model_dump(exclude_none=True), "metric": metric, "direction": None} for t in self.tasks]})

    @property
    def effective_penalty(self) -> float:
        """The score of a failed candidate: given, else below any reachable aggregate of bounded metrics."""
        if self.penalty is not None:
            return self.penalty
        unbounded = any(t.direction == "minimize" or (t.metric or "").startswith("loglik") for t in self.tasks)
        return -1.0e4 if unbounded else -1.0

    def task_limit(self, task: TaskSpec) -> int | None:
        return task.limit if task.limit is not None else self.limit

    def task_fewshot(self, task: TaskSpec) -> int | None:
        return task.num_fewshot if task.num_fewshot is not None else self.num_fewshot

    def with_paths_resolved(self, base_dir: str | os.PathLike[str] | None) -> FitnessSpec:
        """Relative file paths made absolute against ``base_dir`` (``zoo:`` paths and task names kept)."""
        if base_dir is None:
            return self
        root = Path(base_dir)

        def fix(v: str) -> str:
            if v.startswith("zoo:") or Path(v).expanduser().is_absolute():
                return v
            return str((root / v).resolve())

        tasks = []
        for t in self.tasks:
            data = t.model_dump()
            kind = t.kind
            if kind != "lm_eval":
                val = data[kind]
                data[kind] = {k: fix(p) for k, p in val.items()} if isinstance(val, dict) else fix(val)
            tasks.append(TaskSpec.model_validate(data))
        return self.model_copy(update={"tasks": tasks})

    @classmethod
    def from_dict(cls, data: Any, where: str = "fitness", base_dir: str | os.PathLike[str] | None = None
                  ) -> FitnessSpec:
        """Validate; a bad field raises ConfigError naming ``where.field[index].subfield`` and the value."""
        try:
            spec = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, where)) from None
        return spec.with_paths_resolved(base_dir)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], section: str | None = None) -> FitnessSpec:
        """Read a spec file: a bare FitnessSpec, or a search space whose ``fitness:`` section is one."""

        p = Path(path)
        data = read_yaml_mapping(p, "fitness spec file")
        where = str(p)
        if section is None and "fitness" in data and "tasks" not in data:
            section = "fitness"
        if section is not None:
            if section not in data:
                raise ConfigError(f"{p}: no '{section}' section")
            data = data[section]
            where = f"{p}: {section}"
        return cls.from_dict(data, where=where, base_dir=p.parent)


def _format_errors(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ""
        for item in err["loc"]:
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc or where else str(item))
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "missing" else f" (got {value!r})"
        parts.append(f"{where}{loc}: {msg}{shown}")
    return "; ".join(parts)


def packaged_spec(name: str) -> Path:
    """Path of a FitnessSpec shipped with evomerge (``demo``, ``demo_lmeval``, ``micro``, ``micro_lmeval``)."""
    path = Path(__file__).resolve().parent / "specs" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no packaged fitness spec {name!r}; known: {', '.join(known)}")
    return path
