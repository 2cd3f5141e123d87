"""voxreg: learning-based deformable image registration (VoxelMorph and beyond) in PyTorch.

The package's public face: the names below are re-exported from the modules that own them and
are imported on first use, so ``import voxreg`` is cheap and changes no process-wide state
(:func:`tune_allocator` is opt-in; the ``voxreg`` command applies it).

Layers, bottom to top (imports point down only; ``docs/architecture.md``)::

    _checks, _atomic, _runtime, _version       checks, atomic writes, devices
    transforms, losses, metrics                the functional core
    io, plot, data, nn                         files, pictures, datasets, networks
    checkpoint, registration, evaluation,
    affine, training                           models on disk, registration, training engine
    apps                                       file-level pipelines and shipped-model recipes
    cli                                        the ``voxreg`` command

>>> import voxreg
>>> voxreg.warp.__module__
'voxreg.transforms'
"""

from __future__ import annotations

import importlib
from typing import Any

from voxreg._version import __version__

# name -> module that owns it (a module name alone for the subpackages and modules)
_EXPORTS = {
    "affine_to_disp": "voxreg.transforms",
    "compose": "voxreg.transforms",
    "disp_from_world": "voxreg.transforms",
    "disp_to_world": "voxreg.transforms",
    "folding_fraction": "voxreg.transforms",
    "integrate_velocity": "voxreg.transforms",
    "invert": "voxreg.transforms",
    "jacobian_determinant": "voxreg.transforms",
    "resize_disp": "voxreg.transforms",
    "warp": "voxreg.transforms",
    "warp_points": "voxreg.transforms",
    "list_models": "voxreg.checkpoint",
    "load_checkpoint": "voxreg.checkpoint",
    "load_model": "voxreg.checkpoint",
    "save_model": "voxreg.checkpoint",
    "finetune": "voxreg.registration",
    "register": "voxreg.registration",
    "register_affine": "voxreg.affine",
    "Trainer": "voxreg.training",
    "train": "voxreg.training",
    "tune_allocator": "voxreg._runtime",
    "register_files": "voxreg.apps.register",
}
_MODULES = {
    "affine": "voxreg.affine",
    "apps": "voxreg.apps",
    "checkpoint": "voxreg.checkpoint",
    "data": "voxreg.data",
    "evaluation": "voxreg.evaluation",
    "io": "voxreg.io",
    "losses": "voxreg.losses",
    "metrics": "voxreg.metrics",
    "nn": "voxreg.nn",
    "plot": "voxreg.plot",
    "registration": "voxreg.registration",
    "training": "voxreg.training",
    "transforms": "voxreg.transforms",
    # VoxelMorph's module names (``vxm.networks.VxmDense``, ``vxm.layers.SpatialTransformer``)
    "networks": "voxreg.nn.networks",
    "layers": "voxreg.nn.layers",
}

__all__ = ["__version__", *sorted(_EXPORTS), *sorted(_MODULES)]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'voxreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
