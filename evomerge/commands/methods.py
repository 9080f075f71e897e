"""`evomerge methods`: list the merge methods with their parameters, ranges, defaults and options."""

from __future__ import annotations

import argparse
import json

from evomerge.merge.methods.registry import REGISTRY, get_method
from evomerge.merge.methods.spec import MergeMethod


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show only this method")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _text(m: MergeMethod) -> str:
    lines = [f"{m.name}: {m.doc}"]
    inputs = f"exactly {m.min_models}" if m.max_models == m.min_models else (
        f"{m.min_models}+" if m.max_models is None else f"{m.min_models}-{m.max_models}")
    base = ("required" if m.needs_base else "first input if given" if m.base_as_input
            else "optional (task vectors against it)" if m.base_optional else "not used")
    lines.append(f"  models: {inputs}; base model: {base}" + ("; seeded (random)" if m.uses_generator else "")
                 + ("; stacks layers (slices:)" if m.stacks_layers else ""))
    for p in m.params:
        scope = "per model or global" if p.per_model else "global"
        lines.append(f"  param  {p.name:<12} default {'none' if p.default is None else format(p.default, 'g'):<6} range {p.range_text():<12} {scope}: {p.doc}")
    for o in m.options:
        choices = "|".join(o.choices) if o.choices else type(o.default).__name__
        lines.append(f"  option {o.name:<12} default {o.default!s:<6} ({choices}): {o.doc}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    methods = [get_method(args.name)] if args.name else list(REGISTRY)
    if args.json:
        print(json.dumps([m.describe() for m in methods], indent=2))
    else:
        print("\n\n".join(_text(m) for m in methods))
        print("\nNumeric parameters take a number, a per-layer list (interpolated at u = layer/(L-1)) or "
              "filter entries [{filter: NAME|kind:KIND, value: ...}].")
    return 0
