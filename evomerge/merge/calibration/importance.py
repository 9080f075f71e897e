"""Parameter importance by causal intervention (APL, seed e): how much a task's loss depends on each partition.

Reset a partition of the fine-tune's task vector to the base and measure the loss change on a few task
examples (``exact``), or estimate it from one backward pass as ``|<grad L, tau^P>|`` (``gradient``); see
:mod:`evomerge.merge.kernels.apl` for the partitions and how the merge uses the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from evomerge.merge.kernels.apl import ESTIMATORS, GRAD_POINTS, LEVELS, _rows, partition_of
from evomerge.merge.kernels.common import Tensor


def _task_loss(model: torch.nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    ids, mask, labels = batch
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss


def importance(
    model: torch.nn.Module,
    base_state: Mapping[str, Tensor],
    tuned_state: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor, Tensor],
    level: str = "row",
    estimator: str = "gradient",
    grad_point: str = "finetuned",
    layer_of: Callable[[str], int | None] = lambda name: None,
    max_exact: int = 5000,
) -> dict[str, Tensor]:
    """Per-tensor importance of each row's partition (float64, shape (rows,)) for one fine-tuned model.

    ``model`` is a skeleton whose weights are overwritten (left holding ``tuned_state``). Coarse levels
    broadcast the partition's importance to its rows. Tied duplicates share their parameter's importance.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r} (choices: {', '.join(LEVELS)})")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r} (choices: {', '.join(ESTIMATORS)})")
    if grad_point not in GRAD_POINTS:
        raise ValueError(f"unknown grad_point {grad_point!r} (choices: {', '.join(GRAD_POINTS)})")
    params = dict(model.named_parameters())
    names = [n for n in params if n in tuned_state and n in base_state]
    taus = {n: (tuned_state[n].double() - base_state[n].double()) for n in names}
    model.load_state_dict(dict(tuned_state), strict=False)
    model.eval()
    out: dict[str, Tensor] = {}
    if estimator == "gradient":
        if grad_point == "midpoint":
            with torch.no_grad():
                for n in names:
                    params[n].copy_((base_state[n].double() + 0.5 * taus[n]).to(params[n].dtype))
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            _task_loss(model, batch).backward()
        contrib = {}
        for n in names:
            g = params[n].grad
            contrib[n] = torch.zeros(_rows(taus[n]).shape[0], dtype=torch.float64) if g is None else \
                _rows(g.double() * taus[n]).sum(dim=1).cpu()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n in names:
                params[n].copy_(tuned_state[n].to(params[n].dtype))
        if level == "row":
            out = {n: c.abs() for n, c in contrib.items()}
        else:
            sums: dict[str, float] = {}
            for n, c in contrib.items():
                p = partition_of(n, level, layer_of(n))
                sums[p] = sums.get(p, 0.0) + float(c.sum())
            out = {n: torch.full((c.shape[0],), abs(sums[partition_of(n, level, layer_of(n))]),
                                 dtype=torch.float64) for n, c in contrib.items()}
    else:
        with torch.no_grad():
            ref = float(_task_loss(model, batch))

            def reset_loss(pairs: Sequence[tuple[str, slice | int | None]]) -> float:
                saved = []
                for n, rows in pairs:
                    w = params[n]
                    view = w if rows is None else w[rows]
                    saved.append((n, rows, view.detach().clone()))
                    src = base_state[n].to(w.dtype)
                    if rows is None:
                        w.copy_(src)
                    else:
                        w[rows] = src[rows]
                val = float(_task_loss(model, batch))
                for n, rows, old in saved:
                    if rows is None:
                        params[n].copy_(old)
                    else:
                        params[n][rows] = old
                return abs(val - ref)

            if level == "row":
                total = sum(_rows(taus[n]).shape[0] for n in names)
                if total > max_exact:
                    raise ValueError(
                        f"exact row-level importance needs {total} forward passes (> max_exact {max_exact}); "
                        "use estimator: gradient or a coarser level"
                    )
                for n in names:
                    nrows = _rows(taus[n]).shape[0]
                    if params[n].dim() == 0:
                        out[n] = torch.tensor([reset_loss([(n, None)])], dtype=torch.float64)
                    else:
                        out[n] = torch.tensor([reset_loss([(n, r)]) for r in range(nrows)], dtype=torch.float64)
            else:
                groups: dict[str, list[str]] = {}
                for n in names:
                    groups.setdefault(partition_of(n, level, layer_of(n)), []).append(n)
                vals = {p: reset_loss([(n, None) for n in members]) for p, members in groups.items()}
                for p, members in groups.items():
                    for n in members:
                        out[n] = torch.full((_rows(taus[n]).shape[0],), vals[p], dtype=torch.float64)
    for n in tuned_state:  # tied duplicates and names outside named_parameters
        if n not in out:
            for pn, pt in params.items():
                if pn in out and n in base_state and pt.shape == tuned_state[n].shape and \
                        pt.data_ptr() == model.state_dict()[n].data_ptr():
                    out[n] = out[pn]
                    break
    return out
