"""Tiny Hugging Face models of each supported family for the models tests (built from configs, no hub)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers as tf

logging.getLogger("transformers").setLevel(logging.ERROR)

_COMMON = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2}


def make_config(family: str, **overrides: Any) -> tf.PretrainedConfig:
    """A tiny config of ``family`` (2 layers, hidden 16, vocab 64) with ``overrides`` applied."""
    if family == "llama":
        kw = {**_COMMON, "num_key_value_heads": 1}
        cls = tf.LlamaConfig
    elif family == "mistral":
        kw = {**_COMMON, "num_key_value_heads": 1}
        cls = tf.MistralConfig
    elif family == "qwen2":
        kw = {**_COMMON, "num_key_value_heads": 1}
        cls = tf.Qwen2Config
    elif family == "phi3":
        kw = {**_COMMON, "num_key_value_heads": 1, "pad_token_id": 0}
        cls = tf.Phi3Config
    elif family == "phi":
        kw = dict(_COMMON)
        cls = tf.PhiConfig
    elif family == "gemma":
        kw = {**_COMMON, "num_key_value_heads": 1, "head_dim": 8}
        cls = tf.GemmaConfig
    elif family == "gemma2":
        kw = {**_COMMON, "num_key_value_heads": 1, "head_dim": 8}
        cls = tf.Gemma2Config
    elif family == "gpt_neox":
        kw = dict(_COMMON)
        cls = tf.GPTNeoXConfig
    elif family == "gpt2":
        kw = {"vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32,
              "bos_token_id": 0, "eos_token_id": 0}
        cls = tf.GPT2Config
    elif family == "falcon":
        kw = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "bos_token_id": 0, "eos_token_id": 0}
        cls = tf.FalconConfig
    elif family == "bloom":
        kw = {"vocab_size": 64, "hidden_size": 16, "n_layer": 2, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0}
        cls = tf.BloomConfig
    else:  # pragma: no cover - test helper misuse
        raise ValueError(family)
    kw.update(overrides)
    return cls(**kw)


def save_tiny(
    family: str,
    path: Path,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> tf.PreTrainedModel:
    """Build a seeded tiny model and ``save_pretrained`` it into ``path``; returns the model."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(make_config(family, **overrides)).to(dtype)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return model


FAMILIES = ("llama", "mistral", "qwen2", "phi3", "phi", "gemma", "gemma2", "gpt_neox", "gpt2", "falcon", "bloom")
