"""Tiny model folders for the engine, resident-merger and CLI tests (imported by those test files)."""

from __future__ import annotations

from pathlib import Path

import torch


def build_llamas(
    root: Path,
    n_models: int = 3,
    *,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    vocab: int = 64,
    layers: int = 3,
    seed: int = 0,
    scale: float = 0.02,
) -> list[Path]:
    """A base (``root/base``) and ``n_models`` perturbed fine-tunes (``root/m1``...) of a tiny Llama.

    Perturbations differ in scale per model so merges are not symmetric; the tokenizer-free folders hold
    config.json, generation_config.json and model.safetensors as transformers writes them.
    """
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(seed + 1)
    paths = []
    for i in range(n_models + 1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name])
                if i:
                    p.add_(torch.randn(p.shape, generator=g) * (scale * (1 + 0.5 * i)))
        path = root / ("base" if i == 0 else f"m{i}")
        model.to(dtype).save_pretrained(path)
        model.to(torch.float32)
        paths.append(path)
    return paths


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged output folder (sharded or not)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
