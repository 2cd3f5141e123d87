"""Affine registration by multi-resolution optimisation of 6 (2D) or 12 (3D) parameters.

:func:`register_affine` finds the affine map that pulls the moving image onto the fixed one, for
two images on any grids (each with its own voxel-to-world affine), and returns an
:class:`AffineResult`. :func:`affine_prealign` is the affine step of a pipeline;
:func:`save_itk_affine` / :func:`load_itk_affine` exchange the transform with ANTs and ITK.

Directions (``docs/conventions.md``, rules 4, 5 and 12): every transform here pulls back. The
result maps a point of the **fixed** image to the point of the **moving** image it should show:

* ``AffineResult.world_matrix``, ``(ndim+1, ndim+1)``: fixed RAS mm -> moving RAS mm (2D images
  use the first two world axes: rows and columns 0, 1, 3 of the 4x4 NIfTI affines);
* ``AffineResult.voxel_matrix``, ``(ndim, ndim+1)``: fixed voxel index -> moving voxel index in
  **absolute** voxel coordinates (the ``shift_center=False`` form):
  ``voxel_matrix = inv(moving.affine) @ world_matrix @ fixed.affine`` (top rows).
  :meth:`AffineResult.voxel_affine` gives it as a tensor, also in the centred form.

Losses (lower is better): ``"mi"`` (default; Mattes mutual information, 32 bins, for any pair
of contrasts), ``"ncc"`` (global normalised cross-correlation, negated), ``"lncc"`` (local NCC,
:func:`voxreg.losses.ncc`) and ``"mse"`` (over the variance of the fixed sample). Both images
are first scaled to [0, 1] (``normalize``); the moving image reads 0 outside its grid, and the
global losses count only the fixed points that map inside it.

With a deformable model: :meth:`AffineResult.disp` is the affine as a displacement
``(1, ndim, *fixed_shape)`` in fixed voxels, acting on the moving image resampled onto the fixed
grid through the headers (:func:`voxreg.io.resample_to`). If a deformable model then registers
the affinely moved image to the fixed one with ``deformable_disp``, the whole transform is
``voxreg.transforms.compose(result.disp(), deformable_disp)`` (rule 6: the affine first).
:meth:`AffineResult.resample` resamples the original moving image in one step instead, without
losing what the first resampling crops.

Modules, lowest first: ``matrices``, ``pyramid``, ``objective``, ``optimise``, ``itk``,
``result``, ``register``. Design notes: ``docs/affine.md``.
"""

from voxreg.affine.itk import load_itk_affine, save_itk_affine
from voxreg.affine.register import (
    DEFAULT_LEVELS,
    DEFAULT_MAX_POINTS,
    INITS,
    LOSSES,
    OPTIMIZERS,
    Init,
    Loss,
    Optimizer,
    affine_prealign,
    register_affine,
)
from voxreg.affine.result import AffineResult

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_MAX_POINTS",
    "INITS",
    "LOSSES",
    "OPTIMIZERS",
    "AffineResult",
    "Init",
    "Loss",
    "Optimizer",
    "affine_prealign",
    "load_itk_affine",
    "register_affine",
    "save_itk_affine",
]
