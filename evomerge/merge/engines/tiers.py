"""The memory plan of a resident worker: what each memory tier needs, what the machine has, which tier to use.

Everything comes from configs and safetensors headers (no tensor is read), so the plan also works on a
config-only stand-in of the models and runs before anything is loaded. Per worker it counts, in bytes:

- the live model (every candidate is merged into it and scored) and the base;
- one task vector per full fine-tune, in the resident dtype; for a LoRA adapter its factors (float32) and any
  tensor it stores in full;
- the merge workspace: one tensor's temporaries, for the largest tensor, ``(T + 3) * n * 4`` bytes (the
  kernels compute in float32 over T inputs), plus, in the streaming tiers, that tensor's inputs on the device;
- evaluation activations: ``batch * tokens * (max(3 * intermediate, 2 * vocab) + 2 * hidden) * itemsize``
  (the MLP's intermediate activations or the logits and their log-softmax, whichever is larger; ``tokens`` is
  the context, at most 2048, lm-eval's default maximum length). Merging and scoring never overlap, so the
  device needs the larger of the workspace and the activations;
- calibration for the data-aware methods ``qp`` and ``apl`` (host memory: their probe model runs on the CPU):
  every model's weights in float32 (they are loaded to run the calibration rows), and for ``qp`` the input
  Gram matrices, ``d_in x d_in`` float64 per distinct linear input (q/k/v share one, gate/up share one) per
  model, for every layer or, when that does not fit, for one layer at a time.

Tiers: ``device`` holds the store on the device; ``cpu`` in (pinned) host memory, streamed to the device tensor by
tensor; ``disk`` maps the safetensors files (the page cache holds what fits). On a CPU device, device memory
is host memory and ``device`` and ``cpu`` coincide. ``auto`` takes the first of device, cpu, disk that fits,
keeping a reserve (0.5 GB + 2% of the device; 1 GB + 5% of the host). The merge time per candidate is the
bytes each tier moves divided by bandwidths measured by a short probe on the real tensors (``probe``), or
else stated ones (listed in the plan).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.dtypes import parse_dtype
from evomerge.errors import ConfigError, ModelError
from evomerge.models.adapter import is_adapter_folder, read_adapter_layout, split_ref
from evomerge.models.folder import FolderLayout, ModelFolder, read_layout
from evomerge.models.layers import LayerMap
from evomerge.paths import resolve_path

TIERS: tuple[str, ...] = ("device", "cpu", "disk")
RESIDENT_CHOICES: tuple[str, ...] = (*TIERS, "auto")
DATA_METHODS: tuple[str, ...] = ("qp", "apl")
# stated bandwidths (bytes/s) when no probe runs: conservative figures for a current server
STATED = {"cuda_memory": 1.0e12, "host_to_cuda": 12e9, "cpu_memory": 8e9, "file_read": 2e9}
MAX_CONTEXT = 2048
_SHARED_INPUT = (
    (re.compile(r"\.(q_proj|k_proj|v_proj)\.weight$"), "attn_in"),
    (re.compile(r"\.(gate_proj|up_proj)\.weight$"), "mlp_in"),
    (re.compile(r"\.(w1|w3)\.weight$"), "mlp_in"),
)


def gb(n: float | int | None) -> str:
    """A byte count in decimal units (as GPU memory is quoted): GB, MB or kB."""
    if n is None:
        return "?"
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


@dataclass(frozen=True)
class ModelBytes:
    """One fine-tune's share of the store."""

    key: str
    kind: str  # "full" or "lora"
    task_vector_bytes: int  # dense task vector in the resident dtype (full fine-tunes)
    factor_bytes: int  # LoRA factors, float32
    own_bytes: int  # tensors an adapter stores in full, in the resident dtype
    rank: int | None = None

    @property
    def total(self) -> int:
        return self.task_vector_bytes + self.factor_bytes + self.own_bytes


@dataclass(frozen=True)
class Calibration:
    """Host memory a data-aware method needs while preparing one recipe."""

    method: str
    states_bytes: int  # every model of the recipe loaded in float32 (+ the probe)
    grams_all_bytes: int  # qp: every layer's Grams of every model (float64)
    grams_layer_bytes: int  # qp: one layer's Grams of every model
    gradient_bytes: int  # apl: one model's gradients (float32)
    grams_mode: str = "all"  # what the plan lets qp keep: "all" layers, or one "layer" at a time
    merged_bytes: int = 0  # qp one layer at a time: the merged linear weights (float32) until the engine writes them

    @property
    def bytes(self) -> int:
        if self.grams_mode == "all":
            return self.states_bytes + self.grams_all_bytes + self.gradient_bytes
        return self.states_bytes + self.grams_layer_bytes + self.merged_bytes + self.gradient_bytes


@dataclass
class TierPlan:
    """What one tier needs on the device and in host memory, whether it fits, and its merge time."""

    tier: str
    device_bytes: int
    host_bytes: int
    mapped_bytes: int
    fits: bool = False
    why: str = ""
    merge_seconds: float | None = None
    merge_basis: str = ""


@dataclass
class ResidentPlan:
    """The memory plan of one worker (see the module docstring)."""

    device: str
    dtype: str
    workers: int
    device_memory: int | None
    device_memory_source: str
    host_memory: int | None
    host_memory_source: str
    live_model_bytes: int
    base_bytes: int
    stored_bytes: int  # the base and fine-tunes as stored on disk
    models: list[ModelBytes]
    workspace_bytes: int
    stream_bytes: int
    eval_bytes: int
    eval_basis: str
    calibration: list[Calibration]
    tiers: dict[str, TierPlan]
    requested: str
    choice: str | None
    why: str
    bandwidths: dict[str, float] = field(default_factory=dict)
    bandwidth_basis: str = "stated"
    notes: list[str] = field(default_factory=list)

    @property
    def on_cpu(self) -> bool:
        return not self.device.startswith("cuda")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tiers"] = {k: asdict(v) for k, v in self.tiers.items()}
        return out

    def require_fit(self, where: str = "resident") -> str:
        """The tier to use; ConfigError naming the numbers when none fits (or the requested tier does not)."""
        if self.choice is None:
            raise ConfigError(f"{where}: nothing fits this worker: {self.why}")
        return self.choice

    def table(self) -> str:
        """The plan as text (``evomerge plan`` and the start of ``evomerge run``)."""
        full = [m for m in self.models if m.kind == "full"]
        loras = [m for m in self.models if m.kind == "lora"]
        per = f" (each of {self.workers} workers)" if self.workers > 1 else ""
        lines = [f"memory plan per worker{per}: device {self.device}, dtype {self.dtype}",
                 f"  live model            {gb(self.live_model_bytes):>11}",
                 f"  base (store)          {gb(self.base_bytes):>11}"]
        if full:
            lines.append(f"  task vectors          {gb(sum(m.total for m in full)):>11}  ({len(full)} full fine-tune"
                         f"{'s' if len(full) > 1 else ''}: {', '.join(m.key for m in full)})")
        if loras:
            ranks = sorted({m.rank for m in loras if m.rank})
            lines.append(f"  LoRA factors          {gb(sum(m.total for m in loras)):>11}  ({len(loras)} adapter"
                         f"{'s' if len(loras) > 1 else ''}, rank {'/'.join(map(str, ranks)) or '?'}: "
                         f"{', '.join(m.key for m in loras)})")
        lines.append(f"  merge workspace       {gb(self.workspace_bytes):>11}  (largest tensor's temporaries; "
                     f"+{gb(self.stream_bytes)} of streamed inputs in the cpu and disk tiers)")
        lines.append(f"  evaluation            {gb(self.eval_bytes):>11}  ({self.eval_basis})")
        for c in self.calibration:
            if c.method == "qp":
                lines.append(f"  calibration (qp)      {gb(c.bytes):>11}  (host: {gb(c.states_bytes)} model weights in "
                             f"float32; Grams {gb(c.grams_all_bytes)} for all layers, {gb(c.grams_layer_bytes)} for "
                             f"one layer: keeps {'all layers' if c.grams_mode == 'all' else 'one layer at a time'})")
            else:
                lines.append(f"  calibration ({c.method})     {gb(c.bytes):>11}  (host: {gb(c.states_bytes)} model "
                             f"weights in float32, {gb(c.gradient_bytes)} of gradients)")
        lines.append(f"  device memory found   {gb(self.device_memory):>11}  ({self.device_memory_source})")
        lines.append(f"  host memory found     {gb(self.host_memory):>11}  ({self.host_memory_source})")
        lines.append(f"  {'tier':<8}{'device':>11}{'host':>11}{'mapped':>11}  {'fits':<5} merge/candidate")
        for t in self.tiers.values():
            est = "?" if t.merge_seconds is None else f"{t.merge_seconds:.3g} s ({t.merge_basis})"
            lines.append(f"  {t.tier:<8}{gb(t.device_bytes):>11}{gb(t.host_bytes):>11}{gb(t.mapped_bytes):>11}  "
                         f"{'yes' if t.fits else 'no':<5} {est}")
            if not t.fits:
                lines.append(f"  {'':<8}{t.why}")
        picked = self.choice or "nothing fits"
        lines.append(f"  resident: {self.requested} -> {picked}: {self.why}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- memory found


def host_memory_available() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_available(device: str) -> tuple[int | None, str]:
    """(free bytes, how it was found) of a CUDA device; host memory for the CPU."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None, "CUDA is not available on this machine"
        dev = torch.device(device)
        free, total = torch.cuda.mem_get_info(dev)
        return int(free), f"free on {torch.cuda.get_device_name(dev)}, {gb(total)} in all"
    return host_memory_available(), "CPU device: host memory (MemAvailable)"


# ------------------------------------------------------------------------------------------- layouts


def _layout(path: Path, where: str) -> FolderLayout:
    try:
        return read_layout(path)
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from None


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _linear_groups(layout: FolderLayout, layer_map: LayerMap) -> dict[int | None, dict[str, int]]:
    """Per layer (None: outside the stack), the distinct linear inputs and their width ``d_in``."""
    out: dict[int | None, dict[str, int]] = {}
    for name, (dtype, shape) in layout.tensors.items():
        if len(shape) != 2 or not name.endswith(".weight") or not _is_float(dtype):
            continue
        kind = layer_map.kind_of(name)
        if kind not in ("attention", "mlp", "head"):
            continue
        layer = layer_map.layer_of(name)
        role = next((r for rx, r in _SHARED_INPUT if rx.search(name)), name)
        out.setdefault(layer, {})[role] = int(shape[1])
    return out


def _context(config: Mapping[str, Any]) -> int:
    pos = config.get("max_position_embeddings")
    if not isinstance(pos, int) and isinstance(config.get("text_config"), Mapping):
        pos = config["text_config"].get("max_position_embeddings")
    return min(int(pos), MAX_CONTEXT) if isinstance(pos, int) and pos > 0 else MAX_CONTEXT


def _cfg_int(config: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    text = config.get("text_config")
    return _cfg_int(text, *keys) if isinstance(text, Mapping) else 0


# ------------------------------------------------------------------------------------------- the plan


def plan_resident(
    base: str | os.PathLike[str],
    models: Mapping[str, str | os.PathLike[str]],
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = torch.float32,
    resident: str = "auto",
    workers: int = 1,
    device_memory: int | None = None,
    host_memory: int | None = None,
    methods: Sequence[str] = (),
    pair_models: int | None = None,
    eval_batch: int = 32,
    eval_tokens: int | None = None,
    probe: bool = False,
) -> ResidentPlan:
    """The memory plan of one worker merging ``models`` (fine-tune folders or LoRA adapters) over ``base``.

    ``device_memory`` / ``host_memory``: bytes available (default: found on this machine; host memory is shared
    by the ``workers`` of one machine). ``methods``: the methods the search may use (qp/apl add calibration);
    ``pair_models``: inputs of a population pair merge (2) when that is what calibrates. ``probe``: time a few
    real tensors for the bandwidths (skipped when the files hold no data).
    """
    if resident not in RESIDENT_CHOICES:
        raise ConfigError(f"resident: {resident!r} is not one of {list(RESIDENT_CHOICES)}")
    rdtype = parse_dtype(dtype, "dtype")
    assert rdtype is not None
    item = rdtype.itemsize
    base_path = resolve_path(base)
    base_layout = _layout(base_path, "models.base")
    layer_map = LayerMap.from_config(base_layout.config)
    floats = {n: s for n, (d, s) in base_layout.tensors.items() if _is_float(d)}
    others = {n: (d, s) for n, (d, s) in base_layout.tensors.items() if not _is_float(d)}
    model_bytes = sum(math.prod(s) for s in floats.values()) * item + sum(
        math.prod(s) * d.itemsize for d, s in others.values())
    stored = base_layout.total_bytes()
    entries: list[ModelBytes] = []
    for key, ref in models.items():
        explicit, part = split_ref(str(ref))
        path = resolve_path(part)
        if is_adapter_folder(path):
            layout = read_adapter_layout(path)
            factor = sum((f.a.numel + f.b.numel) * 4 for f in layout.factors.values())
            own = sum(math.prod(info.shape) * item for info in layout.replaced.values())
            ranks = sorted({f.rank for f in layout.factors.values()})
            entries.append(ModelBytes(key, "lora", 0, factor, own, ranks[-1] if ranks else None))
            stored += layout.factor_bytes + sum(i.numel * i.dtype.itemsize for i in layout.replaced.values())
        else:
            fl = _layout(path, f"models.fine_tunes.{key}")
            entries.append(ModelBytes(key, "full", model_bytes - sum(
                math.prod(s) * d.itemsize for d, s in others.values()), 0, 0))
            stored += fl.total_bytes()
    n_inputs = len(entries)
    dense = [m for m in entries if m.kind == "full"]
    store_bytes = model_bytes + sum(m.total for m in entries)
    largest = max((math.prod(s) for s in floats.values()), default=0)
    workspace = (n_inputs + 3) * largest * 4
    stream = (len(dense) + 1) * largest * item
    cfg = base_layout.config
    hidden = _cfg_int(cfg, "hidden_size", "n_embd", "d_model")
    inter = _cfg_int(cfg, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    vocab = _cfg_int(cfg, "vocab_size")
    tokens = int(eval_tokens) if eval_tokens else _context(cfg)
    eval_bytes = int(eval_batch) * tokens * (max(3 * inter, 2 * vocab) + 2 * hidden) * item
    eval_basis = (f"batch {eval_batch} x {tokens} tokens x (max(3 x {inter} intermediate, 2 x {vocab} vocab) + "
                  f"2 x {hidden} hidden) x {item} bytes")

    # ---- memory found
    dev_source = "given"
    if device_memory is None:
        device_memory, dev_source = device_memory_available(device)
    host_source = "given"
    if host_memory is None:
        host_memory, host_source = host_memory_available(), "MemAvailable on this machine"
    notes: list[str] = []
    on_cpu = not device.startswith("cuda")
    workers = max(1, int(workers))
    host_share = None if host_memory is None else host_memory // workers
    if workers > 1:
        host_source += f"; {gb(host_share)} per worker ({workers} workers share the machine)"
    if on_cpu:
        device_memory = host_share
        dev_source = "CPU device: its memory is the host's"
        notes.append("on a CPU device the device and cpu tiers coincide (the store lives in host memory either way)")

    # ---- calibration (host memory, decided after the store: qp's Grams shrink to one layer if needed)
    calib: list[Calibration] = []
    wanted = [m for m in dict.fromkeys(methods) if m in DATA_METHODS]
    t_calib = pair_models if pair_models is not None else max(1, n_inputs)
    float32_model = sum(math.prod(s) for s in floats.values()) * 4
    groups = _linear_groups(base_layout, layer_map)
    per_layer = {layer: sum(d * d * 8 for d in g.values()) for layer, g in groups.items()}
    grams_all = t_calib * sum(per_layer.values())
    grams_layer = t_calib * max(per_layer.values(), default=0)
    for m in wanted:
        states = (t_calib + 2) * float32_model  # base, each input, and the probe model
        if m == "qp":
            calib.append(Calibration("qp", states, grams_all, grams_layer, 0, merged_bytes=float32_model))
        else:
            calib.append(Calibration("apl", states, 0, 0, float32_model))

    # ---- tiers
    dev_reserve = 0 if device_memory is None else int(0.5e9 + 0.02 * device_memory)
    host_reserve = 0 if host_share is None else int(1e9 + 0.05 * host_share)
    run_peak = max(workspace, eval_bytes)
    tiers: dict[str, TierPlan] = {}
    mapped_files = 0 if not dense and not entries else stored
    tiers["device"] = TierPlan("device", model_bytes + store_bytes + run_peak, 0, 0)
    tiers["cpu"] = TierPlan("cpu", model_bytes + max(workspace + stream, eval_bytes), store_bytes, 0)
    lora_host = sum(m.factor_bytes for m in entries if m.kind == "lora")
    tiers["disk"] = TierPlan("disk", model_bytes + max(workspace + stream, eval_bytes), lora_host, mapped_files)
    if on_cpu:  # one memory: the device needs are host needs
        for t in tiers.values():
            t.host_bytes += t.device_bytes
            t.device_bytes = 0
        tiers["cpu"].host_bytes = tiers["device"].host_bytes
    calib_host = sum(c.bytes for c in calib)
    for t in tiers.values():
        _decide(t, device_memory, dev_reserve, host_share, host_reserve, calib_host, on_cpu)
    # qp keeps one layer's Grams at a time when all layers do not fit next to the store
    if any(c.method == "qp" for c in calib) and _first_fit(tiers, resident) is None:
        calib = [dataclasses.replace(c, grams_mode="layer") if c.method == "qp" else c for c in calib]
        calib_host = sum(c.bytes for c in calib)
        for t in tiers.values():
            _decide(t, device_memory, dev_reserve, host_share, host_reserve, calib_host, on_cpu)

    # ---- merge time
    bandwidths, basis = dict(STATED), "stated"
    if probe:
        measured = probe_bandwidths(base_path, device)
        if measured:
            bandwidths.update(measured)
            basis = "probe"
    dev_bw = bandwidths["cuda_memory"] if not on_cpu else bandwidths["cpu_memory"]
    moved_device = store_bytes + model_bytes  # read the store, write the live model
    tiers["device"].merge_seconds = moved_device / dev_bw
    tiers["device"].merge_basis = f"{gb(moved_device)} at {dev_bw / 1e9:.1f} GB/s {basis}"
    if on_cpu:
        tiers["cpu"].merge_seconds = tiers["device"].merge_seconds
        tiers["cpu"].merge_basis = tiers["device"].merge_basis + " (same as device)"
    else:
        link = bandwidths["host_to_cuda"]
        tiers["cpu"].merge_seconds = store_bytes / link + moved_device / dev_bw
        tiers["cpu"].merge_basis = f"{gb(store_bytes)} host->device at {link / 1e9:.1f} GB/s {basis} + device pass"
    read = bandwidths["file_read"]
    # the disk tier reads the base once per model (each task vector is taken against it) and every fine-tune
    disk_read = stored + model_bytes * len(dense)
    tiers["disk"].merge_seconds = disk_read / read + (0 if on_cpu else disk_read / bandwidths["host_to_cuda"]) + \
        moved_device / dev_bw
    tiers["disk"].merge_basis = (f"{gb(disk_read)} read from the files at {read / 1e9:.1f} GB/s {basis} (page cache "
                                 "hits are faster)")

    choice, why = _choose(tiers, resident, calib)
    return ResidentPlan(
        device=device, dtype=str(rdtype).removeprefix("torch."), workers=workers, device_memory=device_memory,
        device_memory_source=dev_source, host_memory=host_memory, host_memory_source=host_source,
        live_model_bytes=model_bytes, base_bytes=model_bytes, stored_bytes=stored, models=entries,
        workspace_bytes=workspace, stream_bytes=stream, eval_bytes=eval_bytes, eval_basis=eval_basis,
        calibration=calib, tiers=tiers, requested=resident, choice=choice, why=why, bandwidths=bandwidths,
        bandwidth_basis=basis, notes=notes,
    )


def _decide(t: TierPlan, device_memory: int | None, dev_reserve: int, host: int | None, host_reserve: int,
            calib_host: int, on_cpu: bool) -> None:
    need_host = t.host_bytes + calib_host
    problems = []
    if not on_cpu and device_memory is not None and t.device_bytes > device_memory - dev_reserve:
        problems.append(f"needs {gb(t.device_bytes)} of device memory, {gb(device_memory)} found "
                        f"(less a {gb(dev_reserve)} reserve)")
    if not on_cpu and device_memory is None:
        t.why = "device memory not found on this machine: each worker checks its own device when it starts"
    if host is not None and need_host > host - host_reserve:
        what = "memory" if on_cpu else "host memory"
        problems.append(f"needs {gb(need_host)} of {what}"
                        + (f" ({gb(calib_host)} of it calibration)" if calib_host else "")
                        + f", {gb(host)} found (less a {gb(host_reserve)} reserve)")
    t.fits = not problems
    if problems or device_memory is not None or on_cpu:
        t.why = "; ".join(problems)


def _first_fit(tiers: Mapping[str, TierPlan], resident: str) -> str | None:
    order = list(TIERS) if resident == "auto" else [resident]
    return next((k for k in order if tiers[k].fits), None)


def _choose(tiers: Mapping[str, TierPlan], resident: str, calib: Sequence[Calibration]) -> tuple[str | None, str]:
    layered = any(c.method == "qp" and c.grams_mode == "layer" for c in calib)
    suffix = "; qp keeps one layer's Grams at a time (all layers do not fit)" if layered else ""
    if resident != "auto":
        t = tiers[resident]
        if t.fits:
            return resident, f"as the space asks{suffix}"
        return None, f"resident: {resident} {t.why}"
    for k in TIERS:
        if tiers[k].fits:
            skipped = [f"{s} {tiers[s].why}" for s in TIERS[:TIERS.index(k)]]
            if k == "device":
                return k, f"the store fits the device{suffix}"
            return k, "; ".join(skipped) + suffix
    return None, "; ".join(f"{k} {tiers[k].why}" for k in TIERS)


# ------------------------------------------------------------------------------------------- probe


def _timed(fn: Any, nbytes: int, min_bytes: int = 64 << 20, min_seconds: float = 0.05) -> float:
    """Bytes per second of ``fn`` (moving ``nbytes`` per call), repeated until enough was moved to time."""
    done, t0 = 0, time.perf_counter()
    while True:
        fn()
        done += nbytes
        elapsed = time.perf_counter() - t0
        if done >= min_bytes and elapsed >= min_seconds:
            return done / elapsed


def probe_bandwidths(base: Path, device: str, limit_bytes: int = 64 << 20) -> dict[str, float]:
    """Bandwidths measured on up to ``limit_bytes`` of the base's real tensors (repeated until at least 64 MB
    moved): file read (the page cache, once warm), a host copy and, on CUDA, pinned host-to-device and device
    copies. Empty when the files hold no data (a stand-in)."""
    try:
        folder = ModelFolder.open(base)
    except ModelError:
        return {}
    try:
        names = sorted(folder.tensor_names, key=lambda n: -folder.nbytes(n))
        chosen, total = [], 0
        for n in names:
            if total >= limit_bytes:
                break
            chosen.append(n)
            total += folder.nbytes(n)
        if not total:
            return {}
        tensors = [folder.get(n) for n in chosen]
        out = {"file_read": _timed(lambda: [folder.get(n) for n in chosen], total),
               "cpu_memory": 2 * _timed(lambda: [t.clone() for t in tensors], total)}
        if device.startswith("cuda") and torch.cuda.is_available():
            dev = torch.device(device)
            pinned = [t.pin_memory() for t in tensors]
            on_dev = [p.to(dev) for p in pinned]

            def h2d() -> None:
                for p, d in zip(pinned, on_dev):
                    d.copy_(p, non_blocking=True)
                torch.cuda.synchronize(dev)

            def dcopy() -> None:
                for d in on_dev:
                    d.clone()
                torch.cuda.synchronize(dev)

            out.update(host_to_cuda=_timed(h2d, total), cuda_memory=2 * _timed(dcopy, total))
        return out
    finally:
        folder.close()
