"""voxreg: learning-based deformable image registration (VoxelMorph and beyond) in PyTorch."""

from voxreg import _runtime, data, layers, losses, networks, transforms
from voxreg.affine import register_affine
from voxreg.checkpoint import list_models, load_checkpoint, load_model, save_model
from voxreg.registration import finetune, register
from voxreg.training import Trainer, train
from voxreg.transforms import (
    affine_to_disp,
    compose,
    disp_from_world,
    disp_to_world,
    folding_fraction,
    integrate_velocity,
    invert,
    jacobian_determinant,
    resize_disp,
    warp,
    warp_points,
)

__version__ = "0.1.0"

_runtime._apply_default()

__all__ = [
    "Trainer",
    "data",
    "finetune",
    "list_models",
    "load_checkpoint",
    "load_model",
    "losses",
    "networks",
    "plot",
    "register",
    "register_affine",
    "save_model",
    "train",
    "affine_to_disp",
    "compose",
    "disp_from_world",
    "disp_to_world",
    "folding_fraction",
    "integrate_velocity",
    "invert",
    "jacobian_determinant",
    "layers",
    "resize_disp",
    "transforms",
    "warp",
    "warp_points",
]


def __getattr__(name: str):
    # matplotlib is imported only when pictures are wanted
    if name == "plot":
        import importlib

        return importlib.import_module("voxreg.plot")
    raise AttributeError(f"module 'voxreg' has no attribute {name!r}")
