"""Fixtures of the models tests: tiny saved models of every family (helpers live in tiny_hf.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers as tf
from tiny_hf import FAMILIES, save_tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, tf.PreTrainedModel]]:
    """One saved tiny model per family (session-wide: tests must not modify these folders)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {fam: (root / fam, save_tiny(fam, root / fam)) for fam in FAMILIES}
