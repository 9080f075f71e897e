"""Tensor name -> layer index and kind, so per-layer parameters and ``kind:`` filters work on every family.

The mapping is table-driven: each known ``model_type`` names the regex that finds the layer index and the
ordered rules that give a tensor's kind (first match wins; norms come first because names such as
``post_attention_layernorm`` also contain ``attention``). Unknown families fall back to a generic table
(``.layers.N.`` / ``.h.N.`` / ``.blocks.N.``) with a logged warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from evomerge.errors import ModelError

log = logging.getLogger(__name__)

TensorKind = Literal["attention", "mlp", "norm", "embedding", "head", "other"]
KINDS: tuple[str, ...] = ("attention", "mlp", "norm", "embedding", "head", "other")


@dataclass(frozen=True)
class FamilySpec:
    """How one architecture family names its tensors."""

    name: str
    layer_regex: str  # group 1 is the layer index
    kind_rules: tuple[tuple[str, str], ...]  # (regex searched in the name, kind), first match wins
    input_embeddings: tuple[str, ...]  # names of the token embedding (the tied head's source)
    heads: tuple[str, ...]  # names of the output projection that ties to the embedding
    model_types: tuple[str, ...] = field(default=())


# Decoder families that follow the Llama naming (model.layers.N.{self_attn,mlp,*_layernorm}).
_LLAMA_RULES: tuple[tuple[str, str], ...] = (
    (r"(?:^|\.)(?:input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
     r"post_feedforward_layernorm|final_layernorm|norm|q_norm|k_norm|q_layernorm|k_layernorm|"
     r"ln_f|embedding_norm)\.", "norm"),
    (r"(?:^|\.)lm_head\.", "head"),
    (r"(?:^|\.)embed_tokens\.", "embedding"),
    (r"\.self_attn\.", "attention"),
    (r"\.(?:mlp|block_sparse_moe|feed_forward)\.", "mlp"),
)
_LLAMA_LAYER = r"(?:^|\.)layers\.(\d+)\."

_GPT2_RULES: tuple[tuple[str, str], ...] = (
    (r"(?:^|\.)(?:ln_1|ln_2|ln_f|ln_cross_attn)\.", "norm"),
    (r"(?:^|\.)lm_head\.", "head"),
    (r"(?:^|\.)(?:wte|wpe)\.", "embedding"),
    (r"\.(?:attn|crossattention)\.", "attention"),
    (r"\.mlp\.", "mlp"),
)

_NEOX_RULES: tuple[tuple[str, str], ...] = (
    (r"(?:^|\.)(?:input_layernorm|post_attention_layernorm|final_layer_norm)\.", "norm"),
    (r"(?:^|\.)embed_out\.", "head"),
    (r"(?:^|\.)embed_in\.", "embedding"),
    (r"\.attention\.", "attention"),
    (r"\.mlp\.", "mlp"),
)

_FALCON_RULES: tuple[tuple[str, str], ...] = (
    (r"(?:^|\.)(?:input_layernorm|post_attention_layernorm|ln_attn|ln_mlp|ln_f|word_embeddings_layernorm)\.",
     "norm"),
    (r"(?:^|\.)lm_head\.", "head"),
    (r"(?:^|\.)word_embeddings\.", "embedding"),
    (r"\.self_attention\.", "attention"),
    (r"\.mlp\.", "mlp"),
)

# Unknown families: keyword heuristics in the same precedence order.
_GENERIC_RULES: tuple[tuple[str, str], ...] = (
    (r"(?:norm|(?:^|\.)ln_?(?:\d|f|\.)|layernorm)", "norm"),
    (r"(?:^|\.)(?:lm_head|embed_out|output)\.", "head"),
    (r"(?:embed|(?:^|\.)wte\.|(?:^|\.)wpe\.|word_embeddings)", "embedding"),
    (r"(?:attn|attention)", "attention"),
    (r"(?:mlp|feed_forward|ffn|experts)", "mlp"),
)
_GENERIC_LAYER = r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\."

_LLAMA_EMBED = ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight")

_FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        "llama-like", _LLAMA_LAYER, _LLAMA_RULES, _LLAMA_EMBED, ("lm_head.weight",),
        model_types=(
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "phi", "phi3", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "cohere",
            "internlm2", "yi", "deepseek", "smollm3", "ministral",
        ),
    ),
    FamilySpec(
        "gpt2", r"(?:^|\.)h\.(\d+)\.", _GPT2_RULES, ("transformer.wte.weight", "wte.weight"), ("lm_head.weight",),
        model_types=("gpt2",),
    ),
    FamilySpec(
        "falcon-like", r"(?:^|\.)h\.(\d+)\.", _FALCON_RULES,
        ("transformer.word_embeddings.weight", "word_embeddings.weight"), ("lm_head.weight",),
        model_types=("falcon", "bloom"),
    ),
    FamilySpec(
        "gpt_neox", _LLAMA_LAYER, _NEOX_RULES, ("gpt_neox.embed_in.weight", "embed_in.weight"),
        ("embed_out.weight",), model_types=("gpt_neox",),
    ),
)
_BY_TYPE: dict[str, FamilySpec] = {t: f for f in _FAMILIES for t in f.model_types}
_GENERIC = FamilySpec(
    "generic", _GENERIC_LAYER, _GENERIC_RULES,
    ("model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
     "transformer.word_embeddings.weight", "embed_tokens.weight", "wte.weight"),
    ("lm_head.weight", "embed_out.weight"),
)

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
LAYER_COUNT_KEYS = _LAYER_COUNT_KEYS  # config keys that may hold the layer count, in the order they are read


def _num_layers(config: Mapping[str, Any]) -> int | None:
    for key in _LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    text = config.get("text_config")
    if isinstance(text, Mapping):
        return _num_layers(text)
    return None


def _model_type(config: Mapping[str, Any]) -> str:
    mt = config.get("model_type")
    return mt if isinstance(mt, str) else ""


class LayerMap:
    """Layer index and kind of each tensor name of one architecture (results are cached per name)."""

    def __init__(self, family: FamilySpec, num_layers: int, model_type: str = "") -> None:
        self.family = family
        self.num_layers = num_layers
        self.model_type = model_type
        self._layer_re = re.compile(family.layer_regex)
        self._kind_res = tuple((re.compile(rx), kind) for rx, kind in family.kind_rules)
        self._layer_cache: dict[str, int | None] = {}
        self._kind_cache: dict[str, str] = {}

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> LayerMap:
        """Pick the family from ``model_type``; unknown types use the generic table and log a warning."""
        if not isinstance(config, Mapping):
            raise ModelError(f"model config must be a mapping (config.json), got {type(config).__name__}")
        n = _num_layers(config)
        mt = _model_type(config)
        if n is None:
            raise ModelError(
                f"config (model_type {mt!r}) has no layer count: expected one of {', '.join(_LAYER_COUNT_KEYS)}"
            )
        family = _BY_TYPE.get(mt)
        if family is None:
            text = config.get("text_config")
            if isinstance(text, Mapping) and _model_type(text) in _BY_TYPE:
                family = _BY_TYPE[_model_type(text)]
        if family is None:
            log.warning(
                "unknown architecture model_type=%r: mapping tensors to layers with the generic "
                "'.layers.N.' / '.h.N.' pattern and keyword kinds; check per-layer parameters", mt,
            )
            family = _GENERIC
        return LayerMap(family, n, mt)

    @staticmethod
    def generic(num_layers: int = 0) -> LayerMap:
        """The generic table (``.layers.N.`` / ``.h.N.`` and keyword kinds) for tensors with no config at hand."""
        return LayerMap(_GENERIC, num_layers)

    def layer_of(self, name: str) -> int | None:
        """Index of the decoder layer holding ``name``, None for tensors outside the stack (embed, norm, head)."""
        try:
            return self._layer_cache[name]
        except KeyError:
            pass
        m = self._layer_re.search(name)
        layer = int(m.group(1)) if m else None
        self._layer_cache[name] = layer
        return layer

    def kind_of(self, name: str) -> str:
        """One of attention, mlp, norm, embedding, head, other."""
        try:
            return self._kind_cache[name]
        except KeyError:
            pass
        kind = "other"
        for rx, k in self._kind_res:
            if rx.search(name):
                kind = k
                break
        self._kind_cache[name] = kind
        return kind

    def tied_pair(self, names: set[str] | frozenset[str] | Any) -> tuple[str, str | None]:
        """(head name, embedding name present in ``names``) used when the head is tied to the embedding."""
        head = next((h for h in self.family.heads if h in names), self.family.heads[0])
        embed = next((e for e in self.family.input_embeddings if e in names), None)
        return head, embed

    def __repr__(self) -> str:
        return f"LayerMap(family={self.family.name!r}, model_type={self.model_type!r}, num_layers={self.num_layers})"
