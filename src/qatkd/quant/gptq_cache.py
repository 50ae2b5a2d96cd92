"""GPTQ's start, reused: `quant.init=gptq` computes the same codes whenever the model, its
quantizers, the calibration batches and the code are the same, and a sweep of students from one
start (learning rates, step counts, balancers) would run it once per student: about 2 min each
for SmolLM2-135M on 2 CPU cores, half of the LLM benchmark's quick mode.

The result, the state of every layer GPTQ set (its weight and its quantizers), is kept in a file
named by a key of everything it depends on, by content: every tensor of the model's state (the
teacher's weights and each quantizer's grid before GPTQ) and every module's plain settings (a
quantizer's bits, groups, float16 scales), the calibration batches, the stages,
GPTQ's constants, the source files of the model's module classes (the forward passes that make
the Hessians) and of `qatkd.quant.gptq`, and the torch and transformers versions. A file that
cannot be read, or that does not fit the model, is computed again and replaced.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import pickle
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qatkd.quant.gptq import BLOCK, DAMP, gptq


def gptq_cached(
    model: nn.Module, batches: Sequence[Tensor], stages: Sequence[Sequence[str]], cache_dir: Path
) -> bool:
    """`gptq(model, batches, stages)`, or its result read from `cache_dir` where a run with the
    same key (module doc) computed it; returns whether it was read."""
    key = gptq_key(model, batches, stages)
    path = cache_dir / f"gptq-{key[:24]}.pt"
    names = [name for stage in stages for name in stage]
    stored = _read(path, key)
    if stored is not None and _fits(model, names, stored):
        for name in names:
            model.get_submodule(name).load_state_dict(stored[name])
        return True
    gptq(model, batches, stages)
    cache_dir.mkdir(parents=True, exist_ok=True)
    layers = {name: model.get_submodule(name).state_dict() for name in names}
    partial = path.with_suffix(".partial")
    torch.save({"key": key, "layers": layers}, partial)
    partial.replace(path)  # a stopped write never leaves a file under the final name
    return False


def gptq_key(model: nn.Module, batches: Sequence[Tensor], stages: Sequence[Sequence[str]]) -> str:
    """The hex key of GPTQ's result on `model` (module doc)."""
    digest = hashlib.sha256()
    files = {inspect.getsourcefile(type(m)) for m in model.modules()} | {
        inspect.getsourcefile(gptq)
    }
    settings = {
        "modules": {name: _settings(m) for name, m in model.named_modules()},
        "stages": [list(stage) for stage in stages],
        "damp": DAMP,
        "block": BLOCK,
        "versions": {p: _version(p) for p in ("torch", "transformers")},
    }
    digest.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    for file in sorted(f for f in files if f is not None):
        digest.update(Path(file).read_bytes())
    for name, tensor in model.state_dict().items():
        _update(digest, name, tensor)
    for i, batch in enumerate(batches):
        _update(digest, f"batch {i}", batch)
    return digest.hexdigest()


def _settings(module: nn.Module) -> dict[str, Any]:
    """A module's plain attributes (a quantizer's bits, groups, float16 scales; a layer's sizes):
    what its state's tensors may not show."""
    plain = (bool, int, float, str, type(None), list, tuple)
    return {
        "class": type(module).__qualname__,
        **{
            k: v
            for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and isinstance(v, plain)
        },
    }


def _update(digest: Any, name: str, tensor: Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _read(path: Path, key: str) -> dict[str, dict[str, Tensor]] | None:
    """The layers' states stored under `key` at `path`, or None (no file, another key, or a
    file torch cannot read)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    return stored.get("layers")


def _fits(model: nn.Module, names: list[str], stored: dict[str, dict[str, Tensor]]) -> bool:
    """Whether `stored` holds every layer in `names` with the same entries, shapes and dtypes as
    the model's (checked before any is loaded, so a file that does not fit changes nothing)."""
    if not isinstance(stored, dict) or set(stored) != set(names):
        return False
    for name in names:
        own = model.get_submodule(name).state_dict()
        if set(own) != set(stored[name]):
            return False
        for k, t in own.items():
            s = stored[name][k]
            if not isinstance(s, Tensor) or (s.shape, s.dtype) != (t.shape, t.dtype):
                return False
    return True
