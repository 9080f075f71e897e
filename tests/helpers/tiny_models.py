"""Tiny model folders for tests, built from configs (no hub): one config builder for every supported family, one
builder of a base with perturbed fine-tunes, PEFT LoRA adapters over a base, seeded tensors, and copies of
micro-zoo folders with one thing changed."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from evomerge.paths import resolve_path

logging.getLogger("transformers").setLevel(logging.ERROR)

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "phi", "gemma", "gemma2", "gpt_neox", "gpt2", "falcon", "bloom")

_COMMON = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
# (config class, the family's own keyword arguments, the name of its layer count)
_FAMILY: dict[str, tuple[type[tf.PretrainedConfig], dict[str, Any], str]] = {
    "llama": (tf.LlamaConfig, {**_COMMON, "num_key_value_heads": 1}, "num_hidden_layers"),
    "mistral": (tf.MistralConfig, {**_COMMON, "num_key_value_heads": 1}, "num_hidden_layers"),
    "qwen2": (tf.Qwen2Config, {**_COMMON, "num_key_value_heads": 1}, "num_hidden_layers"),
    "phi3": (tf.Phi3Config, {**_COMMON, "num_key_value_heads": 1, "pad_token_id": 0}, "num_hidden_layers"),
    "phi": (tf.PhiConfig, dict(_COMMON), "num_hidden_layers"),
    "gemma": (tf.GemmaConfig, {**_COMMON, "num_key_value_heads": 1, "head_dim": 8}, "num_hidden_layers"),
    "gemma2": (tf.Gemma2Config, {**_COMMON, "num_key_value_heads": 1, "head_dim": 8}, "num_hidden_layers"),
    "gpt_neox": (tf.GPTNeoXConfig, dict(_COMMON), "num_hidden_layers"),
    "gpt2": (tf.GPT2Config, {"n_embd": 16, "n_head": 2, "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0},
             "n_layer"),
    "falcon": (tf.FalconConfig, {"hidden_size": 16, "num_attention_heads": 2, "bos_token_id": 0, "eos_token_id": 0},
               "num_hidden_layers"),
    "bloom": (tf.BloomConfig, {"hidden_size": 16, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0}, "n_layer"),
}

# The wider Llama the merge tests use (4 heads over 2 key/value heads, so grouped attention is exercised).
WIDE_LLAMA: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny_config(family: str = "llama", *, vocab: int = 64, layers: int = 2, tied: bool | None = None,
                **overrides: Any) -> tf.PretrainedConfig:
    """A tiny config of ``family`` (hidden 16, ``layers`` layers, ``vocab`` tokens); ``tied`` sets
    ``tie_word_embeddings`` (None: the family's default); ``overrides`` are config keyword arguments."""
    if family not in _FAMILY:
        raise ValueError(f"no tiny config for family {family!r}; known: {', '.join(FAMILIES)}")
    cls, kw, layer_key = _FAMILY[family]
    kw = {**kw, "vocab_size": vocab, layer_key: layers}
    if tied is not None:
        kw["tie_word_embeddings"] = tied
    kw.update(overrides)
    return cls(**kw)


def save_model(path: Path, config: tf.PretrainedConfig, state: Mapping[str, torch.Tensor] | None = None,
               dtype: torch.dtype = torch.float32, max_shard_size: str | int | None = None) -> tf.PreTrainedModel:
    """A model of ``config`` (initialised from torch's current seed, or loaded with ``state``) saved into
    ``path`` by ``save_pretrained`` in ``dtype``; returns the model."""
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype)
    if state is not None:
        model.load_state_dict(dict(state))
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return model


def save_tiny(family: str, path: Path, seed: int = 0, max_shard_size: str | int | None = None,
              dtype: torch.dtype = torch.float32, **config: Any) -> tf.PreTrainedModel:
    """A seeded tiny model of ``family`` (``config``: keyword arguments of ``tiny_config``) saved into ``path``."""
    torch.manual_seed(seed)
    return save_model(path, tiny_config(family, **config), dtype=dtype, max_shard_size=max_shard_size)


def build_llamas(root: Path, n_models: int = 3, *, family: str = "llama", tied: bool = False,
                 dtype: torch.dtype = torch.float32, vocab: int = 64, layers: int = 3, seed: int = 0,
                 scale: float = 0.02, **config: Any) -> list[Path]:
    """A base (``root/base``) and ``n_models`` perturbed fine-tunes (``root/m1``...) of a tiny model (by
    default the wide 3-layer Llama); returns their paths, base first.

    Fine-tune i adds seeded noise of scale ``scale * (1 + 0.5 i)``, so merges are not symmetric; the first k
    fine-tunes do not depend on ``n_models``. The folders hold config.json, generation_config.json and
    model.safetensors as transformers writes them (no tokenizer).
    """
    extra = {**(WIDE_LLAMA if family == "llama" else {}), **config}
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, vocab=vocab, layers=layers, tied=tied, **extra),
                                                dtype=torch.float32)
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
    """Every tensor of a model folder (sharded or not)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def seeded_tensors(shape: tuple[int, ...] = (37, 19), n_models: int = 3, seed: int = 0, scale: float = 0.01
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(base, fine-tuned tensors): float32 from a seeded generator, each fine-tune ``base + scale * noise``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n_models)]


# LoRA adapters made by PEFT over a tiny Llama base: (name, LoraConfig keyword arguments). Between them they
# exercise per-module rank and alpha patterns, rsLoRA scaling, embedding LoRA and a module stored in full.
LORA_CONFIGS: dict[str, dict[str, Any]] = {
    "la": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    "lb": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["gate_proj", "up_proj", "down_proj", "q_proj"]},
    "lc": {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "down_proj", "embed_tokens"],
           "modules_to_save": ["lm_head"]},
}


def build_loras(root: Path, base: Path, configs: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 7,
                scale: float = 0.05) -> tuple[dict[str, Path], dict[str, Path]]:
    """PEFT LoRA adapters over ``base`` (``root/NAME``) and, for each, the full model PEFT's
    ``merge_and_unload`` makes of it (``root/NAME-merged``), in the base's dtype.

    Every LoRA factor (and a module stored in full) gets seeded random values of ``scale``, so no task vector
    is zero (PEFT starts lora_B at zero).
    """
    import peft  # lazy: only the adapter tests need it

    adapters, merged = {}, {}
    for i, (name, kwargs) in enumerate((configs or LORA_CONFIGS).items()):
        model = tf.AutoModelForCausalLM.from_pretrained(str(base))
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


Change = Callable[[str, torch.Tensor], torch.Tensor]


def copy_model(src: str | Path, dst: Path, change: Change | None = None,
               config: Mapping[str, Any] | None = None) -> Path:
    """``src`` (a folder or ``zoo:`` path) copied to ``dst``; ``change(name, tensor)`` rewrites its weights and
    ``config`` updates its config.json."""
    shutil.copytree(resolve_path(str(src)), dst)
    if change is not None:
        for f in dst.glob("*.safetensors"):
            tensors = load_file(f)
            save_file({k: change(k, v).contiguous() for k, v in tensors.items()}, f, metadata={"format": "pt"})
    if config:
        data = json.loads((dst / "config.json").read_text())
        data.update(config)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


def micro_copies(root: Path, names: Sequence[str] = ("add", "rev")) -> dict[str, Path]:
    """Plain copies of the micro base and some fine-tunes under ``root`` (so a test may change them)."""
    return {n: copy_model(f"zoo:micro/{n}", root / n) for n in ("base", *names)}


def local_models(paths: Mapping[str, Path]) -> dict[str, Any]:
    """The ``models:`` section of a space naming local copies (``base`` and the fine-tunes)."""
    return {"base": str(paths["base"]), "fine_tunes": {k: str(v) for k, v in paths.items() if k != "base"}}
