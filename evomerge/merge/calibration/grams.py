"""Activation statistics of linear layers: input Grams ``X^T X`` collected with forward hooks.

:func:`sequential_grams` is the sequential layer-wise mode of the QP merge (a reconstruction of seed d): linears
are visited in forward order, grouped by shared input (q/k/v, gate/up); each group's Grams are collected on a
model whose earlier groups are ALREADY MERGED, then the group is merged (the plan's own per-tensor step) and
written in. Non-linear tensors are merged first by the method's fallback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.engines.memory import merge_in_memory
from evomerge.merge.plan import MergePlan

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Weight tensor name -> ``nn.Linear`` module (tied lm_head included under its own name)."""
    return {f"{name}.weight": mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


class _StopForward(Exception):
    pass


def collect_grams(
    model: torch.nn.Module,
    batches: Iterable[Tensor],
    names: Sequence[str] | None = None,
    normalize: str = "mean",
    stop_after: bool = False,
) -> dict[str, Tensor]:
    """Input Gram ``X^T X`` (float64, (in, in)) of each hooked ``nn.Linear`` over every token of ``batches``.

    ``normalize``: ``mean`` divides by the token count (each task weighs the same), ``sum`` keeps the sum.
    ``stop_after``: abort each forward pass once every hooked module has fired (sequential mode).
    Modules sharing one input tensor (q/k/v) share one accumulated Gram object.
    """
    if normalize not in ("mean", "sum"):
        raise ValueError(f"gram_normalize must be mean or sum, got {normalize!r}")
    mods = linear_modules(model)
    wanted = list(mods) if names is None else list(names)
    missing = [n for n in wanted if n not in mods]
    if missing:
        raise ValueError(f"not nn.Linear weights: {missing}")
    grams: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    fired: set[str] = set()
    last_input: dict[int, tuple[Tensor, str]] = {}  # id -> (input kept alive, so ids are not reused, owner)
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            seen_input = last_input.get(id(x))
            owner = seen_input[1] if seen_input is not None and seen_input[0] is x else None
            if owner is not None and owner in grams and owner != name and owner in fired:
                grams[name] = grams[owner]  # same input object: share the Gram
                counts[name] = counts[owner]
            else:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                if name not in grams:
                    grams[name] = torch.zeros((flat.shape[1], flat.shape[1]), dtype=torch.float64, device=flat.device)
                    counts[name] = 0
                grams[name].addmm_(flat.T, flat)
                counts[name] += flat.shape[0]
                last_input[id(x)] = (x, name)
            fired.add(name)
            if stop_after and all(n in fired for n in wanted):
                raise _StopForward

        return hook

    for n in wanted:
        handles.append(mods[n].register_forward_pre_hook(make_hook(n)))
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for batch in batches:
                fired.clear()
                last_input.clear()
                with contextlib.suppress(_StopForward):
                    model(input_ids=batch.to(device))
    finally:
        for h in handles:
            h.remove()
    out: dict[str, Tensor] = {}
    seen: dict[int, Tensor] = {}
    for n in wanted:
        if n not in grams:
            continue
        g = grams[n]
        if id(g) not in seen:
            seen[id(g)] = g / max(1, counts[n]) if normalize == "mean" else g
        out[n] = seen[id(g)]
    return out


def _forward_groups(model: torch.nn.Module, batch: Tensor) -> list[list[str]]:
    """Linear weights in forward order, grouped when consecutive modules read the same input tensor."""
    mods = linear_modules(model)
    order: list[tuple[str, int]] = []
    handles = []
    keep: list[Tensor] = []  # keep inputs alive so ids are not reused within the pass

    def make(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            keep.append(args[0])
            order.append((name, id(args[0])))

        return hook

    for n, m in mods.items():
        handles.append(m.register_forward_pre_hook(make(n)))
    try:
        with torch.no_grad():
            model(input_ids=batch[:1].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    prev_id = None
    for name, ident in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and ident == prev_id:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev_id = ident
    return groups


def sequential_grams(
    plan: MergePlan,
    states: Mapping[str, StateDict],
    batches: Sequence[Sequence[Tensor]],
    model: torch.nn.Module,
    normalize: str = "mean",
    progress: bool = False,
) -> dict[str, list[Tensor]]:
    """Grams per linear weight and kernel input, collected with the earlier groups already merged (qp sequential).

    ``batches[t]``: calibration token batches of the t-th kernel input. Each group is merged by the plan's
    per-tensor step with its Grams (``qp_grams``), exactly as the engine will merge it, so the engine's result
    equals the model the later groups were calibrated on. ``model``: a loaded copy of the base architecture to
    work in (reset to the base weights first; a search reuses one instead of loading the base per candidate).
    """
    assert plan.base_key is not None
    plan = plan.for_full_tensors()
    base_state = states[plan.base_key]
    model.load_state_dict(base_state, strict=False)
    mods = linear_modules(model)
    # non-linear tensors first, by the method without Grams (its fallback)
    non_linear = [n for n in base_state if n not in mods]
    model.load_state_dict(merge_in_memory(plan, states, non_linear), strict=False)
    groups = _forward_groups(model, batches[0][0])
    params = dict(model.named_parameters())
    out: dict[str, list[Tensor]] = {}
    for gi, group in enumerate(groups):
        per_model = [collect_grams(model, batches[t], group, normalize, stop_after=True)
                     for t in range(len(plan.input_keys))]
        for name in group:
            grams = [pm[name] for pm in per_model]
            out[name] = grams
            w = plan.merge_tensor(name, base_state[name], [states[k][name] for k in plan.input_keys],
                                  extra_options={"qp_grams": grams})
            with torch.no_grad():
                params[name].copy_(w.to(params[name].dtype))
        if progress:
            print(f"[qp] sequential group {gi + 1}/{len(groups)}: {', '.join(group)}", flush=True)
    return out
