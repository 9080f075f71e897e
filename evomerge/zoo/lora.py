"""The demo skills learned as PEFT LoRA adapters of the demo base: the zoo's ``lora/`` folder.

``build_lora(zoo_root)`` trains, for each skill, a LoRA adapter (rank 8 on every attention and MLP projection)
on the same rows, for the same number of steps, as that skill's full fine-tune, from the zoo's base, and saves
it with PEFT's ``save_pretrained`` into ``zoo_root/lora/SKILL`` (``adapter_config.json`` +
``adapter_model.safetensors``, ``base_model_name_or_path`` naming the zoo's base folder). Training is seeded
and single-threaded (deterministic). ``lora/lora_table.md`` scores base and adapters on every skill.
``ensure_lora(size, seed)`` builds once into the cached zoo (``zoo:SIZE/lora/SKILL`` paths), atomically,
keyed by these settings and this module's code, so a changed recipe rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.atomic import atomic_output_dir
from evomerge.errors import ConfigError
from evomerge.files import read_json_object
from evomerge.fitness import builtin
from evomerge.zoo.build import SIZES, _finetune, _lock, _log, ensure_zoo, format_table, score_model
from evomerge.zoo.skills import SKILLS, build_char_tokenizer, skill_splits

LORA_DIR = "lora"
TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """What shapes a LoRA build (part of its cache key)."""

    r: int = 8
    alpha: int = 16
    lr: float = 5e-3  # 1e-2 learns the skills as well but its task vectors interfere more when merged
    steps_scale: float = 1.0  # of each skill's full fine-tune steps


SETTINGS: dict[str, LoraSettings] = {"micro": LoraSettings(r=4, alpha=8, lr=1e-2), "demo": LoraSettings()}


def lora_key(size: str, seed: int, zoo_key: str) -> str:
    """Content hash of the settings, the base zoo and this module's code."""
    code = hashlib.sha256(Path(__file__).resolve().read_bytes()).hexdigest()[:16]
    blob = json.dumps({"size": size, "seed": seed, "zoo": zoo_key, "cfg": asdict(SETTINGS[size]), "code": code},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _zoo_info(root: Path) -> dict[str, Any]:
    return read_json_object(root / "zoo.json", "zoo description (is this a built zoo?)")


def build_lora(zoo_root: str | os.PathLike[str], threads: int | None = None, force: bool = False) -> Path:
    """Train the skill adapters of the zoo at ``zoo_root`` into ``zoo_root/lora`` (atomically); returns it."""
    import peft

    root = Path(zoo_root).resolve()
    info = _zoo_info(root)
    size, seed = str(info["size"]), int(info["seed"])
    if size not in SETTINGS:
        raise ConfigError(f"no LoRA settings for zoo size {size!r}")
    settings, cfg = SETTINGS[size], SIZES[size]
    target = root / LORA_DIR
    key = lora_key(size, seed, str(info.get("key")))
    if (target / "lora.json").is_file() and not force:
        if json.loads((target / "lora.json").read_text()).get("key") == key:
            return target
        force = True  # built by other settings or code: rebuild
    threads = int(threads if threads is not None else os.environ.get("EVOMERGE_ZOO_THREADS", "1") or 1)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    t0 = time.perf_counter()
    try:
        from transformers import AutoModelForCausalLM

        tokenizer = build_char_tokenizer()
        steps = {s.name: max(1, int(round(cfg.finetune_steps * s.finetune_scale * settings.steps_scale)))
                 for s in SKILLS}
        splits = {s.name: skill_splits(s, cfg.n_search, cfg.n_test, seed, n_train=steps[s.name] * cfg.finetune_batch)
                  for s in SKILLS}
        lora_cfg = {"r": settings.r, "lora_alpha": settings.alpha, "target_modules": list(TARGETS),
                    "lora_dropout": 0.0}
        finetune_cfg = type(cfg)(**{**asdict(cfg), "finetune_lr": settings.lr})
        with atomic_output_dir(target, overwrite=force) as tmp:
            _log(f"LoRA adapters for the {size} zoo: rank {settings.r}, alpha {settings.alpha}, lr {settings.lr}, "
                 f"targets {', '.join(TARGETS)}")
            tables: dict[str, dict[str, dict[str, float]]] = {"exact match": {}, "token accuracy": {}}
            encoded = {s.name: builtin.encode_rows(tokenizer, splits[s.name]["test"], 64) for s in SKILLS}
            base = AutoModelForCausalLM.from_pretrained(str(root / "base"))
            score_model(base, encoded, tables, "base")
            for i, s in enumerate(SKILLS):
                model = AutoModelForCausalLM.from_pretrained(str(root / "base"))
                torch.manual_seed(seed + 101 + i)
                random.seed(seed + 101 + i)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pm = peft.get_peft_model(model, peft.LoraConfig(**lora_cfg))
                _finetune(pm, finetune_cfg, tokenizer, splits[s.name]["train"], seed + 101 + i,
                          f"LoRA {s.name}", steps[s.name])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pm.save_pretrained(tmp / s.name)
                _fix_base_name(tmp / s.name, root / "base")
                score_model(pm, encoded, tables, f"LoRA {s.name}")
                del pm, model
            md = format_table(tables, [s.name for s in SKILLS])
            (tmp / "lora_table.md").write_text(f"# LoRA adapters of the {size} zoo (seed {seed})\n\n{md}",
                                               encoding="utf-8")
            (tmp / "lora.json").write_text(json.dumps({
                "key": key, "size": size, "seed": seed, "settings": asdict(settings), "targets": list(TARGETS),
                "steps": steps, "build_seconds": round(time.perf_counter() - t0, 1), "torch_threads": threads,
            }, indent=2, sort_keys=True) + "\n")
            print(md, flush=True)
    finally:
        torch.set_num_threads(old_threads)
    _log(f"built the {size} zoo's LoRA adapters in {time.perf_counter() - t0:.1f}s -> {target}")
    return target


def _fix_base_name(adapter: Path, base: Path) -> None:
    """Name the base by its final folder (the adapter is trained from it; PEFT wrote the path it was loaded from)."""
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = str(base.resolve())
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def ensure_lora(size: str = "micro", seed: int = 0) -> Path:
    """The cached zoo's ``lora/`` folder, building the zoo and its adapters first if needed."""
    root = ensure_zoo(size, seed)
    target = root / LORA_DIR
    info = _zoo_info(root)
    key = lora_key(size, seed, str(info.get("key")))

    def current() -> bool:
        meta = target / "lora.json"
        return meta.is_file() and json.loads(meta.read_text()).get("key") == key

    if current():
        return target
    with _lock(root.parent / f".{root.name}.lora.lock"):
        if not current():
            for stale in root.glob(f".{LORA_DIR}.*.partial"):  # left by a killed build
                shutil.rmtree(stale, ignore_errors=True)
            build_lora(root, force=target.exists())
    return target
