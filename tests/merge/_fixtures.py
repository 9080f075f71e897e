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


# LoRA adapters made by PEFT over a tiny Llama base: (name, LoraConfig keyword arguments). Between them they
# exercise per-module rank and alpha patterns, rsLoRA scaling, embedding LoRA and a module stored in full.
LORA_CONFIGS: dict[str, dict] = {
    "la": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    "lb": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["gate_proj", "up_proj", "down_proj", "q_proj"]},
    "lc": {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "down_proj", "embed_tokens"],
           "modules_to_save": ["lm_head"]},
}


def build_loras(root: Path, base: Path, configs: dict[str, dict] | None = None, seed: int = 7,
                scale: float = 0.05) -> tuple[dict[str, Path], dict[str, Path]]:
    """PEFT LoRA adapters over ``base`` (``root/NAME``) and, for each, the full model PEFT's
    ``merge_and_unload`` makes of it (``root/NAME-merged``), in the base's dtype.

    Every LoRA factor (and a module stored in full) gets seeded random values of ``scale``, so no task vector
    is zero (PEFT starts lora_B at zero).
    """
    import warnings

    import peft
    import transformers

    adapters, merged = {}, {}
    for i, (name, kwargs) in enumerate((configs or LORA_CONFIGS).items()):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
        dtype = next(model.parameters()).dtype
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
                elif "modules_to_save" in pname:
                    p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(root / name)
            full = pm.merge_and_unload()
        full.to(dtype).save_pretrained(root / f"{name}-merged")
        adapters[name], merged[name] = root / name, root / f"{name}-merged"
    return adapters, merged
