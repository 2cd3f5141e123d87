"""The result of affine registration, :class:`AffineResult`: the transform in world and voxel
coordinates, and what it does to images (resampling, a displacement field, an ITK file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from voxreg import io
from voxreg.affine.itk import save_itk_affine
from voxreg.affine.matrices import embed_4x4, grid_affine
from voxreg.transforms import affine_to_disp


@dataclass
class AffineResult:
    """What :func:`voxreg.affine.register_affine` found.

    Attributes:
        world_matrix: ``(ndim+1, ndim+1)`` fixed RAS mm -> moving RAS mm (pull-back).
        voxel_matrix: ``(ndim, ndim+1)`` fixed voxel index -> moving voxel index, absolute
            coordinates (the ``shift_center=False`` form of ``docs/conventions.md`` rule 5).
        fixed_shape, fixed_affine: the fixed grid (``fixed_affine`` 4x4).
        moving_shape, moving_affine: the moving grid.
        loss: final value of the loss (lower is better) at the finest level.
        initial_loss: the loss at the finest level at the start (after the initialisation).
        loss_name: ``"mi"``, ``"ncc"``, ``"lncc"`` or ``"mse"``.
        seconds: wall time of the registration (pyramid, initialisation and optimisation).
        params: the optimised parameters (translation, rotation, log-scale, shear; in units of
            the fixed image's radius of gyration), for inspection.
        history: one entry per stage: ``{"shrink", "stage", "optimizer", "evaluations",
            "loss", "seconds"}`` (evaluations: loss and gradient computations).
        fixed_header: the fixed image's header (used when writing images on its grid).
    """

    world_matrix: np.ndarray
    voxel_matrix: np.ndarray
    fixed_shape: tuple[int, ...]
    fixed_affine: np.ndarray
    moving_shape: tuple[int, ...]
    moving_affine: np.ndarray
    loss: float
    initial_loss: float
    loss_name: str
    seconds: float
    params: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    fixed_header: Any = None

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.fixed_shape)

    def voxel_affine(self, shift_center: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
        """The voxel matrix as a tensor ``(1, ndim, ndim+1)`` for :mod:`voxreg.transforms`.

        With ``shift_center=True`` it acts on coordinates centred on the **fixed** grid's middle
        ``c = (fixed_shape - 1) / 2``: ``A x = M (x - c) + t' + c``, ``t' = t + M c - c``. That form
        means what ``warp(image, A)`` does only when the moving and fixed grids have the same
        shape (``warp`` centres both sides on the image's own grid).
        """
        matrix = self.voxel_matrix.copy()
        if shift_center:
            n = self.ndim
            center = (np.asarray(self.fixed_shape, dtype=np.float64) - 1) / 2
            matrix[:, n] = matrix[:, n] + matrix[:, :n] @ center - center
        return torch.as_tensor(matrix, dtype=dtype)[None]

    def fixed_grid_matrix(self) -> np.ndarray:
        """``(ndim, ndim+1)``: the transform in fixed voxel coordinates on both sides,
        ``inv(fixed.affine) @ world_matrix @ fixed.affine``; it acts on the moving image after
        that image was resampled onto the fixed grid through the headers. Equal to
        :attr:`voxel_matrix` when the two grids are the same."""
        fixed = grid_affine(self.fixed_affine, self.ndim)
        return (np.linalg.inv(fixed) @ self.world_matrix @ fixed)[: self.ndim]

    def disp(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense displacement ``(1, ndim, *fixed_shape)`` in fixed voxels equal to the affine.

        It pulls back the moving image **resampled onto the fixed grid through the headers**
        (:func:`voxreg.io.resample_to`): ``warp(resampled, disp) ≈ self.resample(moving)``,
        except near the fixed grid's borders, where the first resampling cropped the moving
        image. Compose it with a deformable field found afterwards as
        ``voxreg.transforms.compose(disp, deformable_disp)``.
        """
        matrix = torch.as_tensor(self.fixed_grid_matrix(), dtype=torch.float64)[None]
        return affine_to_disp(matrix, self.fixed_shape, shift_center=False).to(dtype)

    def resample(
        self,
        moving: io.Image | np.ndarray,
        interp: Literal["linear", "nearest", "label"] | None = None,
        fill_value: float = 0.0,
    ) -> io.Image:
        """Resample ``moving`` (an image or label map on the moving grid) onto the fixed grid.

        ``out(x) = moving(voxel_matrix @ x)``, one interpolation. ``interp`` defaults to nearest
        for integer data (label maps keep their values and dtype) and linear otherwise;
        ``"label"`` carries a label map as ANTs' ``genericLabel`` does (the label whose linearly
        interpolated indicator is largest: smoother boundaries than nearest).

        Returns:
            an :class:`voxreg.io.Image` with the fixed grid's shape, affine and header.
        """
        image = as_image(moving, "moving")
        if image.shape != tuple(self.moving_shape):
            raise ValueError(
                f"moving must be on the registered moving grid, shape {tuple(self.moving_shape)}, "
                f"got {image.shape}"
            )
        if not np.allclose(image.affine, self.moving_affine, atol=1e-3) and not np.allclose(
                image.affine, np.eye(4)):
            raise ValueError(
                "moving has another affine than the registered moving image; resample it onto "
                "that image's grid first"
            )
        # resample_to reads the moving image at inv(A_m') A_f x; with A_m' = inv(W) A_m that
        # is inv(A_m) W A_f x, the registered map.
        shifted = io.Image(image.data, np.linalg.inv(embed_4x4(self.world_matrix))
                           @ np.asarray(self.moving_affine, dtype=np.float64),
                           image.header, image.path, image.channels)
        target = io.Image(np.zeros(self.fixed_shape, np.uint8), self.fixed_affine, self.fixed_header)
        return io.resample_to(shifted, target, interp=interp, fill_value=fill_value)

    def save_itk(self, path: str | Path) -> Path:
        """Write the world matrix as an ITK/ANTs transform: ``.mat`` (MATLAB v4 binary, as ANTs
        writes) or text for any other extension (see :func:`save_itk_affine`)."""
        return save_itk_affine(path, self.world_matrix)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def as_image(value: Any, name: str) -> io.Image:
    """An :class:`io.Image` from an Image, a numpy array or a tensor ``(*spatial)``."""
    if isinstance(value, io.Image):
        return value
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim not in (2, 3):
            raise ValueError(
                f"{name} must be a 2D or 3D array (*spatial) or a voxreg.io.Image, got shape "
                f"{value.shape}"
            )
        return io.Image(value)
    raise TypeError(f"{name} must be a voxreg.io.Image, a numpy array or a tensor, "
                    f"got {type(value).__name__}")
