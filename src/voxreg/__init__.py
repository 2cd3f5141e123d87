"""voxreg: learning-based deformable image registration (VoxelMorph and beyond) in PyTorch."""

from voxreg import _runtime, layers, transforms
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
