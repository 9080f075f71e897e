"""PEFT LoRA adapter folders as fine-tunes: a tensor source with the read API of a model folder.

A LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) changes its base by a low-rank task
vector on each target module: ``tau = scale * B @ A`` with ``A`` (r x d_in), ``B`` (d_out x r) and
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``; per-module ``r`` and ``lora_alpha``
from ``rank_pattern`` / ``alpha_pattern``, matched the way PEFT matches them), transposed for
``fan_in_fan_out`` layers (GPT-2's Conv1D) and for embeddings (``lora_embedding_A/B``, as PEFT computes them).
Tensors the adapter stores in full (``modules_to_save``, trained biases, saved embedding ``base_layer``
weights) replace the base's; every other tensor is the base's (a zero task vector).

:class:`AdapterFolder` opens an adapter over its base and serves, per tensor, the base tensor plus that task
vector, with the same methods as :class:`~evomerge.models.folder.ModelFolder` (``get``, ``read_range``,
``mapped``, shapes, dtypes, names), so every engine reads an adapter as it reads a full fine-tune. It also
gives the exact task vector (:meth:`AdapterFolder.delta`) and the factors themselves
(:meth:`AdapterFolder.factor`), which the resident merger keeps instead of dense task vectors.

The base of an adapter is the one the caller gives (a search space's base, a recipe's ``base_model``), or
``BASE+ADAPTER`` (mergekit's model syntax), or else ``base_model_name_or_path`` when that is a local folder.
A base that disagrees with ``base_model_name_or_path`` naming another local model, or with the factors'
shapes, is refused with both named. Adapter types other than plain LoRA (DoRA, AdaLoRA, IA3, LoHa, prompt
tuning, ...) are refused by name: they are not ``W + scale * B @ A``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.files import read_json_object
from evomerge.models.folder import ModelFolder, TensorInfo, _Shard, header_tensors
from evomerge.models.layers import LayerMap
from evomerge.paths import resolve_path, scheme_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
_BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")
# stored keys of adapter parts that are not W + scale * B @ A
_REFUSED_KEYS = {
    "lora_magnitude_vector": "DoRA (its magnitude vector rescales every column of the merged weight)",
    "lora_B.bias": "lora_bias (a trained bias on lora_B)",
    "lora_E": "AdaLoRA (an SVD-form update)",
}
# adapter_config.json switches that make the adapter something other than W + scale * B @ A
_REFUSED_SWITCHES: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "target_parameters": "LoRA on raw nn.Parameters (target_parameters)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token indices",
    "alora_invocation_tokens": "activated LoRA (it applies only after its invocation tokens)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}


def is_adapter_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    try:
        return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()
    except OSError:
        return False


def split_ref(ref: str | os.PathLike[str]) -> tuple[str | None, str]:
    """``(base, model)`` of a model reference: mergekit's ``BASE+ADAPTER``, or ``(None, ref)`` for one path.

    A path that exists as written is one path even if it contains ``+``.
    """
    text = os.fspath(ref)
    if "+" not in text or (scheme_of(text) is None and Path(text).expanduser().exists()):
        return None, text
    parts = text.split("+")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"model reference {text!r}: expected one path, or BASE+ADAPTER (mergekit's syntax)")
    return parts[0], parts[1]


def join_ref(base: str | os.PathLike[str], adapter: str | os.PathLike[str]) -> str:
    """``BASE+ADAPTER``: the reference of an adapter applied to a base (mergekit's syntax)."""
    return f"{os.fspath(base)}+{os.fspath(adapter)}"


def model_ref(path: str | os.PathLike[str], base: str | os.PathLike[str] | None) -> str:
    """``path`` as a reference that needs no further context: ``BASE+ADAPTER`` for an adapter folder given
    a base, else the path itself (for code that loads a model from one string, e.g. with transformers)."""
    text = os.fspath(path)
    if base is None or split_ref(text)[0] is not None:
        return text
    return join_ref(base, text) if is_adapter_folder(resolve_path(text)) else text


def resolve_ref(ref: str | os.PathLike[str]) -> str:
    """A reference with its paths resolved (``zoo:`` schemes, ``~``); ``BASE+ADAPTER`` stays one string."""
    base, model = split_ref(ref)
    if base is None:
        return str(resolve_path(model))
    return join_ref(resolve_path(base), resolve_path(model))


# ----------------------------------------------------------------------------------------------- config


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    data = read_json_object(path, "adapter config", ModelError)
    return data


def check_adapter_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse, by name, every adapter that is not a plain LoRA (``W + scale * B @ A`` per target module)."""
    kind = str(config.get("peft_type") or "").upper()
    if kind != "LORA":
        raise ModelError(
            f"{where}: peft_type {config.get('peft_type')!r} is not supported: evomerge reads plain LoRA adapters "
            "(task vector scale * B @ A), not IA3, AdaLoRA, LoHa, LoKr, OFT, VeRA, prompt/prefix tuning or others; "
            "merge it into its base with PEFT's merge_and_unload() and give the full model"
        )
    for key, what in _REFUSED_SWITCHES.items():
        value = config.get(key)
        if value not in (None, False, [], {}, ""):
            raise ModelError(f"{where}: {key} = {value!r}: {what} is not supported (only plain LoRA); merge it "
                             "into its base with PEFT's merge_and_unload() and give the full model")
    r = config.get("r")
    alpha = config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ModelError(f"{where}: r = {r!r} must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ModelError(f"{where}: lora_alpha = {alpha!r} must be a number")
    for field in ("rank_pattern", "alpha_pattern"):
        value = config.get(field) or {}
        if not isinstance(value, Mapping):
            raise ModelError(f"{where}: {field} must be a mapping of module patterns to numbers, got {value!r}")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _local_model(name: Any, adapter_dir: Path) -> Path | None:
    """The local folder ``base_model_name_or_path`` names, if it is one (absolute, or relative to the adapter
    folder or the working directory); None for a hub id or a missing path."""
    if not isinstance(name, str) or not name or scheme_of(name) is not None:
        return None
    p = Path(name).expanduser()
    for cand in ([p] if p.is_absolute() else [adapter_dir / p, Path.cwd() / p]):
        if (cand / "config.json").is_file():
            return cand.resolve()
    return None


# ----------------------------------------------------------------------------------------------- factors


@dataclass(frozen=True)
class LoraFactor:
    """One target tensor's factors: ``delta = scale * (B @ A)``, transposed when ``transpose``."""

    target: str
    a: TensorInfo  # (r, d_in) for a linear; (r, num_embeddings) for an embedding
    b: TensorInfo  # (d_out, r); (embedding_dim, r)
    scale: float
    transpose: bool
    rank: int

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the delta (the target tensor's)."""
        rows, cols = self.b.shape[0], self.a.shape[1]
        return (cols, rows) if self.transpose else (rows, cols)

    @property
    def nbytes(self) -> int:
        """Bytes of A and B as stored (from the shapes: a header-only layout has no byte ranges)."""
        return self.a.numel * self.a.dtype.itemsize + self.b.numel * self.b.dtype.itemsize


@dataclass(frozen=True)
class AdapterLayout:
    """What an adapter folder holds, from its config and header alone (no base needed, no tensor read)."""

    path: Path
    config: dict[str, Any]
    factors: dict[str, LoraFactor]  # target tensor name -> factors
    replaced: dict[str, TensorInfo]  # target tensor name -> the full tensor stored in the adapter

    @property
    def base_name(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    @property
    def factor_bytes(self) -> int:
        """Bytes of the factors as stored."""
        return sum(f.nbytes for f in self.factors.values())


def read_adapter_layout(path: str | os.PathLike[str], *, tensors: Mapping[str, TensorInfo] | None = None
                        ) -> AdapterLayout:
    """Parse an adapter folder's config and the names/shapes of its weights (``tensors``: already opened)."""
    folder = Path(path).expanduser()
    where = f"adapter {folder}"
    if not folder.is_dir():
        raise ModelError(f"{where} does not exist")
    folder = folder.resolve()
    config = _read_config(folder)
    check_adapter_config(config, where)
    weights = folder / ADAPTER_WEIGHTS
    if tensors is None:
        if not weights.is_file():
            pickled = folder / "adapter_model.bin"
            if pickled.is_file():
                raise ModelError(f"{where} has only pickled weights (adapter_model.bin); evomerge reads safetensors "
                                 "only, because loading a pickle can run arbitrary code (save it again with PEFT's "
                                 "save_pretrained(..., safe_serialization=True))")
            raise ModelError(f"{where} has no {ADAPTER_WEIGHTS}")
        tensors = {n: TensorInfo(n, weights, 0, 0, dt, shape) for n, (dt, shape) in header_tensors(weights).items()}
    r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora", False))
    fifo = bool(config.get("fan_in_fan_out", False))
    parts: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, str] = {}
    replaced: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for marker, what in _REFUSED_KEYS.items():
            if f".{marker}" in name:
                raise ModelError(f"{where}: tensor {key!r} belongs to {what}, which is not supported (only plain LoRA)")
        m = _LINEAR_KEY.match(name) or _EMBED_KEY.match(name)
        if m is not None:
            module = m.group("module")
            part = m.group("part")
            kind = "embedding" if part.startswith("lora_embedding") else "linear"
            if kinds.setdefault(module, kind) != kind:
                raise ModelError(f"{where}: module {module!r} has both linear and embedding LoRA factors")
            side = part[-1]
            if side in parts.setdefault(module, {}):
                raise ModelError(f"{where}: module {module!r} has two lora_{side} tensors (several adapters in "
                                 "one file are not supported)")
            parts[module][side] = info
            continue
        b = _BASE_LAYER_KEY.match(name)
        target = f"{b.group('module')}.{b.group('param')}" if b else name
        if target in replaced:
            raise ModelError(f"{where}: tensor {target!r} is stored twice")
        replaced[target] = info
    factors: dict[str, LoraFactor] = {}
    for module, sides in parts.items():
        if set(sides) != {"A", "B"}:
            missing = "B" if "A" in sides else "A"
            raise ModelError(f"{where}: module {module!r} has no lora_{missing} tensor")
        a, b = sides["A"], sides["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise ModelError(f"{where}: module {module!r}: lora_A {a.shape} and lora_B {b.shape} are not "
                             "(r x in) and (out x r) factors")
        r = int(_pattern_value(rank_pattern, module, r0))
        alpha = float(_pattern_value(alpha_pattern, module, alpha0))
        if a.shape[0] != r:
            raise ModelError(f"{where}: module {module!r} has rank {a.shape[0]} (lora_A {a.shape}) but "
                             f"{ADAPTER_CONFIG} gives r = {r} (r, rank_pattern)")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        transpose = kinds[module] == "embedding" or fifo
        target = f"{module}.weight"
        factors[target] = LoraFactor(target, a, b, scale, transpose, r)
    if not factors and not replaced:
        raise ModelError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA factors")
    return AdapterLayout(folder, config, factors, replaced)


def check_against_base(layout: AdapterLayout, base_config: Mapping[str, Any],
                       base_tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                       base_aliases: Mapping[str, str], base_path: Path) -> None:
    """Raise one ModelError listing every target the base lacks or whose shape disagrees with the factors."""
    where = f"adapter {layout.path}"
    problems: list[str] = []
    for target, factor in layout.factors.items():
        if target in base_aliases:
            problems.append(f"LoRA on {target!r}, which the base ties to {base_aliases[target]!r} (not supported)")
        elif target not in base_tensors:
            problems.append(f"LoRA on {target!r}, which the base {base_path} does not have")
        elif tuple(base_tensors[target][1]) != factor.shape:
            problems.append(f"LoRA on {target!r}: B @ A is {factor.shape} (lora_A {factor.a.shape}, lora_B "
                            f"{factor.b.shape}{', transposed' if factor.transpose else ''}) but the base {base_path} "
                            f"has shape {tuple(base_tensors[target][1])}")
    for target, info in layout.replaced.items():
        if target not in base_tensors:
            problems.append(f"stores tensor {target!r}, which the base {base_path} does not have")
        elif tuple(base_tensors[target][1]) != tuple(info.shape):
            problems.append(f"stores {target!r} with shape {tuple(info.shape)} but the base {base_path} has "
                            f"{tuple(base_tensors[target][1])}")
    if problems:
        text = "\n  - ".join(problems[:25])
        raise ModelError(f"{where} does not fit the base {base_path} ({len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}):\n  - {text}")
    arch = base_config.get("architectures")
    mapping = layout.config.get("auto_mapping") or {}
    want = mapping.get("base_model_class") if isinstance(mapping, Mapping) else None
    if isinstance(want, str) and isinstance(arch, list) and arch and want not in arch:
        raise ModelError(f"{where} was trained on a {want} but the base {base_path} is {'/'.join(map(str, arch))}")


def check_base_name(layout: AdapterLayout, base_path: Path) -> None:
    """Refuse a base other than the local model ``base_model_name_or_path`` names (a hub id is not checked)."""
    local = _local_model(layout.base_name, layout.path)
    if local is not None and local != Path(base_path).resolve():
        raise ModelError(
            f"adapter {layout.path}: {ADAPTER_CONFIG} base_model_name_or_path names {layout.base_name!r} ({local}), "
            f"a different local model than the base it is merged on, {Path(base_path).resolve()}; an adapter's task "
            "vector is only meaningful on the model it was trained from (give that model as the base, or correct "
            "base_model_name_or_path if the adapter was trained on this base)"
        )


# ----------------------------------------------------------------------------------------------- source


class AdapterFolder:
    """A LoRA adapter over its base, read like a :class:`ModelFolder`: each tensor is the base's plus the
    adapter's task vector (computed in float32, float64 for a float64 base). Use :func:`open_adapter`."""

    def __init__(self, layout: AdapterLayout, shard: _Shard, base: ModelFolder, owns_base: bool = True) -> None:
        self.layout = layout
        self.path = layout.path
        self.base = base
        self._shard = shard
        self._owns_base = owns_base

    # ------------------------------------------------------------------ the ModelFolder read API
    @property
    def config(self) -> dict[str, Any]:
        """The base's config: an adapter changes weights, not the architecture."""
        return self.base.config

    @property
    def base_path(self) -> Path:
        return Path(self.base.path)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.base.tensor_names

    def has(self, name: str) -> bool:
        return self.base.has(name)

    def resolve(self, name: str) -> str:
        return self.base.resolve(name)

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        return self.base.nbytes(name)

    @property
    def num_parameters(self) -> int:
        return self.base.num_parameters

    @property
    def total_bytes(self) -> int:
        return self.base.total_bytes

    @property
    def tied_embeddings(self) -> bool:
        return self.base.tied_embeddings

    @property
    def tied_aliases(self) -> dict[str, str]:
        return self.base.tied_aliases

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._shard.metadata)

    def layer_map(self) -> LayerMap:
        return LayerMap.from_config(self.config)

    def get(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            rows: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The base tensor plus the adapter's task vector (the adapter's own tensor where it stores one), in
        ``dtype`` (default: the base's stored dtype), optionally its first ``rows`` rows, into ``out``."""
        stored = self.base.dtype(name)
        want = dtype if dtype is not None else (out.dtype if out is not None else stored)
        stored_name = self.base.resolve(name)
        factor = self.layout.factors.get(stored_name)
        if stored_name in self.layout.replaced:
            value = self._read_own(self.layout.replaced[stored_name], device, rows)
            if factor is not None:  # a saved base layer (embeddings) with LoRA on top of it
                value = value.to(self._compute_dtype(name)).add_(self._factor_delta(factor, rows, device, name))
        elif factor is not None:
            delta = self._factor_delta(factor, rows, device, name)
            value = self.base.get(name, device=device, dtype=delta.dtype, rows=rows).add_(delta)
        else:
            return self.base.get(name, device=device, dtype=dtype, rows=rows, out=out)
        if out is not None:
            return out.copy_(value)
        return value if value.dtype == want else value.to(want)

    def read_range(self, name: str, begin: int, out: torch.Tensor) -> torch.Tensor:
        """Flattened elements ``begin .. begin + out.numel()`` of the adapted tensor into ``out`` (contiguous
        CPU, the stored dtype): only the rows of the task vector that the piece covers are computed."""
        kind = self.delta_kind(name)
        if kind == "zero":
            return self.base.read_range(name, begin, out)
        n = out.numel()
        if self.base.resolve(name) in self.layout.replaced:
            return out.copy_(self.get(name).view(-1)[begin:begin + n])
        factor = self.factor(name)
        assert factor is not None
        self.base.read_range(name, begin, out)
        if n == 0:
            return out
        cols = factor.shape[1]
        r0, r1 = begin // cols, -(-(begin + n) // cols)
        piece = self._delta_rows(factor, r0, r1, "cpu", self._compute_dtype(name)).view(-1)
        lo = begin - r0 * cols
        return out.copy_(out.to(piece.dtype).add_(piece[lo:lo + n]))

    def mapped(self, name: str, rows: int | None = None) -> torch.Tensor:
        """The adapted tensor (computed: an adapter has no stored full tensor to map, except the base's)."""
        if self.delta_kind(name) == "zero":
            return self.base.mapped(name, rows)
        return self.get(name, rows=rows)

    def iter_tensors(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_names:
            yield name, self.get(name, device=device, dtype=dtype)

    def state_dict(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                   ) -> dict[str, torch.Tensor]:
        return dict(self.iter_tensors(device, dtype))

    # ------------------------------------------------------------------ the task vector
    def delta_kind(self, name: str) -> str:
        """``"factor"`` (LoRA, possibly over a stored base layer), ``"replaced"`` (stored in full) or ``"zero"``
        (the base's tensor unchanged)."""
        stored = self.base.resolve(name)
        if stored in self.layout.factors:
            return "factor"
        return "replaced" if stored in self.layout.replaced else "zero"

    def factor(self, name: str) -> LoraFactor | None:
        return self.layout.factors.get(self.base.resolve(name))

    def factor_tensors(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of a LoRA-adapted tensor, in ``dtype`` on ``device`` (KeyError when not adapted)."""
        factor = self.layout.factors[self.base.resolve(name)]
        a = self._shard.read(factor.a).to(device=device, dtype=dtype)
        b = self._shard.read(factor.b).to(device=device, dtype=dtype)
        return a, b

    def _compute_dtype(self, name: str) -> torch.dtype:
        return torch.float64 if self.base.dtype(name) == torch.float64 else torch.float32

    def delta(self, name: str, device: str | torch.device = "cpu", rows: int | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The exact task vector of one tensor (``None`` where it is zero), in float32 (float64 for a float64
        base) unless ``dtype`` is given: ``scale * B @ A`` for a LoRA target, stored minus base for a tensor the
        adapter stores in full."""
        stored = self.base.resolve(name)
        factor = self.layout.factors.get(stored)
        own = self.own_delta(name, device, rows)
        if factor is None:
            out = own
        else:
            out = self._factor_delta(factor, rows, device, name)
            if own is not None:
                out = own.add_(out)
        if out is None:
            return None
        return out if dtype is None or out.dtype == dtype else out.to(dtype)

    def own_delta(self, name: str, device: str | torch.device = "cpu", rows: int | None = None
                  ) -> torch.Tensor | None:
        """Stored minus base for a tensor the adapter stores in full (None for the others), float32/64."""
        stored = self.base.resolve(name)
        if stored not in self.layout.replaced:
            return None
        compute = self._compute_dtype(name)
        own = self._read_own(self.layout.replaced[stored], device, rows).to(compute)
        return own.sub_(self.base.get(name, device=device, dtype=compute, rows=rows))

    def _factor_delta(self, factor: LoraFactor, rows: int | None, device: str | torch.device, name: str
                      ) -> torch.Tensor:
        total = factor.shape[0]
        return self._delta_rows(factor, 0, total if rows is None else min(rows, total), device,
                                self._compute_dtype(name))

    def _delta_rows(self, factor: LoraFactor, r0: int, r1: int, device: str | torch.device, dtype: torch.dtype
                    ) -> torch.Tensor:
        """Rows ``r0:r1`` of ``scale * (B @ A)`` (transposed when the factor says so), as PEFT computes it."""
        a = self._shard.read(factor.a).to(device=device, dtype=dtype)
        b = self._shard.read(factor.b).to(device=device, dtype=dtype)
        prod = (b @ a[:, r0:r1]).T if factor.transpose else b[r0:r1] @ a
        return prod.mul_(factor.scale).contiguous()

    def stored(self, name: str, device: str | torch.device = "cpu", rows: int | None = None) -> torch.Tensor:
        """The full tensor the adapter stores for ``name`` (``modules_to_save``, a saved base layer), as stored;
        KeyError for a tensor it does not store."""
        return self._read_own(self.layout.replaced[self.base.resolve(name)], device, rows)

    def _read_own(self, info: TensorInfo, device: str | torch.device, rows: int | None) -> torch.Tensor:
        t = self._shard.read(info, rows)
        return t if torch.device(device).type == "cpu" else t.to(device)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self._shard.close()
        if self._owns_base:
            self.base.close()

    def __enter__(self) -> AdapterFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        """Pickle as the two paths: the receiving process reopens (and rechecks) both."""
        return (open_adapter, (str(self.path), str(self.base.path)))

    def __repr__(self) -> str:
        return (f"AdapterFolder({str(self.path)!r}, base={str(self.base.path)!r}, "
                f"lora={len(self.layout.factors)}, replaced={len(self.layout.replaced)})")

    def __contains__(self, name: object) -> bool:
        return name in self.base


def open_adapter(path: str | os.PathLike[str], base: str | os.PathLike[str] | ModelFolder | None = None
                 ) -> AdapterFolder:
    """Open an adapter folder over ``base`` (a path or an open folder, which stays the caller's); without a
    base, ``base_model_name_or_path`` must be a local folder. Checks the base and every factor's shape."""
    folder = Path(path).expanduser()
    where = f"adapter {folder}"
    if not is_adapter_folder(folder):
        raise ModelError(f"{where} has no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    weights = folder.resolve() / ADAPTER_WEIGHTS
    if not weights.is_file():
        read_adapter_layout(folder)  # raises the reason (config refused, pickled or missing weights)
    shard = _Shard(weights)
    try:
        layout = read_adapter_layout(folder, tensors=shard.tensors)
        owns = not isinstance(base, ModelFolder)
        if base is None:
            local = _local_model(layout.base_name, layout.path)
            if local is None:
                raise ModelError(
                    f"{where}: no base model given and its base_model_name_or_path {layout.base_name!r} is not a "
                    "local folder; give the base (the search space's models.base, the recipe's base_model, "
                    "--base, or BASE+ADAPTER)")
            base = local
        base_folder = base if isinstance(base, ModelFolder) else ModelFolder.open(resolve_path(base))
    except BaseException:
        shard.close()
        raise
    try:
        if is_adapter_folder(base_folder.path):  # pragma: no cover - ModelFolder.open refuses adapters
            raise ModelError(f"{where}: its base {base_folder.path} is itself an adapter")
        check_base_name(layout, Path(base_folder.path))
        check_against_base(layout, base_folder.config,
                           {n: (base_folder.dtype(n), base_folder.shape(n)) for n in base_folder.tensor_names},
                           base_folder.tied_aliases, Path(base_folder.path))
    except BaseException:
        shard.close()
        if owns:
            base_folder.close()
        raise
    return AdapterFolder(layout, shard, base_folder, owns_base=owns)


Source = ModelFolder | AdapterFolder


def open_weights(ref: str | os.PathLike[str] | ModelFolder | AdapterFolder,
                 base: str | os.PathLike[str] | ModelFolder | None = None) -> Source:
    """Open a model reference for reading tensors: a model folder, an adapter folder over ``base`` (else over
    the local model its config names), or ``BASE+ADAPTER``. Open sources pass through."""
    if isinstance(ref, (ModelFolder, AdapterFolder)):
        return ref
    if isinstance(base, AdapterFolder):
        raise ModelError(f"model {os.fspath(ref)}: its base {base.path} is a LoRA adapter, not a model folder")
    explicit, model = split_ref(ref)
    path = resolve_path(model)
    if is_adapter_folder(path):
        return open_adapter(path, explicit if explicit is not None else base)
    if explicit is not None:
        raise ModelError(f"model reference {os.fspath(ref)!r}: {path} is not a PEFT adapter folder (no "
                         f"{ADAPTER_CONFIG}); BASE+ADAPTER applies an adapter to a base")
    return ModelFolder.open(path)


def source_ref(source: Source) -> str:
    """The one-string reference of an open source: its folder, or ``BASE+ADAPTER`` for an adapter."""
    if isinstance(source, AdapterFolder):
        return join_ref(source.base_path, source.path)
    return str(source.path)


def folder_kind(path: str | os.PathLike[str]) -> str:
    """``"adapter"``, ``"model"`` (config.json) or ``"missing"``: what a fine-tune path points at."""
    p = Path(path).expanduser()
    if is_adapter_folder(p):
        return "adapter"
    return "model" if (p / "config.json").is_file() else "missing"
