"""Checks a search makes before it creates its run directory, so a setup problem fails at once, by name.

Loading the space already checked the YAML, the model folders' headers (safetensors only) and their
compatibility. :func:`preflight` adds what used to be found late or never:

- the fitness data of **both** splits (a broken ``test:`` file was found after the whole search, every test score
  the penalty, exit code 0) and every lm-eval task name (:func:`~evomerge.fitness.evaluator.check_sources`);
- every model through the one loading rule (:func:`~evomerge.models.hf.check_loadable`: no custom code, an
  architecture this transformers knows), instead of a raw transformers traceback from each worker;
- NaN/Inf weights in the inputs (every tensor read once, checked with ``isfinite``), which make every candidate
  fail;
- a Ray address that nothing answers (:func:`check_ray_address`: a TCP connect with a short timeout), instead
  of Ray retrying for many minutes.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from evomerge.errors import ConfigError, ModelError
from evomerge.fitness.evaluator import check_sources
from evomerge.fitness.spec import SPLITS
from evomerge.merge.recipe import BASE_KEY
from evomerge.models.adapter import ADAPTER_WEIGHTS, is_adapter_folder, open_weights
from evomerge.models.folder import ModelFolder
from evomerge.models.hf import check_loadable
from evomerge.search.space import Space
from evomerge.search.workers import executor_kind

RAY_PORT = 6379  # `ray start --head`'s default port
CONNECT_TIMEOUT = 5.0  # seconds for the Ray address check
_CHUNK = 1 << 24  # elements checked at once (bounds the temporary of isfinite)


def _field(key: str) -> str:
    return "models.base" if key == BASE_KEY else f"models.fine_tunes.{key}"


def non_finite_tensors(path: str, limit: int = 5) -> list[str]:
    """Names of up to ``limit`` tensors of the model at ``path`` that hold a NaN or an infinity (an adapter's
    stored tensors: its factors and the modules it saves whole)."""
    if is_adapter_folder(path):
        with safe_open(str(Path(path) / ADAPTER_WEIGHTS), framework="pt") as fh:
            tensors = ((name, fh.get_tensor(name)) for name in fh.keys())  # noqa: SIM118 - a safe_open handle is not iterable
            return _non_finite(tensors, limit)
    with ModelFolder.open(path) as folder:
        return _non_finite(((name, folder.get(name)) for name in folder.tensor_names), limit)


def _non_finite(tensors: Iterable[tuple[str, torch.Tensor]], limit: int) -> list[str]:
    bad: list[str] = []
    for name, tensor in tensors:
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        flat = tensor.reshape(-1)
        if any(not bool(torch.isfinite(flat[i:i + _CHUNK]).all()) for i in range(0, flat.numel(), _CHUNK)):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def check_models(space: Space, *, weights: bool = True) -> None:
    """Every model of ``space`` loads by the one rule and (``weights``) holds finite numbers only."""
    base = str(space.base_path)
    for key, path in space.model_paths().items():
        try:
            if is_adapter_folder(path):
                open_weights(path, base=base).close()  # its config, type and shapes against the base
            else:
                check_loadable(path)
        except ModelError as exc:
            raise ModelError(f"{space.where}: {_field(key)}: {exc}") from None
        if weights:
            bad = non_finite_tensors(path)
            if bad:
                raise ModelError(f"{space.where}: {_field(key)}: model {path} has NaN or infinite weights in "
                                 f"{', '.join(repr(b) for b in bad)}: every merge with it would fail")


def parse_ray_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address (``HOST[:PORT]`` or ``ray://HOST:PORT``); None for ``auto``/``local``."""
    text = address.strip()
    if text in ("auto", "local", ""):
        return None
    text = text.removeprefix("ray://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, RAY_PORT
    if not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:{RAY_PORT})")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail at once, naming the address, when nothing accepts a connection there."""
    target = parse_ray_address(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r}: nothing answers at {host}:{port} "
                          f"({exc.strerror or exc}). Start the head node with `ray start --head --port={port}` "
                          "and pass its address (`ray status` on the head node shows it)") from None


def preflight(space: Space, *, address: str | None = None, log: Callable[[str], None] | None = None,
              splits: tuple[str, ...] = SPLITS, weights: bool = True) -> None:
    """Every check of the module docstring; raises the first problem (ConfigError or ModelError)."""
    say = log or (lambda message: None)
    address = address or space.raw.executor.address
    if address and executor_kind(space, address) == "ray":
        check_ray_address(address)
    check_sources(space.fitness, splits)
    if weights:
        say(f"checking the {len(space.model_paths())} input models (loading rule, NaN/Inf weights)")
    check_models(space, weights=weights)

