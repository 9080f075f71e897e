"""What every kernel shares: the compute dtype, input checks, task vectors of the inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.dtypes import parse_dtype

Tensor = torch.Tensor


def work_dtype(ref: Tensor, options: Mapping[str, Any]) -> torch.dtype:
    """The dtype kernels compute in: ``options['compute_dtype']``, else float64 for float64 inputs, else float32."""
    wanted = options.get("compute_dtype")
    if wanted is not None:
        out = parse_dtype(wanted, "compute_dtype")
        assert out is not None
        return out
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


def full_inputs(base: Tensor | None, tensors: Sequence[Tensor], options: Mapping[str, Any], wd: torch.dtype) -> list[Tensor]:
    """Full model tensors in ``wd``: reconstructs ``base + delta`` when given task vectors."""
    if options.get("inputs_are_deltas", False):
        if base is None:
            raise ValueError("inputs_are_deltas needs the base tensor")
        b = base.to(wd)
        return [b + t.to(wd) for t in tensors]
    return [t.to(wd) for t in tensors]


def check_inputs(base: Tensor | None, tensors: Sequence[Tensor], model_params: Sequence[Mapping[str, float]]) -> None:
    if not tensors:
        raise ValueError("no input tensors")
    if len(model_params) != len(tensors):
        raise ValueError(f"{len(model_params)} per-model parameter sets for {len(tensors)} tensors")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"input {i} has shape {tuple(t.shape)}, input 0 has {tuple(shape)}")
    if base is not None and base.shape != shape:
        raise ValueError(f"base has shape {tuple(base.shape)}, inputs have {tuple(shape)}")



def stacked_deltas(base: Tensor, tensors: Sequence[Tensor], options: Mapping[str, Any], wd: torch.dtype) -> Tensor:
    """Stacked task vectors, shape (T, *base.shape), in ``wd`` (one allocation, filled in place)."""
    stacked = torch.empty((len(tensors), *base.shape), dtype=wd, device=base.device)
    given = bool(options.get("inputs_are_deltas", False))
    b = None if given else base.to(wd)
    for i, t in enumerate(tensors):
        row = stacked[i]
        row.copy_(t)
        if b is not None:
            row.sub_(b)
    return stacked
