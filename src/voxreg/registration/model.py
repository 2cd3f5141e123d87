"""What a registration model says about itself, without running it: its spatial rank, channel
counts and integration steps (``config`` or attributes), whether its forward can return the
velocity, and the losses it was trained with (``metadata``).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

__all__ = [
    "accepts",
    "image_loss_name",
    "integration_steps",
    "is_diffeomorphic",
    "loss_settings",
    "model_config",
    "model_features",
    "model_ndim",
]


def model_config(model: nn.Module) -> dict[str, Any]:
    """The model's ``config`` dict (its class and constructor arguments), or ``{}``.

    >>> model_config(nn.Identity())
    {}
    """
    config = getattr(model, "config", None)
    return config if isinstance(config, dict) else {}


def model_ndim(model: nn.Module) -> int:
    """Number of spatial axes of a model (from ``config["inshape"]`` or ``inshape``).

    >>> model = nn.Identity()
    >>> model.inshape = (32, 32)
    >>> model_ndim(model)
    2
    """
    inshape = model_config(model).get("inshape", getattr(model, "inshape", None))
    if inshape is None:
        raise ValueError(
            "model must have an inshape (attribute or config['inshape']) giving its spatial "
            "rank; register() needs it to tell spatial axes from channel and batch axes"
        )
    ndim = len(inshape)
    if ndim not in (2, 3):
        raise ValueError(f"model inshape must have 2 or 3 axes, got {tuple(inshape)}")
    return ndim


def model_features(model: nn.Module, key: str) -> int | None:
    """The channel count ``key`` (``"src_feats"``, ``"trg_feats"``) of a model, or ``None``.

    >>> model = nn.Identity()
    >>> model.src_feats = 1
    >>> model_features(model, "src_feats"), model_features(model, "trg_feats")
    (1, None)
    """
    value = model_config(model).get(key, getattr(model, key, None))
    return int(value) if value is not None else None


def accepts(model: nn.Module, keyword: str) -> bool:
    """Whether ``model.forward`` takes the keyword argument ``keyword`` (or ``**kwargs``).

    >>> accepts(nn.Identity(), "return_velocity")
    False
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def integration_steps(model: nn.Module) -> int:
    """The model's scaling-and-squaring steps (``int_steps``; 0 for a displacement model).

    >>> integration_steps(nn.Identity())
    0
    """
    value = model_config(model).get("int_steps", getattr(model, "int_steps", 0))
    return int(value or 0)


def is_diffeomorphic(model: nn.Module) -> bool:
    """A velocity model whose forward can return its pre-integration field."""
    return integration_steps(model) > 0 and accepts(model, "return_velocity")


_IMAGE_LOSS_NAMES = {
    "mse": "mse", "ncc": "ncc", "mi": "mi", "mutual_information": "mi",
    "mutualinformation": "mi",
}


def image_loss_name(value: Any) -> str | None:
    """``"mse"``, ``"ncc"`` or ``"mi"`` for a loss name as metadata store it, else ``None``.

    >>> image_loss_name("NCC (window 9)"), image_loss_name("mutual-information"), image_loss_name(3)
    ('ncc', 'mi', None)
    """
    if not isinstance(value, str):
        return None
    key = value.strip().lower().replace("-", "_").split(" ")[0]
    return _IMAGE_LOSS_NAMES.get(key)


def _is_smoothness(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().replace("-", "_").split(" ")[0] in (
        "grad", "l2", "l1", "grad_l2", "grad_l1")


def loss_settings(model: nn.Module) -> tuple[str, float]:
    """The image loss name (``"mse"``, ``"ncc"`` or ``"mi"``) and the smoothness weight a model
    was trained with, read from its metadata (``image_loss`` / ``lambda`` as ``voxreg train``
    stores them, ``losses`` / ``smooth_lambda``, or the trainer's ``training`` record); ``("mse",
    0.01)`` -- VoxelMorph's defaults -- for what the metadata does not say.

    >>> model = nn.Identity()
    >>> loss_settings(model)
    ('mse', 0.01)
    >>> model.metadata = {"losses": ["ncc", "grad"], "loss_weights": [1.0, 2.0]}
    >>> loss_settings(model)
    ('ncc', 2.0)
    """
    meta = getattr(model, "metadata", None)
    meta = meta if isinstance(meta, dict) else {}
    records = [meta] + [meta[k] for k in ("training", "training_summary")
                        if isinstance(meta.get(k), dict)]
    image_loss = image_loss_name(meta.get("image_loss"))
    lambda_: float | None = None
    for key in ("lambda", "smooth_lambda"):
        if isinstance(meta.get(key), (int, float)) and not isinstance(meta.get(key), bool):
            lambda_ = float(meta[key])
            break
    for record in records:
        names = record.get("losses")
        if not isinstance(names, list) or not names:
            continue
        if image_loss is None:
            image_loss = image_loss_name(names[0])
        weights = record.get("loss_weights")
        if lambda_ is None and isinstance(weights, list) and len(weights) == len(names):
            for name, weight in zip(names, weights):
                if _is_smoothness(name) and isinstance(weight, (int, float)):
                    lambda_ = float(weight)
                    break
    return image_loss or "mse", 0.01 if lambda_ is None else lambda_

