"""transformers models and tokenizers: the one rule for loading them, and file tensor names <-> module names.

Loading: local files only, safetensors only, never code from the model folder (``trust_remote_code=False``),
in every command and worker; a folder holding only pickled weights or custom code is refused by name.

transformers 5 renames some tensors between the checkpoint and the module (GPT-NeoX stores ``embed_out``
for the module's ``lm_head``) and fuses others (Mixtral's per-expert ``w1/w2/w3`` become one
``experts.gate_up_proj``). Code that writes file tensors into a loaded model in place (the resident merger)
needs the 1:1 part of that mapping; fused tensors cannot be written one file tensor at a time and are
reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from evomerge.dtypes import parse_dtype
from evomerge.errors import ModelError
from evomerge.models.adapter import AdapterFolder, is_adapter_folder, open_weights, split_ref
from evomerge.models.folder import ModelFolder
from evomerge.paths import resolve_path


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as given, or one loaded offline from a model folder (``zoo:`` paths too)."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = resolve_path(tokenizer)
    from transformers import AutoTokenizer  # transformers loads on first use: merging never needs it

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {exc}") from None


def check_loadable(path: str | os.PathLike[str]) -> None:
    """Refuse, by name, a folder that transformers could only load by running its code or unpickling weights."""
    p = resolve_path(path)
    with ModelFolder.open(p) as folder:  # safetensors only: a pickle-only folder is refused with the fix
        config = folder.config
    if config.get("auto_map"):
        raise ModelError(f"model {p}: its config.json names custom code (auto_map {sorted(config['auto_map'])}); "
                         "evomerge never runs code from a model folder (trust_remote_code is always off)")
    model_type = config.get("model_type")
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"model {p}: model_type {model_type!r} is not an architecture this transformers "
                         f"{transformers_version} knows (and evomerge never runs a folder's own model code)")


def load_causal_lm(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = torch.float32, base: str | os.PathLike[str] | None = None) -> torch.nn.Module:
    """A causal LM from a local folder (safetensors, no remote code), in ``dtype`` on ``device``, in eval mode.

    A LoRA adapter folder (or ``BASE+ADAPTER``) loads as its base with the adapter's task vectors added, in
    ``dtype`` (what PEFT's ``merge_and_unload`` gives); ``base`` is its base when the reference names none.
    """
    dtype = parse_dtype(dtype, "dtype") or torch.float32
    explicit, model_part = split_ref(path)
    if explicit is not None or is_adapter_folder(resolve_path(model_part)):
        with open_weights(path, base=base) as source:
            assert isinstance(source, AdapterFolder)
            model = _load_folder(source.base_path, dtype)
            _add_adapter(model, source, dtype)
        return model.to(device).eval()
    return _load_folder(resolve_path(path), dtype).to(device).eval()


def _add_adapter(model: torch.nn.Module, source: AdapterFolder, dtype: torch.dtype) -> None:
    """Write the adapted tensors (base + task vector, computed in float32) into a loaded base model."""
    names = [n for n in source.tensor_names if source.delta_kind(n) != "zero"]
    mapping = checkpoint_names(model, names)
    state = model.state_dict()
    with torch.no_grad():
        for name in names:
            target = state[mapping[name]]
            target.copy_(source.get(name, dtype=dtype))


def _load_folder(p: Any, dtype: torch.dtype) -> torch.nn.Module:
    check_loadable(p)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # a search loads merged parents many times: no "Loading weights" bar each time (restored afterwards)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False, use_safetensors=True)
    except Exception as exc:
        raise ModelError(f"cannot load model {p}: {exc}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model


def _saved_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(module state dict without tied duplicates, the same tensors under their checkpoint names)."""
    state = dict(model.state_dict())
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = remove_tied_weights_from_state_dict(state, model)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other transformers versions
        pass
    try:
        from transformers.core_model_loading import revert_weight_conversion

        saved = revert_weight_conversion(model, dict(state))
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - transformers without conversions
        saved = dict(state)
    return state, saved


def checkpoint_names(model: torch.nn.Module, names: Iterable[str] | None = None) -> dict[str, str]:
    """{tensor name in the model's safetensors files: key in ``model.state_dict()``} for 1:1 tensors.

    With ``names`` (the file tensors a caller needs), raises :class:`ModelError` naming the first that has no
    1:1 module tensor (fused by a conversion, or absent from the model).
    """
    state, saved = _saved_state(model)
    by_id = {id(t): k for k, t in state.items()}
    mapping: dict[str, str] = {}
    for file_name, tensor in saved.items():
        key = by_id.get(id(tensor))
        if key is not None:
            mapping[file_name] = key
    # a tied head that the files leave out still maps to its own module key
    for key in model.state_dict():
        if key not in state and key not in mapping:
            mapping[key] = key
    if names is not None:
        missing = [n for n in names if n not in mapping]
        if missing:
            fused = [n for n in missing if n in saved]
            if fused:
                raise ModelError(
                    f"{type(model).__name__}: tensor {fused[0]!r} (and {len(fused) - 1} more) is fused with others "
                    "when transformers loads it, so it cannot be written into the loaded model one tensor at a time"
                )
            raise ModelError(f"{type(model).__name__} has no parameter for file tensor {missing[0]!r}")
    return mapping
