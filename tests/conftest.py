"""Session-wide test settings: offline hubs and one shared cache, so the micro zoo is built once per run."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("EVOMERGE_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "tests"))
