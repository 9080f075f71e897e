"""The ``zoo:`` path scheme: ``zoo:SIZE[@SEED]/REST`` -> that path in the cached zoo, built first if needed.

``zoo:SIZE/lora/SKILL`` paths are the skills' LoRA adapters (:mod:`evomerge.zoo.lora`), trained on first use;
every other path is the zoo itself (:func:`evomerge.zoo.build.resolve`).
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.zoo import build
from evomerge.zoo.lora import LORA_DIR, ensure_lora


def resolve(rest: str) -> Path:
    """The local path of ``zoo:REST`` (see the module docstring)."""
    head, _, tail = rest.partition("/")
    if tail.split("/", 1)[0] != LORA_DIR:
        return build.resolve(rest)
    size, _, seed_text = head.partition("@")
    if size not in build.SIZES:
        raise ConfigError(f"bad zoo path 'zoo:{rest}': unknown size {size!r} (known: {', '.join(build.SIZES)})")
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        raise ConfigError(f"bad zoo path 'zoo:{rest}': seed {seed_text!r} is not an integer") from None
    root = ensure_lora(size, seed).parent
    out = root / tail
    if not out.exists():
        raise ConfigError(f"zoo path 'zoo:{rest}' does not exist (looked for {out})")
    return out
