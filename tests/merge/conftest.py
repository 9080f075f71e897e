"""Fixtures for the merge-method tests: seeded tensors and tiny float32 Llama checkpoints built in the test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture
def make_tensors() -> Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]:
    """``make(shape, n_models, seed, scale)`` -> (base, fine-tuned tensors), float32, from a seeded generator."""

    def make(
        shape: tuple[int, ...] = (37, 19), n_models: int = 3, seed: int = 0, scale: float = 0.01
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(shape, generator=g)
        return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n_models)]

    return make


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A base and three perturbed fine-tunes of a 3-layer Llama, saved as float32 safetensors folders."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    root = tmp_path_factory.mktemp("tiny_llamas")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1234)
    paths = []
    for i in range(4):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name])
                if i:
                    # Different scales per model so merges are not symmetric.
                    p.add_(torch.randn(p.shape, generator=g) * (0.01 * i))
        path = root / f"model{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths
