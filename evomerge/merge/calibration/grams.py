"""Activation statistics of linear layers: input Grams ``X^T X`` collected with forward hooks.

:func:`sequential_grams` is the sequential layer-wise mode of the QP merge (a reconstruction of seed d): linears
are visited in forward order, grouped by shared input (q/k/v, gate/up); each group's Grams are collected on a
model whose earlier groups are ALREADY MERGED, then the group is merged (the plan's own per-tensor step) and
written in. Non-linear tensors are merged first by the method's fallback.

When memory allows only one layer's Grams per model (the memory plan's ``grams: layer``), the same results come
from collecting one layer at a time, merging it and dropping its Grams: :func:`sequential_grams` with
``keep="merged"`` (the merged weights are the probe's), and :func:`layerwise_merged` for the non-sequential
mode (a truncated forward pass per layer and model through :func:`torch.func.functional_call`, so no model is
copied into the probe).
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
    params: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Input Gram ``X^T X`` (float64, (in, in)) of each hooked ``nn.Linear`` over every token of ``batches``.

    ``normalize``: ``mean`` divides by the token count (each task weighs the same), ``sum`` keeps the sum.
    ``stop_after``: abort each forward pass once every hooked module has fired (sequential mode).
    ``params``: run the model with these weights (a state dict, used in place) instead of its own.
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
                    if params is None:
                        model(input_ids=batch.to(device))
                    else:
                        torch.func.functional_call(model, dict(params), (), {"input_ids": batch.to(device)},
                                                   strict=False)
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


def gram_bytes(grams: Mapping[str, Tensor]) -> int:
    """Bytes of a set of Grams (shared Gram objects counted once)."""
    seen = {id(g): g for g in grams.values()}
    return sum(g.numel() * g.element_size() for g in seen.values())


def sequential_grams(
    plan: MergePlan,
    states: Mapping[str, StateDict],
    batches: Sequence[Sequence[Tensor]],
    model: torch.nn.Module,
    normalize: str = "mean",
    progress: bool = False,
    keep: str = "grams",
    extra: Mapping[str, Any] | None = None,
    stats: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Grams per linear weight and kernel input, collected with the earlier groups already merged (qp sequential).

    ``batches[t]``: calibration token batches of the t-th kernel input. Each group is merged by the plan's
    per-tensor step with its Grams (``qp_grams``), exactly as the engine will merge it, so the engine's result
    equals the model the later groups were calibrated on. ``model``: a loaded copy of the base architecture to
    work in (reset to the base weights first; a search reuses one instead of loading the base per candidate).
    ``keep="merged"``: return each linear's merged weight (a view of ``model``'s, valid until the model is used
    again) instead of its Grams, which are dropped group by group; ``extra``: more kernel options for those
    merges (the qp report). ``stats["peak_gram_bytes"]``: the most Gram bytes held at once.
    """
    if keep not in ("grams", "merged"):
        raise ValueError(f"keep must be 'grams' or 'merged', got {keep!r}")
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
    out: dict[str, Any] = {}
    held = peak = 0
    for gi, group in enumerate(groups):
        per_model = [collect_grams(model, batches[t], group, normalize, stop_after=True)
                     for t in range(len(plan.input_keys))]
        now = sum(gram_bytes(pm) for pm in per_model)
        held = held + now if keep == "grams" else now
        peak = max(peak, held)
        for name in group:
            grams = [pm[name] for pm in per_model]
            w = plan.merge_tensor(name, base_state[name], [states[k][name] for k in plan.input_keys],
                                  extra_options={"qp_grams": grams, **({"qp_tensor": name, **extra} if extra else {})})
            with torch.no_grad():
                params[name].copy_(w.to(params[name].dtype))
            out[name] = grams if keep == "grams" else params[name].detach()
        del per_model
        if progress:
            print(f"[qp] sequential group {gi + 1}/{len(groups)}: {', '.join(group)}", flush=True)
    if stats is not None:
        stats["peak_gram_bytes"] = peak
    return out


def layerwise_merged(
    plan: MergePlan,
    states: Mapping[str, StateDict],
    batches: Sequence[Sequence[Tensor]],
    model: torch.nn.Module,
    activations: str = "finetuned",
    normalize: str = "mean",
    extra: Mapping[str, Any] | None = None,
    stats: dict[str, int] | None = None,
) -> dict[str, Tensor]:
    """The non-sequential qp merge of every linear weight, one layer at a time: each model's Grams of one layer
    (a forward pass stopped after that layer, with the model's own weights, or the base's for
    ``activations="base"``), that layer merged by the plan's per-tensor step, its Grams dropped. The Grams equal
    those of one full pass (same inputs at each layer), so the merge equals the all-layers one."""
    assert plan.base_key is not None
    plan = plan.for_full_tensors()
    base_state = states[plan.base_key]
    groups = _forward_groups(model, batches[0][0])
    layers: list[list[str]] = []
    last: object = object()
    for group in groups:  # consecutive groups of one layer are collected together
        layer = plan.layer_map.layer_of(group[0])
        if layers and layer == last and layer is not None:
            layers[-1].extend(group)
        else:
            layers.append(list(group))
        last = layer
    out: dict[str, Tensor] = {}
    peak = 0
    for names in layers:
        per_model = []
        for t, k in enumerate(plan.input_keys):
            weights = base_state if activations == "base" else states[k]
            per_model.append(collect_grams(model, batches[t], names, normalize, stop_after=True, params=weights))
        peak = max(peak, sum(gram_bytes(pm) for pm in per_model))
        for name in names:
            grams = [pm[name] for pm in per_model]
            out[name] = plan.merge_tensor(name, base_state[name], [states[k][name] for k in plan.input_keys],
                                          extra_options={"qp_grams": grams, "qp_tensor": name, **(extra or {})})
        del per_model
    if stats is not None:
        stats["peak_gram_bytes"] = peak
    return out
