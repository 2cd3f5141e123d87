"""Every model class by name: :func:`build_model` rebuilds any voxreg model from its ``config``.

A model's :attr:`config` is a JSON-serialisable dict ``{"class": name, **constructor_args}``;
checkpoints store it (:mod:`voxreg.checkpoint`), and ``build_model(config)`` followed by
``load_state_dict`` restores the model. This is the one table of model classes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from voxreg.nn.networks import Transform, Unet, VxmDense
from voxreg.nn.template import TEMPLATE_CLASSES

__all__ = ["MODEL_CLASSES", "REGISTRATION_CLASSES", "build_model"]

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "Unet": Unet,
    "VxmDense": VxmDense,
    "Transform": Transform,
    **TEMPLATE_CLASSES,
}
"""Model classes by the name their ``config["class"]`` holds."""

REGISTRATION_CLASSES = ("VxmDense",)
"""The classes that register a pair ``(moving, fixed)``."""


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its :attr:`config` (``{"class": name, **constructor_args}``).

    The model comes back freshly initialised; load its weights with ``load_state_dict``.

    Raises:
        ValueError: when ``config`` is not a dict with a known ``"class"``.

    >>> model = build_model({"class": "Transform", "inshape": [8, 8]})
    >>> type(model).__name__
    'Transform'
    """
    if not isinstance(config, dict) or "class" not in config:
        raise ValueError(f"config must be a dict with a 'class' key, got {config!r}")
    args = dict(config)
    name = args.pop("class")
    if name not in MODEL_CLASSES:
        raise ValueError(f"config names an unknown model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name](**args)
