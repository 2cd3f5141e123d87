"""The models shipped with voxreg, as ``voxreg models`` lists them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from voxreg.checkpoint import MODELS_DIR, list_models

__all__ = ["ModelInfo", "list_model_info"]


@dataclass(frozen=True)
class ModelInfo:
    """A shipped model.

    Attributes:
        name: what ``--model`` / :func:`voxreg.load_model` accept (e.g. ``"brain2d-smooth"``).
        path: its ``.safetensors`` file inside the package.
        size_bytes: the file's size.
    """

    name: str
    path: Path
    size_bytes: int


def list_model_info() -> list[ModelInfo]:
    """The models shipped inside the package, sorted by name (empty when there are none).

    >>> "brain2d-smooth" in [m.name for m in list_model_info()]
    True
    """
    infos = []
    for name in list_models():
        path = MODELS_DIR / f"{name}.safetensors"
        infos.append(ModelInfo(name, path, path.stat().st_size))
    return infos
