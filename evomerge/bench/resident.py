"""`evomerge bench resident`: the resident merger in each memory tier, against the floor of copying its store once.

On the ~250M-parameter bfloat16 models of `evomerge bench merge` (a base and three fine-tunes, built once and
cached), each tier runs in its own process (so its peak RSS is its own): the merger is built, then a
per-layer task-arithmetic recipe and a per-layer TIES recipe (density 0.1-0.5) are applied into one live
model, best of ``--repeats``, next to the floor (copying every stored tensor once into the live model, as the
tier reads it: the resident tensors for device and cpu, the mapped files for disk) and the process's peak
RSS. ``--lora`` adds rows for three rank-16 LoRA adapters of the same base, kept factored.

On a CPU device the device and cpu tiers are the same store in host memory (the table says so); the disk
tier's figures are with the page cache warm (the files were just read), which is the steady state of a
search on a machine whose memory holds the files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from evomerge.atomic import atomic_output_dir
from evomerge.bench.merge import _parse_count, build_models
from evomerge.bench.options import add_model_set_arguments
from evomerge.errors import ConfigError
from evomerge.merge.engines.disk import peak_rss_bytes
from evomerge.merge.engines.resident import ResidentMerger
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.paths import cache_root

NAME = "resident"
HELP = "resident merge per memory tier (device, cpu, disk) on ~250M bf16 models: time per apply, copy floor, peak RSS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_set_arguments(parser, "quick run: ~25M-parameter models", "CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="applies per recipe (default 3; 2 small)")
    parser.add_argument("--tiers", nargs="+", default=["device", "cpu", "disk"], choices=("device", "cpu", "disk"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="resident dtype (default float32, as bench merge)")
    parser.add_argument("--lora", action="store_true", help="also three rank-16 LoRA adapters (factored store)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one tier in this process


def build_adapters(root: Path, base: Path, rank: int = 16, seed: int = 0) -> list[Path]:
    """Three PEFT LoRA adapters (attention and MLP projections, rank ``rank``) of the benchmark base; cached."""

    folder = root / f"{base.parent.name}-lora-r{rank}-s{seed}-v1"
    names = ["lora1", "lora2", "lora3"]
    if (folder / "complete").is_file():
        return [folder / n for n in names]
    import peft

    print(f"building benchmark adapters in {folder} (once) ...", flush=True)
    with atomic_output_dir(folder, overwrite=True) as tmp:
        for i, name in enumerate(names):
            model = AutoModelForCausalLM.from_pretrained(str(base))
            cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
            pm = peft.get_peft_model(model, cfg)
            g = torch.Generator().manual_seed(seed * 100 + i)
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
            pm.save_pretrained(tmp / name)
        (tmp / "complete").write_text("ok\n")
    return [folder / n for n in names]


def _one(tier: str, paths: list[str], device: str, dtype: str, repeats: int, threads: int) -> dict[str, Any]:
    """Build the merger in ``tier``, time the floor and both recipes (runs in the child process)."""

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    merger = ResidentMerger(paths[0], {f"ft{i}": p for i, p in enumerate(paths[1:], 1)}, device=device,
                            dtype=dtype, resident=tier)
    load_s = time.perf_counter() - t0
    model = merger.new_model()
    n_layers = merger.layer_map.num_layers
    g = torch.Generator().manual_seed(0)

    def per_layer(lo: float, hi: float) -> ParamValue:
        return ParamValue.per_layer([round(lo + (hi - lo) * float(v), 4) for v in torch.rand(n_layers, generator=g)])

    ta = Recipe("task_arithmetic", tuple(ModelEntry(k, {"weight": per_layer(0.0, 1.0)}) for k in merger.keys),
                base_model="base", parameters={"lambda": per_layer(0.8, 1.2)})
    ties = Recipe("ties", tuple(ModelEntry(k, {"weight": per_layer(0.3, 1.0), "density": per_layer(0.1, 0.5)})
                                for k in merger.keys), base_model="base")
    merger.copy_floor(model)
    floor = min(merger.copy_floor(model) for _ in range(max(2, repeats)))
    out: dict[str, Any] = {"tier": tier, "load_s": load_s, "floor_s": floor, "store": merger.store_bytes(),
                           "adapters": len(merger.adapter_keys)}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for label, recipe, reps in (("task_arithmetic", ta, repeats), ("ties", ties, max(1, repeats - 1))):
        merger.apply(recipe, into=model)  # warm-up
        times = [merger.apply(recipe, into=model).seconds for _ in range(reps)]
        out[label] = {"seconds": min(times), "mean_s": sum(times) / len(times), "repeats": reps,
                      "x_floor": min(times) / floor if floor > 0 else float("nan")}
    out["peak_rss"] = peak_rss_bytes()
    if device.startswith("cuda"):
        out["peak_cuda"] = int(torch.cuda.max_memory_allocated())
    merger.close()
    return out


def run_tiers(paths: list[Path], tiers: list[str], *, device: str, dtype: str, repeats: int, threads: int
              ) -> list[dict[str, Any]]:
    """One child process per tier (its own peak RSS); returns their figures in order."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    rows = []
    for tier in tiers:
        spec = json.dumps({"tier": tier, "paths": [str(p) for p in paths], "device": device, "dtype": dtype,
                           "repeats": repeats, "threads": threads})
        proc = subprocess.run([sys.executable, "-m", "evomerge", "bench", "resident", "--one", spec], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench resident ({tier} tier) failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def print_rows(rows: list[dict[str, Any]], label: str, on_cpu: bool) -> None:
    print(f"\n{label}")
    print(f"  {'tier':<7}{'load s':>8}{'floor s':>9}{'TA s':>9}{'x floor':>8}{'TIES s':>9}{'x floor':>8}"
          f"{'store':>11}{'peak RSS':>10}" + ("" if on_cpu else f"{'peak GPU':>10}"))
    for r in rows:
        store = r["store"]
        held = store["device"] + store["host"]
        line = (f"  {r['tier']:<7}{r['load_s']:>8.1f}{r['floor_s']:>9.3f}{r['task_arithmetic']['seconds']:>9.3f}"
                f"{r['task_arithmetic']['x_floor']:>8.2f}{r['ties']['seconds']:>9.3f}{r['ties']['x_floor']:>8.2f}"
                f"{held / 1e9:>9.2f}GB{r['peak_rss'] / 1e9:>8.2f}GB")
        if not on_cpu:
            line += f"{r.get('peak_cuda', 0) / 1e9:>8.2f}GB"
        print(line + (f"  (+{store['mapped'] / 1e9:.2f} GB mapped)" if store["mapped"] else ""))
    if on_cpu and {"device", "cpu"} <= {r["tier"] for r in rows}:
        print("  on a CPU device the device and cpu tiers are the same store in host memory: their rows differ only "
              "by noise")


def run(args: argparse.Namespace) -> int:
    if args.one is not None:
        spec = json.loads(args.one)
        print(json.dumps(_one(spec["tier"], spec["paths"], spec["device"], spec["dtype"], spec["repeats"],
                              spec["threads"])))
        return 0

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available on this machine")
    params = _parse_count("25M" if args.small and args.params == "250M" else args.params)
    repeats = args.repeats or (2 if args.small else 3)
    cache = args.cache or cache_root() / "bench"
    paths = build_models(Path(cache), params, args.small)
    print(f"evomerge bench resident: base + 3 fine-tunes of ~{params / 1e6:.0f}M parameters (bf16 files), "
          f"resident {args.dtype} on {args.device}, {args.threads} threads; each tier in its own process",
          flush=True)
    on_cpu = not args.device.startswith("cuda")
    results: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "threads": args.threads,
                               "params": params, "full": run_tiers(paths, args.tiers, device=args.device,
                                                                   dtype=args.dtype, repeats=repeats,
                                                                   threads=args.threads)}
    print_rows(results["full"], "three full fine-tunes (dense task vectors)", on_cpu)
    if args.lora:
        adapters = build_adapters(Path(cache), paths[0])
        results["lora"] = run_tiers([paths[0], *adapters], args.tiers, device=args.device, dtype=args.dtype,
                                    repeats=repeats, threads=args.threads)
        print_rows(results["lora"], "three rank-16 LoRA adapters (factored: A and B only)", on_cpu)
    print("\nfloor = copying every stored tensor once into the live model (what the tier reads); TA = per-layer task "
          "arithmetic (fused addmm), TIES = per-layer TIES (kernel per tensor); best of the repeats.")
    if args.json:
        with tempfile.NamedTemporaryFile("w", delete=False, dir=str(Path(args.json).resolve().parent)) as fh:
            json.dump(results, fh, indent=2)
        os.replace(fh.name, args.json)
    return 0
