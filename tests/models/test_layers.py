"""LayerMap: layer index and kind of every tensor of every supported family, against hand-written tables."""

from __future__ import annotations

import logging

import pytest
from helpers.tiny_models import FAMILIES

from evomerge.errors import ModelError
from evomerge.models.folder import ModelFolder
from evomerge.models.layers import KINDS, LayerMap

_LLAMA_LAYER = {
    "input_layernorm.weight": "norm",
    "post_attention_layernorm.weight": "norm",
    "self_attn.q_proj.weight": "attention",
    "self_attn.k_proj.weight": "attention",
    "self_attn.v_proj.weight": "attention",
    "self_attn.o_proj.weight": "attention",
    "mlp.gate_proj.weight": "mlp",
    "mlp.up_proj.weight": "mlp",
    "mlp.down_proj.weight": "mlp",
}
_LLAMA_TOP = {"model.embed_tokens.weight": "embedding", "model.norm.weight": "norm", "lm_head.weight": "head"}

# (per-layer tensors relative to the layer prefix, layer prefix, tensors outside the stack)
EXPECTED: dict[str, tuple[dict[str, str], str, dict[str, str]]] = {
    "llama": (_LLAMA_LAYER, "model.layers.{}.", _LLAMA_TOP),
    "mistral": (_LLAMA_LAYER, "model.layers.{}.", _LLAMA_TOP),
    "qwen2": (
        {**_LLAMA_LAYER, "self_attn.q_proj.bias": "attention", "self_attn.k_proj.bias": "attention",
         "self_attn.v_proj.bias": "attention"},
        "model.layers.{}.", _LLAMA_TOP,
    ),
    "phi3": (
        {"input_layernorm.weight": "norm", "post_attention_layernorm.weight": "norm",
         "self_attn.qkv_proj.weight": "attention", "self_attn.o_proj.weight": "attention",
         "mlp.gate_up_proj.weight": "mlp", "mlp.down_proj.weight": "mlp"},
        "model.layers.{}.", _LLAMA_TOP,
    ),
    "phi": (
        {"input_layernorm.weight": "norm", "input_layernorm.bias": "norm",
         **{f"self_attn.{p}.{w}": "attention" for p in ("q_proj", "k_proj", "v_proj", "dense") for w in ("weight", "bias")},
         **{f"mlp.{p}.{w}": "mlp" for p in ("fc1", "fc2") for w in ("weight", "bias")}},
        "model.layers.{}.",
        {"model.embed_tokens.weight": "embedding", "model.final_layernorm.weight": "norm",
         "model.final_layernorm.bias": "norm", "lm_head.weight": "head", "lm_head.bias": "head"},
    ),
    "gemma": (_LLAMA_LAYER, "model.layers.{}.", {"model.embed_tokens.weight": "embedding", "model.norm.weight": "norm"}),
    "gemma2": (
        {**_LLAMA_LAYER, "pre_feedforward_layernorm.weight": "norm", "post_feedforward_layernorm.weight": "norm"},
        "model.layers.{}.", {"model.embed_tokens.weight": "embedding", "model.norm.weight": "norm"},
    ),
    "gpt_neox": (
        {**{f"{p}.{w}": "norm" for p in ("input_layernorm", "post_attention_layernorm") for w in ("weight", "bias")},
         **{f"attention.{p}.{w}": "attention" for p in ("query_key_value", "dense") for w in ("weight", "bias")},
         **{f"mlp.{p}.{w}": "mlp" for p in ("dense_h_to_4h", "dense_4h_to_h") for w in ("weight", "bias")}},
        "gpt_neox.layers.{}.",
        {"gpt_neox.embed_in.weight": "embedding", "gpt_neox.final_layer_norm.weight": "norm",
         "gpt_neox.final_layer_norm.bias": "norm", "embed_out.weight": "head"},
    ),
    "gpt2": (
        {**{f"{p}.{w}": "norm" for p in ("ln_1", "ln_2") for w in ("weight", "bias")},
         **{f"attn.{p}.{w}": "attention" for p in ("c_attn", "c_proj") for w in ("weight", "bias")},
         **{f"mlp.{p}.{w}": "mlp" for p in ("c_fc", "c_proj") for w in ("weight", "bias")}},
        "transformer.h.{}.",
        {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "embedding",
         "transformer.ln_f.weight": "norm", "transformer.ln_f.bias": "norm"},
    ),
    "falcon": (
        {"input_layernorm.weight": "norm", "input_layernorm.bias": "norm",
         "self_attention.query_key_value.weight": "attention", "self_attention.dense.weight": "attention",
         "mlp.dense_h_to_4h.weight": "mlp", "mlp.dense_4h_to_h.weight": "mlp"},
        "transformer.h.{}.",
        {"transformer.word_embeddings.weight": "embedding", "transformer.ln_f.weight": "norm",
         "transformer.ln_f.bias": "norm"},
    ),
    "bloom": (
        {**{f"{p}.{w}": "norm" for p in ("input_layernorm", "post_attention_layernorm") for w in ("weight", "bias")},
         **{f"self_attention.{p}.{w}": "attention" for p in ("query_key_value", "dense") for w in ("weight", "bias")},
         **{f"mlp.{p}.{w}": "mlp" for p in ("dense_h_to_4h", "dense_4h_to_h") for w in ("weight", "bias")}},
        "transformer.h.{}.",
        {"transformer.word_embeddings.weight": "embedding", "transformer.word_embeddings_layernorm.weight": "norm",
         "transformer.word_embeddings_layernorm.bias": "norm", "transformer.ln_f.weight": "norm",
         "transformer.ln_f.bias": "norm"},
    ),
}


def test_table_covers_every_family() -> None:
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_of_each_family(tiny_models, family: str, caplog: pytest.LogCaptureFixture) -> None:
    per_layer, prefix, top = EXPECTED[family]
    expected: dict[str, tuple[int | None, str]] = {n: (None, k) for n, k in top.items()}
    for layer in range(2):
        for rel, kind in per_layer.items():
            expected[prefix.format(layer) + rel] = (layer, kind)
    with caplog.at_level(logging.WARNING, logger="evomerge.models.layers"), ModelFolder.open(tiny_models[family][0]) as f:
        lm = LayerMap.from_config(f.config)
        assert set(f.tensor_names) == set(expected)
        got = {n: (lm.layer_of(n), lm.kind_of(n)) for n in f.tensor_names}
    assert got == expected
    assert lm.num_layers == 2
    assert caplog.records == []  # a known family: no fallback warning
    # cached answers are the same
    assert all((lm.layer_of(n), lm.kind_of(n)) == v for n, v in expected.items())


def test_layer_numbers_beyond_nine_and_prefixed_names() -> None:
    lm = LayerMap.from_config({"model_type": "llama", "num_hidden_layers": 32})
    assert lm.num_layers == 32
    assert lm.layer_of("model.layers.31.mlp.up_proj.weight") == 31
    assert lm.layer_of("model.layers.10.self_attn.q_proj.weight") == 10
    # a multimodal wrapper's text stack still maps
    assert lm.layer_of("model.language_model.layers.7.self_attn.q_norm.weight") == 7
    assert lm.kind_of("model.language_model.layers.7.self_attn.q_norm.weight") == "norm"
    assert lm.kind_of("model.layers.3.block_sparse_moe.experts.2.w1.weight") == "mlp"
    assert lm.kind_of("model.layers.3.self_attn.rotary_emb.inv_freq") == "attention"
    assert lm.kind_of("model.something_else") == "other"
    assert lm.layer_of("model.norm.weight") is None
    # 'layers.1' must not match 'layers.10' partially, nor 'xlayers.'
    assert lm.layer_of("model.xlayers.4.w") is None


def test_layer_count_keys() -> None:
    assert LayerMap.from_config({"model_type": "gpt2", "n_layer": 12}).num_layers == 12
    assert LayerMap.from_config({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text",
                                                                         "num_hidden_layers": 26}}).num_layers == 26
    with pytest.raises(ModelError, match=r"model_type 'llama'.*num_hidden_layers, n_layer"):
        LayerMap.from_config({"model_type": "llama"})
    with pytest.raises(ModelError, match="must be a mapping"):
        LayerMap.from_config(["not", "a", "dict"])  # type: ignore[arg-type]


def test_unknown_architecture_falls_back_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="evomerge.models.layers"):
        lm = LayerMap.from_config({"model_type": "mystery", "num_layers": 4})
    assert any("mystery" in r.getMessage() and "generic" in r.getMessage() for r in caplog.records)
    assert lm.num_layers == 4
    cases = {
        "transformer.h.3.self_attention.query_key_value.weight": (3, "attention"),
        "transformer.h.0.input_layernorm.weight": (0, "norm"),
        "transformer.h.2.mlp.dense_h_to_4h.weight": (2, "mlp"),
        "transformer.word_embeddings.weight": (None, "embedding"),
        "transformer.ln_f.weight": (None, "norm"),
        "lm_head.weight": (None, "head"),
        "backbone.blocks.1.ffn.w2.weight": (1, "mlp"),
        "encoder.layers.0.scale": (0, "other"),
    }
    assert {n: (lm.layer_of(n), lm.kind_of(n)) for n in cases} == cases


def test_kinds_constant() -> None:
    assert KINDS == ("attention", "mlp", "norm", "embedding", "head", "other")
