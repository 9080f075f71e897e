"""Copies of micro-zoo model folders with one thing changed (a NaN, more vocabulary rows, custom code, new weights)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from evomerge.paths import resolve_path

Change = Callable[[str, torch.Tensor], torch.Tensor]


def copy_model(src: str, dst: Path, change: Change | None = None, config: Mapping[str, Any] | None = None) -> Path:
    """``src`` (a folder or ``zoo:`` path) copied to ``dst``; ``change(name, tensor)`` rewrites its weights and
    ``config`` updates its config.json."""
    shutil.copytree(resolve_path(src), dst)
    if change is not None:
        for f in dst.glob("*.safetensors"):
            tensors = load_file(f)
            save_file({k: change(k, v).contiguous() for k, v in tensors.items()}, f, metadata={"format": "pt"})
    if config:
        data = json.loads((dst / "config.json").read_text())
        data.update(config)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


def micro_copies(root: Path, names: tuple[str, ...] = ("add", "rev")) -> dict[str, Path]:
    """Plain copies of the micro base and some fine-tunes under ``root`` (so a test may change them)."""
    return {n: copy_model(f"zoo:micro/{n}", root / n) for n in ("base", *names)}


def local_models(paths: Mapping[str, Path]) -> dict[str, Any]:
    """The ``models:`` section naming the copies."""
    return {"base": str(paths["base"]), "fine_tunes": {k: str(v) for k, v in paths.items() if k != "base"}}
