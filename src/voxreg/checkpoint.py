"""Saving and loading models and training checkpoints, with no pickle.

A checkpoint is ONE safetensors file:

* tensors: the model's ``state_dict`` under ``model.<name>``; with an optimizer, every tensor of
  its ``state_dict`` under ``optim.<n>``;
* header metadata (strings): ``format = "voxreg"``, ``format_version``, ``voxreg_version``, the
  model's ``config`` (JSON; :func:`voxreg.nn.build_model` rebuilds the model from it),
  user ``metadata`` (JSON), ``step``, ``epoch``, ``history`` (JSON), the optimizer's structure
  (JSON with references to its tensors) and ``sha256``, a digest of the tensor data, checked on
  load so that corruption is reported rather than silently loaded.

Files are written atomically (a temporary file in the same folder, then :func:`os.replace`), so
an interrupted save never leaves a half-written checkpoint under the final name.

Shipped models live in ``voxreg/models/<name>.safetensors`` (package data):
``load_model("mnist")`` finds them by name.

>>> import tempfile
>>> from voxreg.nn.networks import VxmDense
>>> model = VxmDense((8, 8), nb_features=[[4, 4], [4, 4, 4]])
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = save_model(model, Path(tmp) / "model", metadata={"data": "demo"}, step=3)
...     loaded = load_model(path)                 # rebuilt from its config, eval mode
...     checkpoint = load_checkpoint(path)        # everything, to resume training
>>> path.name, type(loaded).__name__, loaded.training, loaded.metadata
('model.safetensors', 'VxmDense', False, {'data': 'demo'})
>>> checkpoint.step, checkpoint.config["inshape"]
(3, [8, 8])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from voxreg._atomic import atomic_path
from voxreg._runtime import MODELS_DIR, resolve_device
from voxreg._version import __version__
from voxreg.nn.registry import build_model
from voxreg.nn.template import TEMPLATE_CLASSES, TemplateModel

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "jsonable",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_template_model",
    "read_checkpoint",
    "save_model",
    "warm_start",
]

FORMAT = "voxreg"
FORMAT_VERSION = "1"
_SUFFIX = ".safetensors"
_MODEL_PREFIX = "model."
_OPTIM_PREFIX = "optim."


class CheckpointError(ValueError):
    """A file that is not a readable voxreg checkpoint (corrupt, truncated, foreign)."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: the model, weights loaded (training mode unless ``eval`` was asked).
        config: the model's config.
        optimizer_state: the optimizer's ``state_dict`` (``None`` when none was saved); pass it
            to ``optimizer.load_state_dict``.
        step, epoch: counters saved with it (``None`` when not given).
        history: the training history saved with it (list of per-epoch dicts), or ``None``.
        metadata: the user metadata dict.
        path: the file read.
    """

    model: nn.Module | None
    config: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    step: int | None = None
    epoch: int | None = None
    history: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


# --------------------------------------------------------------------------------------------
# exact, pickle-free encoding of nested python structures holding tensors
# --------------------------------------------------------------------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-able form of ``value``; tensors are moved into ``tensors`` and referenced by name.

    Types survive the round trip exactly: tuples, non-string dict keys, ints vs floats,
    non-finite floats.
    """
    if isinstance(value, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = value
        return {"__tensor__": name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, prefix) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, prefix) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, tensors, prefix), _encode(v, tensors, prefix)]
                             for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint: {value!r}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__float__" in value:
            return float(value["__float__"])
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__dict__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
        raise ValueError(f"unknown encoded value {value!r}")
    return value


def _json(value: Any) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def jsonable(value: Any) -> Any:
    """Make user metadata / history JSON-safe (numpy and torch scalars become numbers).

    >>> import numpy as np
    >>> jsonable({"lr": np.float32(0.5), "shape": (2, 3), "loss": float("nan"), "dir": Path("a")})
    {'lr': 0.5, 'shape': [2, 3], 'loss': None, 'dir': 'a'}
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors that share no memory (safetensors refuses sharing)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if (t.numel() and key in seen) or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    return out


def _data_section(blob: bytes) -> bytes:
    (header_len,) = struct.unpack("<Q", blob[:8])
    return blob[8 + header_len :]


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
    epoch: int | None = None,
    history: Any = None,
) -> Path:
    """Save ``model`` (and optionally an optimizer and training counters) to one file.

    Args:
        model: a voxreg model: it must have a ``config`` dict (see :mod:`voxreg.nn.networks`).
        path: the file to write (``.safetensors`` is appended when it has no suffix); parent
            folders are created.
        metadata: JSON-serialisable dict stored with the model (e.g. data, losses, notes).
        optimizer: its state is stored too, so that training can resume exactly.
        step, epoch: training counters.
        history: training history (e.g. a list of per-epoch dicts of losses).

    Returns:
        The path written.

    >>> import tempfile
    >>> from voxreg.nn.networks import VxmDense
    >>> model = VxmDense((8, 8), nb_features=[[4, 4], [4, 4, 4]])
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_model(model, Path(tmp) / "run.safetensors", optimizer=optimizer, epoch=2)
    ...     state = load_checkpoint(path).optimizer_state
    >>> state["param_groups"][0]["lr"], state["param_groups"][0]["momentum"]
    (0.1, 0.9)
    """
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "class" not in config:
        raise TypeError(
            "model must be a voxreg model with a .config dict holding its class name (see "
            f"voxreg.nn.build_model); {type(model).__name__} has none"
        )
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(_SUFFIX)
    tensors = {_MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    header: dict[str, str] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "voxreg_version": __version__,
        "config": _json(jsonable(config)),
        "metadata": _json(jsonable(metadata or {})),
    }
    if step is not None:
        header["step"] = str(int(step))
    if epoch is not None:
        header["epoch"] = str(int(epoch))
    if history is not None:
        header["history"] = _json(jsonable(history))
    if optimizer is not None:
        state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
        optim_tensors: dict[str, torch.Tensor] = {}
        header["optimizer"] = _json(_encode(state, optim_tensors, _OPTIM_PREFIX))
        header["optimizer_class"] = type(optimizer).__name__
        tensors.update(optim_tensors)
    tensors = _prepare(tensors)
    # the data section does not depend on the header metadata: hash it, then store the digest
    digest = hashlib.sha256(_data_section(_st_save(tensors, metadata=header))).hexdigest()
    header["sha256"] = digest
    blob = _st_save(tensors, metadata=header)

    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return path


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def list_models() -> list[str]:
    """Names of the models shipped inside the package (``voxreg/models/*.safetensors``).

    >>> "mnist" in list_models()
    True
    """
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name[: -len(_SUFFIX)] for p in MODELS_DIR.glob(f"*{_SUFFIX}"))


def _resolve(path_or_name: str | os.PathLike) -> Path:
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder, not a checkpoint file")
    name = str(path_or_name)
    is_name = isinstance(path_or_name, str) and os.sep not in name and "/" not in name
    if is_name:
        stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name
        shipped = MODELS_DIR / f"{stem}{_SUFFIX}"
        if shipped.is_file():
            return shipped
    available = list_models()
    listing = ", ".join(repr(m) for m in available) if available else "none"
    raise FileNotFoundError(
        f"no checkpoint file {name!r}"
        + (f" and no shipped model of that name in {MODELS_DIR}" if is_name else "")
        + f". Shipped models: {listing}."
    )


def read_checkpoint(
    path_or_name: str | os.PathLike,
) -> tuple[dict[str, str], dict[str, torch.Tensor], Path]:
    """Read and verify a checkpoint file; return ``(header_metadata, tensors, path)``.

    Raises:
        FileNotFoundError: no such file or shipped model.
        CheckpointError: truncated or corrupt file, or not a voxreg checkpoint.

    >>> meta, tensors, path = read_checkpoint("mnist")
    >>> meta["format"], path.name
    ('voxreg', 'mnist.safetensors')
    """
    path = _resolve(path_or_name)
    blob = path.read_bytes()
    where = f"{path}"
    if len(blob) < 8:
        raise CheckpointError(f"{where} is not a voxreg checkpoint: file too short ({len(blob)} bytes)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > len(blob) - 8:
        raise CheckpointError(
            f"{where} is truncated or not a safetensors file: its header claims {header_len} "
            f"bytes but the file has {len(blob)}"
        )
    try:
        header = json.loads(blob[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where} is corrupt or not a safetensors file: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} is corrupt or not a safetensors file (bad header)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{where} is a safetensors file but not a voxreg checkpoint (no format='voxreg' in "
            "its metadata); save models with voxreg.checkpoint.save_model"
        )
    data = blob[8 + header_len :]
    expected = max((int(info["data_offsets"][1]) for key, info in header.items()
                    if key != "__metadata__" and isinstance(info, dict)), default=0)
    if len(data) < expected:
        raise CheckpointError(
            f"{where} is truncated: {len(data)} bytes of tensor data, {expected} expected"
        )
    digest = meta.get("sha256")
    if digest and hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{where} is corrupt: its tensor data fail the sha256 check")
    try:
        tensors = _st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{where} is corrupt: {err}") from None
    return meta, tensors, path


def _json_field(meta: dict[str, str], key: str, where: Path, default: Any = None) -> Any:
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{where} is corrupt: metadata {key!r} is not JSON ({err})") from None


def load_checkpoint(
    path_or_name: str | os.PathLike,
    device: str | torch.device | None = "cpu",
    model: nn.Module | None = None,
) -> Checkpoint:
    """Load everything a checkpoint holds, to resume training.

    Args:
        path_or_name: a checkpoint file, or the name of a shipped model.
        device: where the model goes (``None`` or ``"auto"``: CUDA when available).
        model: load the weights into this model (its config must match) instead of building a
            new one.

    Returns:
        A :class:`Checkpoint`; its model is in training mode.

    >>> checkpoint = load_checkpoint("mnist")
    >>> checkpoint.model.training, checkpoint.config["class"], checkpoint.path.name
    (True, 'VxmDense', 'mnist.safetensors')
    """
    meta, tensors, path = read_checkpoint(path_or_name)
    config = _json_field(meta, "config", path)
    if not isinstance(config, dict) or "class" not in config:
        raise CheckpointError(f"{path} is corrupt: it holds no model config")
    state = {k[len(_MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)}
    if model is None:
        try:
            model = build_model(config)
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"{path}: cannot rebuild its model from config {config}: {err}"
            ) from None
    else:
        own = getattr(model, "config", None)
        if own is not None and jsonable(own) != config:
            raise ValueError(
                f"model's config {own} differs from the checkpoint's {config} ({path})"
            )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model: {err}") from None
    model.to(resolve_device(device))
    optimizer_state = None
    if "optimizer" in meta:
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith(_OPTIM_PREFIX)}
        try:
            optimizer_state = _decode(_json_field(meta, "optimizer", path), optim_tensors)
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path} is corrupt: bad optimizer state ({err})") from None
    return Checkpoint(
        model=model,
        config=config,
        optimizer_state=optimizer_state,
        step=int(meta["step"]) if "step" in meta else None,
        epoch=int(meta["epoch"]) if "epoch" in meta else None,
        history=_json_field(meta, "history", path),
        metadata=_json_field(meta, "metadata", path, {}),
        path=path,
    )


def load_model(
    path_or_name: str | os.PathLike, device: str | torch.device | None = None
) -> nn.Module:
    """Load a model for inference: rebuilt from its stored config, weights loaded, eval mode.

    Args:
        path_or_name: a checkpoint file, or the name of a shipped model (e.g. ``"mnist"``,
            found in ``voxreg/models/``; :func:`list_models` lists them).
        device: ``None`` or ``"auto"``: CUDA when available, else CPU.

    Raises:
        FileNotFoundError: no such file or shipped model (the message lists shipped models).
        CheckpointError: truncated, corrupt or foreign file.

    >>> model = load_model("mnist", device="cpu")
    >>> type(model).__name__, model.training, model.inshape
    ('VxmDense', False, (32, 32))
    """
    checkpoint = load_checkpoint(path_or_name, device=device)
    model = checkpoint.model
    model.eval()
    model.metadata = checkpoint.metadata  # type: ignore[attr-defined]
    return model


def load_template_model(path_or_name: str | os.PathLike,
                        device: str | torch.device | None = "cpu") -> TemplateModel:
    """Load a template model saved with :func:`save_model` (a file, or the
    name of a shipped model such as ``"template2d"``); eval mode, ``.metadata`` attached.

    >>> model = load_template_model("template2d")
    >>> type(model).__name__, model.inshape, model.training
    ('TemplateCreation', (96, 112), False)
    """
    meta, _, path = read_checkpoint(path_or_name)
    config = json.loads(meta.get("config", "{}"))
    if config.get("class") not in TEMPLATE_CLASSES:
        raise ValueError(f"{str(path)!r} holds a {config.get('class')!r} model, not a template "
                         f"model ({', '.join(sorted(TEMPLATE_CLASSES))})")
    checkpoint = load_checkpoint(path, device=device, model=build_model(config))
    model = checkpoint.model
    model.eval()
    model.metadata = checkpoint.metadata  # type: ignore[attr-defined]
    return model  # type: ignore[return-value]


def warm_start(model: nn.Module, source: str | os.PathLike | nn.Module) -> int:
    """Copy into ``model`` every weight of ``source`` (a checkpoint path, a shipped model name or
    a module) whose name and shape match; returns how many tensors were copied.

    Used to start a diffeomorphic model from a plain one (the UNet and flow head are the same
    layers, and for small deformations the velocity that integrates to a displacement is close to
    that displacement), or a template's registration network from a pairwise model.

    Raises:
        ValueError: when no weight of ``source`` matches.

    >>> from voxreg.nn.networks import VxmDense
    >>> plain = VxmDense((8, 8), nb_features=[[4, 4], [4, 4, 4]], int_steps=0)
    >>> diffeomorphic = VxmDense((8, 8), nb_features=[[4, 4], [4, 4, 4]])
    >>> warm_start(diffeomorphic, plain)          # every tensor: same layers, same shapes
    12
    """
    other = source if isinstance(source, nn.Module) else load_model(source)
    theirs = other.state_dict()
    mine = model.state_dict()
    copied = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    if not copied:
        raise ValueError(f"warm start: no weight of {source!r} matches the model's")
    mine.update(copied)
    model.load_state_dict(mine)
    return len(copied)
