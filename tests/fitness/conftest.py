"""Fitness test fixtures: the micro zoo, built once per session under $EVOMERGE_CACHE (see tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.zoo.build import micro_zoo_dir


@pytest.fixture(scope="session")
def micro_zoo() -> Path:
    return micro_zoo_dir()


@pytest.fixture(scope="session")
def micro_tokenizer(micro_zoo: Path):  # noqa: ANN201 - transformers type
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(micro_zoo / "base"), local_files_only=True)
