"""Session-wide test settings (offline hubs, one shared cache) and the fixtures every folder shares: the micro zoo,
built once per cache, and tiny saved models built once per session. Builders live in ``tests/helpers/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("EVOMERGE_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "tests"))


@pytest.fixture(scope="session")
def micro_zoo() -> Path:
    """The micro zoo folder (base, the four specialists, data/, fitness.yaml), built on first use under
    ``$EVOMERGE_CACHE`` and cached across runs; ``zoo:micro/...`` paths resolve into it."""
    from evomerge.zoo.build import ensure_zoo

    return ensure_zoo("micro", seed=0)


@pytest.fixture(scope="session")
def micro_tokenizer(micro_zoo: Path) -> Any:
    """The micro zoo's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(micro_zoo / "base"), local_files_only=True)


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A base and three perturbed fine-tunes of the wide 3-layer float32 Llama (``build_llamas`` defaults), shared
    by the session: tests must not modify these folders. ``tiny_llamas[:k + 1]`` is what ``build_llamas(root,
    k)`` builds."""
    from helpers.tiny_models import build_llamas

    return build_llamas(tmp_path_factory.mktemp("tiny_llamas"), 3)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """One saved tiny model per family: family -> (folder, model). Session-wide: tests must not modify them."""
    from helpers.tiny_models import FAMILIES, save_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return {fam: (root / fam, save_tiny(fam, root / fam)) for fam in FAMILIES}
