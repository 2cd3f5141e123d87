"""The models shipped with voxreg, as ``voxreg models`` lists them: what each is for and the
domain it was trained in (:class:`voxreg.domain.ModelDomain`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from voxreg._runtime import MODELS_DIR
from voxreg.checkpoint import list_models, read_checkpoint
from voxreg.domain import ModelDomain
from voxreg.nn.registry import REGISTRATION_CLASSES

__all__ = ["ModelInfo", "list_model_info"]


@dataclass(frozen=True)
class ModelInfo:
    """A shipped model.

    Attributes:
        name: what ``--model`` / :func:`voxreg.load_model` accept (e.g. ``"brain2d-smooth"``).
        path: its ``.safetensors`` file inside the package.
        size_bytes: the file's size.
        model_class: its class (``"VxmDense"``, ``"TemplateCreation"``...).
        registration: whether it registers a pair (``voxreg register --model NAME``); template
            models hold a template and the network that registers it to subjects.
        domain: what it was trained on, or ``None`` when its file records nothing.
        description: what it is, from its file.
    """

    name: str
    path: Path
    size_bytes: int
    model_class: str = ""
    registration: bool = False
    domain: ModelDomain | None = None
    description: str = ""


def _description(meta: dict) -> str:
    for key in ("description", "task"):
        if isinstance(meta.get(key), str):
            return meta[key]
    return ""


def list_model_info() -> list[ModelInfo]:
    """The models shipped inside the package, sorted by name (empty when there are none).

    Reads only the files' headers (no weights are loaded).

    >>> info = {m.name: m for m in list_model_info()}
    >>> info["brain3d-diff"].registration, info["brain3d-diff"].domain.shape
    (True, (96, 112, 96))
    """
    infos = []
    for name in list_models():
        path = MODELS_DIR / f"{name}.safetensors"
        header, _, _ = read_checkpoint(path)
        config = json.loads(header.get("config", "{}"))
        meta = json.loads(header.get("metadata", "{}"))
        domain = ModelDomain.from_metadata(meta.get("domain"))
        cls = str(config.get("class", ""))
        registration = cls in REGISTRATION_CLASSES and (domain is None
                                                        or domain.purpose == "registration")
        infos.append(ModelInfo(name, path, path.stat().st_size, cls, registration, domain,
                               _description(meta)))
    return infos
