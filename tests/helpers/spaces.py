"""Search spaces over the micro zoo for tests (the zoo is built once in the tests' cache: tiny, fast)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

MICRO_FITNESS: dict[str, Any] = {
    "batch_size": 64,
    "seed": 0,
    "limit": 24,
    "tasks": [
        {"name": s, "metric": "token_acc",
         "jsonl": {"search": f"zoo:micro/data/{s}/search.jsonl", "test": f"zoo:micro/data/{s}/test.jsonl"}}
        for s in ("add", "rev", "sort", "enc")
    ],
}

MICRO_SPACE: dict[str, Any] = {
    "name": "micro",
    "seed": 0,
    "models": {"base": "zoo:micro/base",
               "fine_tunes": {s: f"zoo:micro/{s}" for s in ("add", "rev", "sort", "enc")}},
    "fitness": MICRO_FITNESS,
    "methods": {"task_arithmetic": {"weight": [0.0, 1.0]}, "ties": {"weight": [0.0, 1.0], "density": [0.3, 1.0]}},
    "granularity": "per_layer",
    "optimizer": {"name": "CMA", "budget": 8},
    "progress_interval": 0,
    "test_top": 1,
}


def micro_space(**overrides: Any) -> dict[str, Any]:
    """A copy of the micro space with top-level keys replaced (``optimizer={...}`` etc.)."""
    data = copy.deepcopy(MICRO_SPACE)
    data.update(copy.deepcopy(overrides))
    return data


def write_space(path: Path, data: dict[str, Any]) -> Path:
    """``data`` written as a space YAML file at ``path``; returns ``path``."""
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
