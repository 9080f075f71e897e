"""Compatibility of the models of one merge, checked from configs and headers before any tensor is read.

Every problem is collected and reported at once in one :class:`ModelError` naming the model path, the tensor
and the shapes. Vocabulary size differences are refused unless the caller opts in to ``slice_to_base``:
then the report lists, per embedding/head tensor, how many rows to keep (the reference's vocabulary), and
the engine reads or slices the first rows of every model's tensor. A tied head that transformers leaves out
of the files is not a mismatch: :meth:`ModelFolder.get` serves it from the embedding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.models.folder import ModelFolder
from evomerge.models.layers import LayerMap

VOCAB_POLICIES = ("refuse", "slice_to_base")
# how to turn slice_to_base on, as the hint of a vocabulary refusal words it
VOCAB_FLAG_HINT = "--vocab-policy slice_to_base (evomerge merge, evomerge kinship)"
VOCAB_FIELD_HINT = "`vocab_policy: slice_to_base` in the search space"
# Non-parameter buffers that some checkpoints store and others do not (recomputed by transformers).
_IGNORABLE = re.compile(r"(?:rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")
_POSITIONAL = re.compile(r"(?:^|\.)wpe\.|position")
_MAX_LISTED = 25


@dataclass
class CompatReport:
    """What to merge: the reference's tensor names (file order) and the row slices for vocabulary tensors."""

    reference: ModelFolder
    models: list[ModelFolder]
    tensor_names: tuple[str, ...]
    layer_map: LayerMap
    vocab_slices: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return self.layer_map.num_layers

    def rows(self, name: str) -> int | None:
        """Rows to keep of tensor ``name`` (None: the whole tensor)."""
        return self.vocab_slices.get(name)

    def slice_rows(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor[:rows]`` for a vocabulary tensor under ``slice_to_base`` (a view, no copy), else ``tensor``."""
        rows = self.vocab_slices.get(name)
        if rows is None or tensor.dim() == 0 or tensor.shape[0] <= rows:
            return tensor
        return tensor[:rows]


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    value = config.get("vocab_size")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = config.get("text_config")
    return _vocab_size(text) if isinstance(text, Mapping) else None


def _arch(config: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    archs = config.get("architectures")
    return str(config.get("model_type", "")), tuple(archs) if isinstance(archs, list) else ()


def _describe(arch: tuple[str, tuple[str, ...]]) -> str:
    mt, names = arch
    return f"{'/'.join(names) or '?'} (model_type {mt!r})"


def check_compatible(
    base: ModelFolder | None,
    models: Sequence[ModelFolder],
    vocab_policy: str = "refuse",
    vocab_hint: str = VOCAB_FLAG_HINT,
) -> CompatReport:
    """Check architectures, layer counts, tensor sets, shapes and vocabularies; raise one ModelError listing all.

    ``vocab_hint`` names how the caller's user turns ``slice_to_base`` on (the CLI flag by default; a search space
    passes :data:`VOCAB_FIELD_HINT`)."""
    if vocab_policy not in VOCAB_POLICIES:
        raise ConfigError(f"vocab_policy: unknown value {vocab_policy!r}; expected one of {', '.join(VOCAB_POLICIES)}")
    if base is None and not models:
        raise ConfigError("no models to merge")
    reference = base if base is not None else models[0]
    role = "base" if base is not None else "reference model (the first; no base given)"
    others = [m for m in models if m is not reference]
    problems: list[str] = []
    notes: list[str] = []

    ref_arch = _arch(reference.config)
    ref_map = LayerMap.from_config(reference.config)
    ref_vocab = _vocab_size(reference.config)
    ref_names = set(reference.tensor_names)
    ref_aliases = reference.tied_aliases

    # tensors: the reference's, minus buffers that some model lacks
    names = list(reference.tensor_names)
    dropped = {
        n for n in names if _IGNORABLE.search(n) and any(not m.has(n) for m in others)
    }
    if dropped:
        names = [n for n in names if n not in dropped]
        notes.append(f"not merged (buffers absent from some models, recomputed on load): {sorted(dropped)}")

    vocab_slices: dict[str, int] = {}
    vocab_problems: list[str] = []

    for m in others:
        where = f"model {m.path}"
        arch = _arch(m.config)
        if arch[0] != ref_arch[0] or (arch[1] and ref_arch[1] and arch[1] != ref_arch[1]):
            problems.append(
                f"{where} is {_describe(arch)} but the {role} {reference.path} is {_describe(ref_arch)}: "
                "different architectures cannot be merged"
            )
            continue
        try:
            n_layers = LayerMap.from_config(m.config).num_layers
        except ModelError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if n_layers != ref_map.num_layers:
            problems.append(
                f"{where} has {n_layers} layers but the {role} {reference.path} has {ref_map.num_layers}"
            )
            continue

        m_names = set(m.tensor_names)
        m_aliases = m.tied_aliases
        missing = [n for n in names if n not in m_names and n not in m_aliases]
        extra = [
            n for n in m.tensor_names
            if n not in ref_names and n not in ref_aliases and not _IGNORABLE.search(n)
        ]
        ignored = [n for n in m.tensor_names if n not in ref_names and n in ref_aliases]
        for n in missing:
            problems.append(
                f"{where} lacks tensor {n!r} (shape {tuple(reference.shape(n))} in the {role} {reference.path})"
            )
        for n in extra:
            problems.append(
                f"{where} has tensor {n!r} (shape {tuple(m.shape(n))}) that the {role} {reference.path} lacks"
            )
        for n in ignored:
            notes.append(f"{where}: {n!r} not merged (the {role} ties it to {ref_aliases[n]!r})")

        m_vocab = _vocab_size(m.config)
        vocab_tensor_seen = False
        for n in names:
            if n in missing:
                continue
            rs, ms = tuple(reference.shape(n)), tuple(m.shape(n))
            if rs == ms:
                continue
            kind = ref_map.kind_of(n)
            is_vocab = (
                len(rs) == len(ms) >= 1
                and rs[1:] == ms[1:]
                and kind in ("embedding", "head")
                and not _POSITIONAL.search(n)
                and (ms[0] == m_vocab or rs[0] == ref_vocab or m_vocab != ref_vocab)
            )
            if not is_vocab:
                problems.append(
                    f"{where}: tensor {n!r} has shape {ms} but {rs} in the {role} {reference.path}"
                )
                continue
            vocab_tensor_seen = True
            if vocab_policy == "slice_to_base" and ms[0] > rs[0]:
                vocab_slices[n] = rs[0]
                notes.append(f"{where}: tensor {n!r} {ms} sliced to its first {rs[0]} rows (vocab_policy slice_to_base)")
            elif vocab_policy == "slice_to_base":
                problems.append(
                    f"{where}: tensor {n!r} has {ms[0]} rows (shape {ms}), fewer than the {rs[0]} of the {role} "
                    f"{reference.path} (shape {rs}); slice_to_base can only drop rows, not add them"
                )
            else:
                vocab_problems.append(
                    f"{where}: tensor {n!r} has shape {ms} (vocab_size {m_vocab}) but {rs} in the {role} "
                    f"{reference.path} (vocab_size {ref_vocab})"
                )
        if m_vocab != ref_vocab and not vocab_tensor_seen:
            msg = (
                f"{where} has vocab_size {m_vocab} but the {role} {reference.path} has {ref_vocab} "
                "(tensor shapes agree, but the tokenizers likely differ)"
            )
            if vocab_policy == "refuse":
                vocab_problems.append(msg)
            else:
                notes.append(msg)

    if vocab_problems:
        problems.extend(vocab_problems)
        problems.append(
            "vocabulary sizes differ: merging rows that mean different tokens is refused by default; with "
            f"{vocab_hint} every model's embedding and head rows are cut to the base vocabulary, if the tokenizers "
            "agree on those first tokens"
        )
    if problems:
        listed = problems[:_MAX_LISTED]
        more = len(problems) - len(listed)
        text = "\n  - ".join(listed)
        raise ModelError(
            f"models cannot be merged ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  - {text}"
            + (f"\n  ... and {more} more" if more else "")
        )
    return CompatReport(
        reference=reference,
        models=list(models),
        tensor_names=tuple(names),
        layer_map=ref_map,
        vocab_slices=vocab_slices,
        notes=notes,
    )
