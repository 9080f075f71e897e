"""The one table of dtypes: names a user writes (``bf16``, ``float32``) and safetensors header codes.

Kernels, engines, model folders and search spaces all read dtypes through this module, so a name accepted in
one place is accepted everywhere and errors list the same choices.
"""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError

# What users may write (recipes, search spaces, --dtype, compute_dtype) -> torch dtype.
NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64,
}
CHOICES = "float32, bfloat16, float16, float64"

# safetensors dtype codes -> torch dtypes (only those this torch build has).
SAFETENSORS_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
    ("U64", "uint64"), ("C64", "complex64"), ("F8_E8M0", "float8_e8m0fnu"),
):
    if hasattr(torch, _attr):
        SAFETENSORS_CODES[_code] = getattr(torch, _attr)
CODE_OF: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_CODES.items()}


def parse_dtype(value: str | torch.dtype | None, where: str = "dtype") -> torch.dtype | None:
    """A torch dtype from its name (float32, bfloat16, float16, float64 and short forms); None passes through."""
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return NAMES[str(value).lower()]
    except KeyError:
        raise ConfigError(f"{where}: unknown dtype {value!r} (choices: {CHOICES})") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the form configs and recipes store)."""
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype).element_size()
