"""`evomerge bench merge`: evomerge's merge engines against mergekit-yaml and against the machine's floor.

Builds (once, cached) random Llama-shaped bases and three fine-tunes each (the base plus small seeded
perturbations) in bfloat16, written with ``save_pretrained``: ~250M-parameter models with a 32,000-token
vocabulary, and a model with a Llama-3-shaped embedding (128,256 x 4,096, tied head, one small layer) where
the embedding is almost all of the model. Then, in the same run and on the same files:

- disk to disk, linear and TIES (density 0.2) for each model set, DELLA and SCE on the ~250M set: ``evomerge merge`` and ``mergekit-yaml``
  run as subprocesses on the same mergekit YAML, each timed (wall) with its own peak RSS (``os.wait4``); the
  floor is the time to read every input once and write the output once on this machine (page cache warm,
  like the merges);
- in memory (~250M models): the resident merger applying a per-layer task-arithmetic recipe and a per-layer
  TIES recipe into a live model, against the floor of copying the resident tensors (base and task vectors) once.

Both tools get the same thread budget (``--threads``, default 2, through OMP_NUM_THREADS and torch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from evomerge.bench.options import add_model_set_arguments
from evomerge.errors import ConfigError

NAME = "merge"
HELP = "time evomerge merge (disk and resident) vs mergekit-yaml and the read/write floor on ~250M Llamas"

_HIDDEN, _INTER, _HEADS = 1024, 2816, 16
_SMALL = (512, 1408, 8)
_VOCAB, _SMALL_VOCAB = 32000, 4096
# the Llama-3 row: Llama-3's vocabulary and width, one narrow layer (the embedding is ~90% of the model)
_LLAMA3 = {"vocab": 128256, "hidden": 4096, "inter": 1024, "heads": 32, "kv_heads": 8}
_LLAMA3_SMALL = {"vocab": 32000, "hidden": 1024, "inter": 256, "heads": 8, "kv_heads": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_set_arguments(parser, "quick run: ~25M-parameter models, fewer repeats", "CPU threads for every tool (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="resident applies per recipe (default 5; 2 small)")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs per tool and method, best kept (default 1; use 2+ on a shared machine)")
    parser.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit-yaml")
    parser.add_argument("--skip-resident", action="store_true", help="do not time the resident merger")
    parser.add_argument("--skip-llama3", action="store_true",
                        help="skip the Llama-3-shaped embedding row (128,256 x 4,096; ~4.7 GB of models, and "
                             "mergekit needs well over 10 GB of memory on it)")
    parser.add_argument("--only-llama3", action="store_true", help="run only the Llama-3-shaped embedding row")
    parser.add_argument("--methods", default="linear,ties,della,sce",
                        help="disk-to-disk methods (default linear,ties,della,sce; della and sce on the ~250M set)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def _parse_count(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise ConfigError(f"--params: cannot parse {text!r} (e.g. 250M, 1.5B, 30000000)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _config(params: int, small: bool) -> Any:
    """A Llama config whose parameter count is close to ``params`` (layers chosen to fit)."""
    from transformers import LlamaConfig

    hidden, inter, heads = _SMALL if small else (_HIDDEN, _INTER, _HEADS)
    vocab = _SMALL_VOCAB if small else _VOCAB
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(2, round((params - 2 * vocab * hidden - hidden) / per_layer))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                       tie_word_embeddings=False, dtype="bfloat16")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _llama3_config(small: bool) -> Any:
    """Llama-3's embedding shape (128,256 x 4,096, tied head) and one narrow layer (``small``: 32,000 x 1,024)."""
    from transformers import LlamaConfig

    c = _LLAMA3_SMALL if small else _LLAMA3
    return LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                       num_hidden_layers=1, num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                       max_position_embeddings=256, tie_word_embeddings=True, dtype="bfloat16")


def build_models(root: Path, params: int, small: bool, seed: int = 0, cfg: Any = None) -> list[Path]:
    """Base and three fine-tunes (seeded perturbations of 10% of the weights' scale) under ``root``; cached.

    ``cfg``: the model's config (default: a Llama of about ``params`` parameters, see :func:`_config`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.atomic import atomic_output_dir

    cfg = cfg if cfg is not None else _config(params, small)
    tied = "-tied" if cfg.tie_word_embeddings else ""
    key = (f"llama-{cfg.hidden_size}x{cfg.num_hidden_layers}-i{cfg.intermediate_size}-v{cfg.vocab_size}{tied}"
           f"-s{seed}-v1")
    folder = root / key
    names = ["base", "ft1", "ft2", "ft3"]
    if (folder / "complete").is_file():
        return [folder / n for n in names]
    _log(f"building benchmark models in {folder} (once) ...")
    t0 = time.perf_counter()
    with atomic_output_dir(folder, overwrite=True) as tmp:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        for i, name in enumerate(names):
            g = torch.Generator().manual_seed(seed * 100 + i)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(base[n])
                    if i:
                        scale = 0.1 * float(base[n].float().std()) if base[n].numel() > 1 else 0.01
                        scale = scale if scale > 0 else 0.01
                        flat = p.view(-1)  # in pieces: a 525M-element embedding needs no full float32 noise
                        for lo in range(0, flat.numel(), 1 << 24):
                            piece = flat[lo:lo + (1 << 24)]
                            noise = torch.randn(piece.shape, generator=g) * scale
                            piece.copy_((piece.float() + noise).to(p.dtype))
            model.save_pretrained(tmp / name)
            _log(f"  {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
                 f"({time.perf_counter() - t0:.0f} s)")
        (tmp / "complete").write_text("ok\n")
    return [folder / n for n in names]


# A child's ru_maxrss counts its parent's resident memory at the fork (Linux carries the high-water mark
# through exec), so the timed tools are started by this small process, launched before torch is imported:
# each figure is then the tool's own peak (plus the spawner's ~10 MB), not the benchmark's.
_SPAWNER = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    req = json.loads(line)
    t0 = time.perf_counter()
    proc = subprocess.Popen(req["cmd"], env=req["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    print(json.dumps({"wall": time.perf_counter() - t0, "rc": os.waitstatus_to_exitcode(status),
                      "maxrss": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime, "out": out[-20000:]}),
          flush=True)
"""


class _Spawner:
    """Runs commands from a small process and reports (wall, own peak RSS, CPU time, output) for each."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SPAWNER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, "env": env}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark's process spawner exited")
        return dict(json.loads(line))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


_spawner: _Spawner | None = None


def _run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS bytes of that child alone, combined output, its CPU seconds (user + system));
    raises on a non-zero exit. CPU time says what a run cost when other work shares the machine."""
    if _spawner is None:
        raise RuntimeError("bench merge: no spawner (run() starts it before importing torch)")
    res = _spawner.run(cmd, env)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {res['rc']}:\n{res['out'][-3000:]}")
    rss = int(res["maxrss"]) * (1 if sys.platform == "darwin" else 1024)
    return float(res["wall"]), rss, str(res["out"]), float(res["cpu"])


def _floor(inputs: list[Path], out_dir: Path) -> float:
    """Read every input tensor once (as the engine does) and write one model's worth of output once."""
    from safetensors.torch import save_file

    from evomerge.models.folder import ModelFolder

    folders = [ModelFolder.open(p) for p in inputs]
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    for name in folders[0].tensor_names:
        last = None
        for f in folders:
            last = f.get(name)
        out[name] = last
    save_file(out, str(out_dir / "floor.safetensors"), metadata={"format": "pt"})
    seconds = time.perf_counter() - t0
    (out_dir / "floor.safetensors").unlink()
    for f in folders:
        f.close()
    return seconds


def _compare(a: Path, b: Path) -> tuple[float, str, int]:
    """(largest |difference|, where, tensors differing by more than 1e-2) between two merged folders.

    Read in pieces, so comparing two Llama-3-sized embeddings needs no full-size float32 copies.
    """
    import torch

    from evomerge.models.folder import ModelFolder

    fa, fb = ModelFolder.open(a), ModelFolder.open(b)
    worst, at, n_far = 0.0, "", 0
    step = 1 << 22
    try:
        for name in fa.tensor_names:
            n = fa.info(name).numel
            d = 0.0
            buf_a = torch.empty(min(n, step), dtype=fa.dtype(name))
            buf_b = torch.empty(min(n, step), dtype=fb.dtype(name))
            for lo in range(0, n, step):
                m = min(step, n - lo)
                pa = fa.read_range(name, lo, buf_a[:m]).float()
                pb = fb.read_range(name, lo, buf_b[:m]).float()
                d = max(d, float((pa - pb).abs().max()))
            n_far += d > 1e-2
            if d > worst:
                worst, at = d, name
    finally:
        fa.close()
        fb.close()
    return worst, at, n_far


def _mergekit_configs(paths: list[Path]) -> dict[str, dict[str, Any]]:
    base, fts = str(paths[0]), [str(p) for p in paths[1:]]
    return {
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in fts],
                   "dtype": "bfloat16"},
        "ties": {"merge_method": "ties", "base_model": base,
                 "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.2}} for m in fts],
                 "parameters": {"normalize": True}, "dtype": "bfloat16"},
        **_more_configs(base, fts),
    }


def _more_configs(base: str, fts: list[str]) -> dict[str, dict[str, Any]]:
    """DELLA (random: the two tools' masks differ, so only the speed is compared) and SCE (exact)."""
    return {
        "della": {"merge_method": "della", "base_model": base,
                  "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}} for m in fts],
                  "dtype": "bfloat16"},
        "sce": {"merge_method": "sce", "base_model": base, "models": [{"model": m} for m in fts],
                "parameters": {"select_topk": 0.2}, "dtype": "bfloat16"},
    }


_RANDOM = frozenset({"della"})  # methods whose masks come from each tool's own generator
LLAMA3_METHODS = ("linear", "ties")  # the Llama-3-shaped set: DELLA/SCE there would take mergekit ~20 GB each


def _resident(paths: list[Path], threads: int, repeats: int) -> dict[str, Any]:
    import torch

    from evomerge.merge.engines.resident import ResidentMerger
    from evomerge.merge.params import ParamValue
    from evomerge.merge.recipe import ModelEntry, Recipe

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    merger = ResidentMerger(paths[0], {"ft1": paths[1], "ft2": paths[2], "ft3": paths[3]}, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    model = merger.new_model()
    n_layers = merger.layer_map.num_layers
    g = torch.Generator().manual_seed(0)

    def per_layer(lo: float, hi: float) -> list[float]:
        return [round(lo + (hi - lo) * float(v), 4) for v in torch.rand(n_layers, generator=g)]

    ta = Recipe("task_arithmetic", tuple(ModelEntry(k, {"weight": ParamValue.per_layer(per_layer(0.0, 1.0))})
                                         for k in merger.keys), base_model="base",
                parameters={"lambda": ParamValue.per_layer(per_layer(0.8, 1.2))})
    ties = Recipe("ties", tuple(ModelEntry(k, {"weight": ParamValue.per_layer(per_layer(0.3, 1.0)),
                                               "density": ParamValue.per_layer(per_layer(0.1, 0.5))})
                                for k in merger.keys), base_model="base")
    merger.copy_floor(model)
    floor = min(merger.copy_floor(model) for _ in range(max(2, repeats)))
    out: dict[str, Any] = {"load_s": load_s, "floor_s": floor, "resident_bytes": merger.resident_bytes}
    for label, recipe, reps in (("task_arithmetic", ta, repeats), ("ties", ties, max(1, repeats // 2))):
        merger.apply(recipe, into=model)  # warm-up (caches the parameter map)
        times = [merger.apply(recipe, into=model).seconds for _ in range(reps)]
        out[label] = {"seconds": min(times), "mean_s": sum(times) / len(times), "repeats": reps,
                      "x_floor": min(times) / floor}
    return out


def _mergekit_path() -> str | None:
    found = shutil.which("mergekit-yaml")
    local = Path(sys.executable).parent / "mergekit-yaml"
    return found or (str(local) if local.exists() else None)


def _disk_rows(label: str, paths: list[Path], methods: list[str], work: Path, env: dict[str, str],
               mergekit: str | None, runs: int) -> dict[str, Any]:
    """evomerge merge and mergekit-yaml on one model set, each method, interleaved runs."""
    import yaml

    out: dict[str, Any] = {}
    configs = _mergekit_configs(paths)
    for method in methods:
        config = configs[method]
        cfg_file = work / f"{label}-{method}.yml"
        cfg_file.write_text(yaml.safe_dump(config, sort_keys=False))
        inputs = paths[1:] if method == "linear" else paths
        _floor(inputs, work)  # warm the page cache for every tool alike
        floor = min(_floor(inputs, work) for _ in range(2))
        row: dict[str, Any] = {"floor_s": floor, "inputs": len(inputs)}
        ev_out = work / f"{label}-{method}-evomerge"
        mk_out = work / f"{label}-{method}-mergekit"
        ev_runs: list[dict[str, Any]] = []
        mk_runs: list[dict[str, Any]] = []
        mk_error = None
        for _ in range(max(1, runs)):  # interleaved, so both tools see the same machine load
            wall, rss, text, cpu = _run_timed([sys.executable, "-m", "evomerge", "merge", str(cfg_file), str(ev_out),
                                               "--no-progress", "--overwrite"], env)
            m = re.search(r"in ([\d.]+) s", text)
            ev_runs.append({"wall_s": wall, "peak_rss": rss, "cpu_s": cpu,
                            "engine_s": float(m.group(1)) if m else None})
            if mergekit and mk_error is None:
                shutil.rmtree(mk_out, ignore_errors=True)
                try:
                    wall, rss, _, cpu = _run_timed([mergekit, str(cfg_file), str(mk_out), "--random-seed", "0"],
                                                   env)
                    mk_runs.append({"wall_s": wall, "peak_rss": rss, "cpu_s": cpu})
                except RuntimeError as exc:  # e.g. killed for memory on the Llama-3 row: say so, keep going
                    mk_error = str(exc).splitlines()[0]
                    _log(f"  mergekit failed: {mk_error}")
        row["evomerge"] = {**min(ev_runs, key=lambda r: r["wall_s"]), "runs": ev_runs}
        if mk_runs:
            row["mergekit"] = {**min(mk_runs, key=lambda r: r["wall_s"]), "runs": mk_runs}
            row["speedup"] = row["mergekit"]["wall_s"] / row["evomerge"]["wall_s"]
            row["cpu_ratio"] = row["mergekit"]["cpu_s"] / row["evomerge"]["cpu_s"]
            row["rss_ratio"] = row["evomerge"]["peak_rss"] / row["mergekit"]["peak_rss"]
            diff, at, n_far = _compare(ev_out, mk_out)
            row["max_abs_diff_vs_mergekit"] = diff
            row["max_diff_tensor"] = at
            row["tensors_differing_over_1e-2"] = n_far
        if mk_error is not None:
            row["mergekit_error"] = mk_error
        shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(ev_out, ignore_errors=True)
        out[method] = row
        _print_disk(f"{method} ({label})", row)
    return out


def _describe(paths: list[Path]) -> tuple[int, int, str]:
    from evomerge.models.folder import ModelFolder

    ref = ModelFolder.open(paths[0])
    try:
        biggest = max(ref.tensor_names, key=lambda n: ref.info(n).numel)
        shape = " x ".join(f"{d:,}" for d in ref.shape(biggest))
        return ref.num_parameters, ref.total_bytes, f"{biggest} {shape}"
    finally:
        ref.close()


def run(args: argparse.Namespace) -> int:
    global _spawner
    threads = int(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    _spawner = _Spawner()  # before torch: the tools' peak RSS must not include this process's
    try:
        return _run(args, threads)
    finally:
        _spawner.close()
        _spawner = None


def _run(args: argparse.Namespace, threads: int) -> int:
    import torch

    torch.set_num_threads(threads)
    small = bool(args.small)
    params = _parse_count("25M" if small and args.params == "250M" else args.params)
    repeats = args.repeats or (2 if small else 5)
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    unknown = [m for m in methods if m not in ("linear", "ties", "della", "sce")]
    if unknown or not methods:
        raise ConfigError(f"--methods: {args.methods!r}; choose from linear, ties, della, sce")
    cache = args.cache
    if cache is None:
        cache = Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge") / "bench"
    sets: list[tuple[str, list[Path]]] = []
    if not args.only_llama3:
        sets.append(("base", build_models(Path(cache), params, small)))
    if not args.skip_llama3 or args.only_llama3:
        sets.append(("llama3", build_models(Path(cache), 0, small, cfg=_llama3_config(small))))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    mergekit = None if args.skip_mergekit else _mergekit_path()
    results: dict[str, Any] = {"threads": threads, "disk": {}, "sets": {}}
    work = Path(tempfile.mkdtemp(prefix="evomerge-bench-merge-", dir=str(cache)))
    try:
        for label, paths in sets:
            n_params, nbytes, biggest = _describe(paths)
            results["sets"][label] = {"params": n_params, "model_bytes": nbytes, "largest_tensor": biggest,
                                      "models": [str(p) for p in paths]}
            _log(f"\nevomerge bench merge [{label}]: base + 3 fine-tunes of {n_params / 1e6:.1f}M parameters "
                 f"(bf16, {nbytes / 1e9:.2f} GB each; largest tensor {biggest}), {threads} threads, CPU")
            wanted = methods if label == "base" else [m for m in methods if m in LLAMA3_METHODS]
            rows = _disk_rows(label, paths, wanted, work, env, mergekit, args.runs)
            if label == "base":
                results["params"], results["model_bytes"] = n_params, nbytes
                results["disk"].update(rows)
            else:
                results["disk"].update({f"{m}-{label}": r for m, r in rows.items()})
        base_set = dict(sets).get("base")
        if not args.skip_resident and base_set is not None:
            results["resident"] = _resident(base_set, threads, repeats)
            _print_resident(results["resident"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _span(runs: list[dict[str, Any]], key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    """``best`` or ``best (range lo-hi)`` over repeated runs."""
    values = [r[key] / scale for r in runs]
    if len(values) < 2:
        return fmt.format(values[0])
    return f"{fmt.format(min(values))} (range {fmt.format(min(values))}-{fmt.format(max(values))})"


def _print_disk(method: str, row: dict[str, Any]) -> None:
    ev = row["evomerge"]
    eng = f" (engine {ev['engine_s']:.2f} s)" if ev.get("engine_s") is not None else ""
    _log(f"\n{method}: floor (read {row['inputs']} inputs once + write the output once) {row['floor_s']:.2f} s")
    runs = f" [best of {len(ev['runs'])}]" if len(ev.get("runs", [])) > 1 else ""
    _log(f"  evomerge  wall {_span(ev['runs'], 'wall_s')} s{eng}{runs}  CPU {_span(ev['runs'], 'cpu_s')} s  peak RSS "
         f"{_span(ev['runs'], 'peak_rss', 1e9)} GB  ({ev['wall_s'] / row['floor_s']:.1f}x floor)")
    if "mergekit" in row:
        mk = row["mergekit"]
        _log(f"  mergekit  wall {_span(mk['runs'], 'wall_s')} s  CPU {_span(mk['runs'], 'cpu_s')} s  peak RSS "
             f"{_span(mk['runs'], 'peak_rss', 1e9)} GB  ({mk['wall_s'] / row['floor_s']:.1f}x floor)")
        _log(f"  evomerge is {row['speedup']:.2f}x faster ({row['cpu_ratio']:.2f}x less CPU time), peak RSS "
             f"{row['rss_ratio']:.2f}x mergekit's; "
             f"max |evomerge - mergekit| = {row['max_abs_diff_vs_mergekit']:.3g}"
             + (" (random drops: each tool draws its own masks)" if method in _RANDOM else
                f" (at {row['max_diff_tensor']}; {row['tensors_differing_over_1e-2']} tensors differ by > 1e-2:"
                " top-k ties among bf16-quantized deltas are broken by index here, arbitrarily in mergekit)"
                if row["max_abs_diff_vs_mergekit"] > 1e-2 else ""))
    elif "mergekit_error" in row:
        _log(f"  mergekit-yaml failed: {row['mergekit_error']}")
    else:
        _log("  mergekit-yaml not run (not installed, or --skip-mergekit)")


def _print_resident(res: dict[str, Any]) -> None:
    _log(f"\nresident merger (float32, {res['resident_bytes'] / 1e9:.2f} GB resident, loaded in {res['load_s']:.1f} s):"
         f" floor (copy every resident tensor once) {res['floor_s']:.3f} s")
    for label in ("task_arithmetic", "ties"):
        r = res[label]
        _log(f"  per-layer {label:<16} {r['seconds']:.3f} s per apply (best of {r['repeats']}; "
             f"{r['x_floor']:.2f}x floor)")
