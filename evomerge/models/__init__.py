"""Model folders: lazy safetensors reading, tensor name -> layer and kind, compatibility, sharded writing."""

from evomerge.models.compat import VOCAB_POLICIES, CompatReport, check_compatible
from evomerge.models.folder import INDEX_NAME, SINGLE_NAME, ModelFolder, TensorInfo, open_model
from evomerge.models.hf import checkpoint_names
from evomerge.models.layers import KINDS, FamilySpec, LayerMap
from evomerge.models.writer import (
    MODEL_FILES,
    TOKENIZER_FILES,
    ShardedWriter,
    WriteSummary,
    copy_model_files,
    parse_size,
)

__all__ = [
    "INDEX_NAME",
    "KINDS",
    "MODEL_FILES",
    "SINGLE_NAME",
    "TOKENIZER_FILES",
    "VOCAB_POLICIES",
    "CompatReport",
    "FamilySpec",
    "LayerMap",
    "ModelFolder",
    "ShardedWriter",
    "TensorInfo",
    "WriteSummary",
    "check_compatible",
    "checkpoint_names",
    "copy_model_files",
    "open_model",
    "parse_size",
]
