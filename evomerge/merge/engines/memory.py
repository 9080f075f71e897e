"""The in-memory engine: merge full state dicts held in memory (analyses, the sequential QP calibration, tests)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from evomerge.errors import ConfigError
from evomerge.merge.plan import MergePlan

StateDict = dict[str, torch.Tensor]


def merge_in_memory(plan: MergePlan, states: Mapping[str, StateDict], names: Iterable[str] | None = None
                    ) -> StateDict:
    """Merge state dicts keyed like the plan's models, tensor by tensor; each result in its input's dtype."""
    for k in plan.keys:
        if k not in states:
            raise ConfigError(f"merge_in_memory: no state for model {k!r} (have: {sorted(states)})")
    ref = states[plan.base_key] if plan.base_key else states[plan.input_keys[0]]
    out: StateDict = {}
    for name in (names if names is not None else ref):
        base = states[plan.base_key][name] if plan.base_key else None
        merged = plan.merge_tensor(name, base, [states[k][name] for k in plan.input_keys])
        out[name] = merged.to(ref[name].dtype)
    return out
