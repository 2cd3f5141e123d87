"""Affine registration by multi-resolution optimisation of 6 (2D) or 12 (3D) parameters.

:func:`register_affine` finds the affine map that pulls the moving image onto the fixed one, for
two images on any grids (each with its own voxel-to-world affine), and returns an
:class:`AffineResult`. :func:`affine_prealign` is the entry point for a pipeline (affine, then a
deformable model); :func:`save_itk_affine` / :func:`load_itk_affine` exchange the transform with
ANTs and ITK.

Directions (``docs/conventions.md``, rules 4, 5 and 12): every transform here pulls back. The
result maps a point of the **fixed** image to the point of the **moving** image it should show:

* ``AffineResult.world_matrix``, ``(ndim+1, ndim+1)``: fixed RAS mm -> moving RAS mm (2D images
  use the first two world axes: rows and columns 0, 1, 3 of the 4x4 NIfTI affines);
* ``AffineResult.voxel_matrix``, ``(ndim, ndim+1)``: fixed voxel index -> moving voxel index in
  **absolute** voxel coordinates, i.e. the ``shift_center=False`` form:
  ``voxel_matrix = inv(moving.affine) @ world_matrix @ fixed.affine`` (top rows). Use
  :meth:`AffineResult.voxel_affine` for a tensor, also in the centred (``shift_center=True``) form.

Design (and why):

* **Optimisation, not a learned network**: a classical optimiser needs no training data, works
  on any grid, contrast and field of view, and with 12 parameters is fast on a CPU.
* **Start from physical alignment plus centres of mass**: both images' affines give the first
  voxel-to-voxel map (so scanner coordinates are honoured), and the moving image's intensity
  centre of mass is moved onto the fixed one's (what ANTs' ``[fixed,moving,1]`` does). Large
  head-position offsets are then gone before any iteration.
* **Parameters**: translation ``t``, rotation (matrix exponential of a skew matrix: 1 angle in
  2D, 3 in 3D), log-scales (``ndim``), shears (upper triangle); ``L = R @ diag(exp(s)) @ H`` and
  ``W(x) = L (x - c_f) + c_m + t`` about the fixed centre of mass ``c_f``. The log-scale keeps
  scales positive, and turning about the centre of mass decouples rotation from translation.
  Every parameter is scaled by the fixed image's radius of gyration ``r`` (translation =
  ``r * p``), so a unit step of any parameter moves points by about ``r`` millimetres: the
  problem is well scaled for the optimiser, whatever the image size or units.
* **Gaussian pyramid** (default shrink 4, 2, 1 relative to the fixed image's finest spacing;
  Gaussian smoothing with sigma = shrink / 2 voxels before each shrink, as ANTs does): the
  coarse levels are cheap and have a wide capture range; the fine levels add precision. Both
  images are brought to about the same spacing at each level, so grids of different
  resolutions are treated alike.
* **Rigid, then affine**: at the coarsest level translation and rotation are fitted first
  (``rigid_iterations``), so scales and shears do not absorb a misalignment early on.
* **Adam, then L-BFGS** (``optimizer="adam+lbfgs"``): Adam on the coarsest level, where the
  alignment is rough and its momentum carries it past shallow local optima (on the small
  synthetic images of the tests L-BFGS alone, or L-BFGS after a rigid Adam stage, stopped short
  where Adam did not); L-BFGS with a strong Wolfe line search on the finer levels, where the
  start is close and it needs few loss evaluations (on the brain benchmark about 120
  evaluations per pair against 220 for Adam on every level, at the same Dice). Adam's learning
  rate halves per level and whenever the loss stalls for ``patience`` steps; a stage ends on a
  plateau (Adam) or when the loss and step stop changing (L-BFGS, ``tol``), or after
  ``iterations``.
* **Only overlapping points count**: a fixed point that maps outside the moving grid is left
  out of the loss (as in ITK and ANTs), so a moving image with a smaller field of view is not
  pulled around by the zeros read outside it.
* **Point sampling**: global losses (``"mi"``, ``"ncc"``, ``"mse"``) are evaluated on at most
  ``max_points`` fixed voxels per level, a fixed random subset (seeded: the result is
  deterministic for a given machine and thread count), as ANTs samples 20% of the voxels; the
  moving image is read only there. The local NCC needs the whole grid.
* **Closed-form gradients** (global losses): the moving image is read with its exact spatial
  gradient in one gather of each point's cell corners (:class:`_LinearSampler`), and the
  loss's derivative in the moved intensities is written out (MI: ``log(p_ij / (p_i q_j))``
  times the B-spline slopes; NCC; MSE), so autograd only runs the 12-parameter graph
  (:class:`_PointLoss`). Same values and gradients as autograd through ``grid_sample`` and
  the losses' direct definitions (the tests hold those references; agreement to 1e-6), in
  about half the time per evaluation (65536 points of a 3D brain: 12.5 against 22.5 ms on one
  thread).
* **Pyramid as a cascade**: each coarser level is smoothed from the finer one (sigmas add in
  quadrature), so the wide kernels of the coarse levels run on small grids.

Losses (all lower is better): ``"mi"`` (default; mutual information, 32 bins, for any pair of
contrasts; a Mattes-style histogram, the measure of :func:`voxreg.losses.mutual_information`
with a compact Parzen window, about ten times cheaper per step), ``"ncc"`` (global
normalised cross-correlation, negated: same contrast up to a linear map, or an inverted
contrast), ``"lncc"`` (local NCC, :func:`voxreg.losses.ncc`), ``"mse"`` (same contrast; divided by
the variance of the fixed sample so that, like the others, its values are of order 1 and one
stopping tolerance suits every loss). Images
are first scaled to [0, 1] (``normalize``, default percentiles 0.5-99.5) so the loss sees the same
range whatever the scanner's units. Outside the moving image's grid samples read 0.

Pipeline use (``voxreg register --affine``): :func:`affine_prealign` takes two
:class:`voxreg.io.Image` and returns the result and the moving image resampled onto the fixed
grid. :meth:`AffineResult.disp` turns the affine into a displacement ``(1, ndim, *fixed_shape)``
in fixed voxels, acting on the moving image *resampled onto the fixed grid through the headers*
(``voxreg.io.resample_to(moving, fixed)``, what ``voxreg warp --resample`` does). If a
deformable model then registers the affinely moved image to the fixed one with displacement
``deformable_disp``, the whole transform is ``voxreg.transforms.compose(affine_disp,
deformable_disp)`` (rule 6: ``compose(first, second)`` applies ``first`` to the image, then
``second``; as point maps it is ``x -> phi_affine(phi_deformable(x))``). Moving content outside
the fixed field of view is lost by that route (the first resampling crops it); resampling the
original moving image in one step (:meth:`AffineResult.resample`) has no such loss.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from voxreg import io, losses
from voxreg._atomic import atomic_path

__all__ = [
    "LOSSES",
    "AffineResult",
    "affine_prealign",
    "load_itk_affine",
    "register_affine",
    "save_itk_affine",
]

Loss = Literal["mi", "ncc", "lncc", "mse"]
Init = Literal["com", "center", "header"]
Optimizer = Literal["adam+lbfgs", "lbfgs", "adam"]
LOSSES = ("mi", "ncc", "lncc", "mse")
INITS = ("com", "center", "header")
OPTIMIZERS = ("adam+lbfgs", "lbfgs", "adam")

# chosen on 3D brains (benchmarks/bench_affine.py); iterations are upper bounds per level. The
# finest level of "adam+lbfgs" takes at most 10 L-BFGS iterations: on the 30 ixi-raw pairs 20
# gave the same Dice (label 0.517 vs 0.516, mask 0.9645 vs 0.9643) in 0.75 instead of 0.66 s.
# Points per level (first, middle, finest) and Adam's patience of 4: on the same pairs the same
# label Dice as 65536 points everywhere with patience 8 (0.5245 vs 0.5242, label interpolation)
# in 0.55 of the time (benchmarks/README.md).
DEFAULT_LEVELS = (4, 2, 1)
DEFAULT_MAX_POINTS = (8192, 32768, 65536)
# per optimizer: iterations at the first, middle and finest levels, and rigid iterations
_OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam+lbfgs": {"iterations": (200, 30, 10), "rigid_iterations": 50},
    "lbfgs": {"iterations": (50, 30, 20), "rigid_iterations": 20},
    "adam": {"iterations": (200, 100, 50), "rigid_iterations": 50},
}


# --------------------------------------------------------------------------------------------
# small matrix helpers (numpy, float64)
# --------------------------------------------------------------------------------------------


def _grid_affine(affine: np.ndarray, ndim: int) -> np.ndarray:
    """The ``(ndim+1, ndim+1)`` voxel-to-world matrix of a grid from its 4x4 affine (2D: rows and
    columns 0, 1, 3)."""
    affine = np.asarray(affine, dtype=np.float64)
    if ndim == 3:
        return affine.copy()
    keep = [0, 1, 3]
    return affine[np.ix_(keep, keep)].copy()


def _embed_4x4(matrix: np.ndarray) -> np.ndarray:
    """A 2D ``(3, 3)`` world matrix as a 4x4 one (third axis untouched); a 4x4 is returned as is."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape == (4, 4):
        return matrix.copy()
    out = np.eye(4)
    keep = [0, 1, 3]
    out[np.ix_(keep, keep)] = matrix
    return out


def _square(matrix: np.ndarray, name: str) -> np.ndarray:
    """``(n, n+1)`` or ``(n+1, n+1)`` (n = 2 or 3) as a square homogeneous float64 matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] not in (3, 4) or matrix.shape[0] not in (
            matrix.shape[1] - 1, matrix.shape[1]):
        raise ValueError(
            f"{name} must be a (2, 3), (3, 3), (3, 4) or (4, 4) affine matrix, got shape {matrix.shape}"
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{name} contains NaN or infinite values")
    n = matrix.shape[1] - 1
    if matrix.shape[0] == n + 1:
        bottom = np.zeros(n + 1)
        bottom[n] = 1.0
        if not np.allclose(matrix[n], bottom, atol=1e-6):
            raise ValueError(f"{name} is square but its last row is not [0, ..., 0, 1]")
        return matrix.copy()
    out = np.eye(n + 1)
    out[:n] = matrix
    return out


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------


@dataclass
class AffineResult:
    """What :func:`register_affine` found.

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
        fixed = _grid_affine(self.fixed_affine, self.ndim)
        return (np.linalg.inv(fixed) @ self.world_matrix @ fixed)[: self.ndim]

    def disp(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense displacement ``(1, ndim, *fixed_shape)`` in fixed voxels equal to the affine.

        It pulls back the moving image **resampled onto the fixed grid through the headers**
        (:func:`voxreg.io.resample_to`): ``warp(resampled, disp) ≈ self.resample(moving)`` (away
        from the fixed grid's borders, where the first resampling cropped the moving image).
        Compose it with a deformable field found afterwards as
        ``voxreg.transforms.compose(disp, deformable_disp)``.
        """
        from voxreg.transforms import affine_to_disp

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
        image = _as_image(moving, "moving")
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
        shifted = io.Image(image.data, np.linalg.inv(_embed_4x4(self.world_matrix))
                           @ np.asarray(self.moving_affine, dtype=np.float64),
                           image.header, image.path, image.channels)
        target = io.Image(np.zeros(self.fixed_shape, np.uint8), self.fixed_affine, self.fixed_header)
        return io.resample_to(shifted, target, interp=interp, fill_value=fill_value)

    def save_itk(self, path: str | Path) -> Path:
        """Write the world matrix as an ITK/ANTs text transform (see :func:`save_itk_affine`)."""
        return save_itk_affine(path, self.world_matrix)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _as_image(value: Any, name: str) -> io.Image:
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


def _checked_image(value: Any, name: str) -> io.Image:
    image = _as_image(value, name)
    if image.channels:
        raise ValueError(f"{name} has {image.data.shape[0]} channels; affine registration reads "
                         "one-channel images")
    if image.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2D or 3D, got shape {image.shape}")
    if any(s < 2 for s in image.shape):
        raise ValueError(f"{name} must have at least 2 voxels along every axis, got {image.shape}")
    data = np.asarray(image.data)
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {data.dtype}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{name} contains NaN or infinite values")
    affine = np.asarray(image.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{name} must have a finite (4, 4) affine")
    if abs(np.linalg.det(_grid_affine(affine, image.ndim)[: image.ndim, : image.ndim])) < 1e-12:
        raise ValueError(f"{name}'s affine is singular (zero voxel size?)")
    return image


# --------------------------------------------------------------------------------------------
# pyramid
# --------------------------------------------------------------------------------------------


@dataclass
class _Level:
    """One image at one pyramid level: data ``(1, 1, *shape)`` and voxel-to-world matrix."""

    data: Tensor
    grid_to_world: np.ndarray  # (ndim+1, ndim+1)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[2:])


def _pyramid(data: np.ndarray, grid_to_world: np.ndarray, targets: Sequence[float]) -> list[_Level]:
    """One :class:`_Level` per target spacing (in the order given): ``data`` smoothed and shrunk
    so that its spacing is about the target (never finer than it is).

    Per axis the shrink factor is ``f = max(1, target / spacing)``, the Gaussian sigma ``f / 2``
    original voxels (as ANTs smooths) and the new size ``round((n - 1) / f) + 1`` (the end voxel
    centres are kept, ``align_corners``). The levels are made finest first, each from the one
    before it (a Gaussian cascade: the sigmas add in quadrature), so the wide kernels of the
    coarse levels run on the small grids: on 120x120x90 volumes that is 4x cheaper than
    smoothing the full image for every level.
    """
    from scipy import ndimage

    ndim = data.ndim
    spacing = np.sqrt((grid_to_world[:ndim, :ndim] ** 2).sum(0))
    order = sorted(range(len(targets)), key=lambda k: targets[k])
    out: list[_Level | None] = [None] * len(targets)
    source = np.ascontiguousarray(data, dtype=np.float32)  # the finest level so far
    source_sigma = np.zeros(ndim)  # its smoothing, millimetres per axis
    source_step = np.ones(ndim)  # its voxel size in original voxels
    for k in order:
        factors = np.maximum(1.0, targets[k] / spacing)
        sigma = np.where(factors > 1.0 + 1e-6, factors / 2, 0.0) * spacing
        extra = np.sqrt(np.maximum(sigma ** 2 - source_sigma ** 2, 0.0)) / (source_step * spacing)
        if np.any(extra > 1e-6):
            source = ndimage.gaussian_filter(source, list(extra), mode="nearest", truncate=3.0)
            source_sigma = np.maximum(sigma, source_sigma)
        new_shape = tuple(max(2, int(round((n - 1) / f)) + 1) if n > 1 else 1
                          for n, f in zip(data.shape, factors))
        tensor = torch.from_numpy(source)[None, None]
        if new_shape != source.shape:
            mode = "bilinear" if ndim == 2 else "trilinear"
            tensor = F.interpolate(tensor, size=new_shape, mode=mode, align_corners=True)
        steps = np.array([(n - 1) / (m - 1) if m > 1 else 1.0
                          for n, m in zip(data.shape, new_shape)])
        out[k] = _Level(tensor.contiguous(), grid_to_world @ np.diag(np.append(steps, 1.0)))
        source, source_step = tensor[0, 0].numpy(), steps
    return [level for level in out if level is not None]


def _center_of_mass(data: np.ndarray, grid_to_world: np.ndarray) -> tuple[np.ndarray, float]:
    """Intensity centre of mass (world) and radius of gyration (world units) of a [0, 1] image."""
    ndim = data.ndim
    weights = np.clip(data, 0, None).astype(np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    weights /= weights.sum()
    # index moments from the marginals (no per-voxel coordinate arrays): means from the 1D
    # marginals, second moments from the 2D ones
    axes = [np.arange(s, dtype=np.float64) for s in data.shape]
    mean = np.array([weights.sum(tuple(b for b in range(ndim) if b != a)) @ axes[a]
                     for a in range(ndim)])
    moment = np.empty((ndim, ndim))
    for a in range(ndim):
        for b in range(a, ndim):
            if a == b:
                value = weights.sum(tuple(c for c in range(ndim) if c != a)) @ axes[a] ** 2
            else:
                pair = weights.sum(tuple(c for c in range(ndim) if c not in (a, b)))
                value = axes[a] @ pair @ axes[b]
            moment[a, b] = moment[b, a] = value
    covariance = moment - np.outer(mean, mean)
    linear = grid_to_world[:ndim, :ndim]
    center = linear @ mean + grid_to_world[:ndim, ndim]
    radius = float(np.sqrt(max(np.trace(linear @ covariance @ linear.T), 0.0)))
    return center, radius


def _grid_center(shape: Sequence[int], grid_to_world: np.ndarray) -> np.ndarray:
    ndim = len(shape)
    middle = (np.asarray(shape, dtype=np.float64) - 1) / 2
    return grid_to_world[:ndim, :ndim] @ middle + grid_to_world[:ndim, ndim]


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------


def _param_layout(ndim: int) -> dict[str, slice]:
    """Where each kind of parameter sits: translation, rotation, log-scale, shear."""
    n_rot = ndim * (ndim - 1) // 2
    return {
        "translation": slice(0, ndim),
        "rotation": slice(ndim, ndim + n_rot),
        "scale": slice(ndim + n_rot, 2 * ndim + n_rot),
        "shear": slice(2 * ndim + n_rot, 2 * ndim + 2 * n_rot),
    }


def _linear_part(params: Tensor, ndim: int) -> Tensor:
    """``L = R @ diag(exp(s)) @ H`` from the parameters (``(ndim, ndim)``, params' dtype)."""
    layout = _param_layout(ndim)
    upper = torch.triu_indices(ndim, ndim, offset=1)
    zeros = torch.zeros(ndim, ndim, dtype=params.dtype)
    skew = zeros.index_put((upper[0], upper[1]), params[layout["rotation"]])
    skew = skew - skew.T
    rotation = torch.linalg.matrix_exp(skew)
    scale = torch.diag(torch.exp(params[layout["scale"]]))
    shear = torch.eye(ndim, dtype=params.dtype) + zeros.index_put(
        (upper[0], upper[1]), params[layout["shear"]])
    return rotation @ scale @ shear


def _world_matrix(params: Tensor, ndim: int, fixed_center: Tensor, moving_center: Tensor,
                  radius: float) -> Tensor:
    """``(ndim+1, ndim+1)`` fixed world -> moving world: ``W x = L (x - c_f) + c_m + r t``."""
    linear = _linear_part(params, ndim)
    translation = moving_center + radius * params[_param_layout(ndim)["translation"]] \
        - linear @ fixed_center
    top = torch.cat([linear, translation[:, None]], dim=1)
    bottom = torch.zeros(1, ndim + 1, dtype=params.dtype)
    bottom[0, ndim] = 1.0
    return torch.cat([top, bottom], dim=0)


# --------------------------------------------------------------------------------------------
# sampling and losses
# --------------------------------------------------------------------------------------------


def _grid(points: Tensor, shape: Sequence[int]) -> Tensor:
    """``grid_sample``'s grid (normalised, ``xy`` order) for voxel coordinates ``(N, ndim)``."""
    ndim = points.shape[1]
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], dtype=points.dtype)
    normalised = (points * scale - 1.0).flip(-1)  # grid_sample wants xy order
    return normalised.reshape(1, -1, *([1] * (ndim - 1)), ndim)


def _sample_points(moving: Tensor, points: Tensor) -> Tensor:
    """Read ``moving (1, 1, *shape)`` at voxel coordinates ``points (N, ndim)`` (``ij``), linear,
    zero outside; returns ``(N,)``; differentiable (through ``grid_sample``)."""
    return _sample_grid(moving, _grid(points, moving.shape[2:]).reshape(points.shape))


def _sample_grid(moving: Tensor, grid: Tensor) -> Tensor:
    """Read ``moving (1, 1, *shape)`` at ``grid (N, ndim)``, ``grid_sample``'s normalised ``xy``
    coordinates; returns ``(N,)``.

    torch's CPU sampler runs one thread per batch element, so with several threads the points
    are cut into that many pieces, viewed as a batch of the same image (expanded, not copied).
    """
    count, ndim = grid.shape
    pieces = torch.get_num_threads() if moving.device.type == "cpu" and count >= 1 << 14 else 1
    if pieces > 1:
        pad = (-count) % pieces
        if pad:
            grid = torch.cat([grid, grid[-1:].expand(pad, -1)])
        out = F.grid_sample(moving.expand(pieces, *moving.shape[1:]),
                            grid.reshape(pieces, -1, *([1] * (ndim - 1)), ndim), mode="bilinear",
                            padding_mode="zeros", align_corners=True)
        return out.reshape(-1)[:count]
    out = F.grid_sample(moving, grid.reshape(1, -1, *([1] * (ndim - 1)), ndim), mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out.reshape(-1)


class _LinearSampler:
    """Linear interpolation of one image **and its exact spatial gradient** at a list of points.

    The optimiser needs the loss and its gradient with respect to the 6 or 12 parameters many
    times per level; through autograd and ``grid_sample``'s backward that costs about as much
    again as the forward, plus a graph of some forty elementwise operations. Here the corners of
    each point's cell are gathered once, and one pass of linear blends gives the value and the
    derivative along every axis (the derivative of the piecewise-linear interpolant, so the
    gradient is consistent with the loss, as L-BFGS's line search needs). Points are held axis
    by axis, ``(ndim, N)``, so every operation runs on contiguous rows.

    As ``grid_sample(..., padding_mode="zeros", align_corners=True)``: samples outside the grid
    read zero, and within one voxel of a face the value blends linearly to zero (a zero-padded
    copy of the image, one voxel on each side, is held for that).
    """

    def __init__(self, image: Tensor) -> None:
        shape = tuple(image.shape[2:])
        ndim = len(shape)
        padded = F.pad(image.reshape(1, 1, *shape), (1, 1) * ndim)[0, 0]
        self.flat = padded.reshape(-1).contiguous()
        strides = [math.prod(padded.shape[a + 1:]) for a in range(ndim)]
        self.strides = strides
        corners = torch.cartesian_prod(*[torch.tensor([0, 1])] * ndim).reshape(-1, ndim)
        self.offsets = (corners * torch.tensor(strides)).sum(1)[:, None]  # first axis slowest
        # padded coordinates run over [0, n + 1]; a cell's lower corner over [0, n]
        self.top = torch.tensor(shape, dtype=image.dtype)[:, None]

    def __call__(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """Values ``(N,)`` and gradients ``(ndim, N)`` (per voxel along each axis) at voxel
        coordinates ``coords (ndim, N)`` (``ij`` order, unpadded grid)."""
        ndim, count = coords.shape
        shifted = coords + 1.0
        band = ((shifted >= 0) & (shifted <= self.top + 1)).all(0)
        shifted = torch.minimum(shifted.clamp_(min=0), self.top + 1)
        lower = torch.minimum(shifted.floor(), self.top)
        frac = shifted.sub_(lower)
        lower = lower.long()
        index = lower[0] * self.strides[0]
        for axis in range(1, ndim):
            index.add_(lower[axis], alpha=self.strides[axis])
        values = self.flat.index_select(0, (index + self.offsets).reshape(-1))
        values = values.reshape(*([2] * ndim), count)
        grads: list[Tensor] = []
        for axis in range(ndim):  # blend away one axis at a time
            weight = frac[axis]
            grads = [torch.lerp(g[0], g[1], weight) for g in grads]
            grads.append(values[1] - values[0])
            values = torch.lerp(values[0], values[1], weight)
        # beyond the one-voxel zero band the image is 0 all around: no gradient
        return values, torch.stack(grads).mul_(band)


def _mse_and_grad(fixed: Tensor, moved: Tensor, weights: Tensor | None,
                  variance: float) -> tuple[Tensor, Tensor]:
    """Weighted mean squared difference over ``variance`` and its gradient in ``moved``."""
    residual = moved - fixed
    total = float(moved.numel()) if weights is None else weights.sum()
    if weights is not None:
        residual = residual * weights  # weights are 0 or 1
    value = (residual * residual).sum() / (total * variance)
    return value, residual * (2.0 / (total * variance))


def _ncc_and_grad(fixed: Tensor, moved: Tensor, weights: Tensor | None,
                  eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Negated weighted Pearson correlation of two samples ``(N,)`` and its gradient in
    ``moved``."""
    total = float(moved.numel()) if weights is None else weights.sum()
    w = torch.ones_like(moved) if weights is None else weights
    fixed_c = fixed - (w * fixed).sum() / total
    moved_c = moved - (w * moved).sum() / total
    cross = (w * fixed_c * moved_c).sum() / total
    fixed_var = (w * fixed_c * fixed_c).sum() / total
    moved_var = (w * moved_c * moved_c).sum() / total
    norm = torch.sqrt(fixed_var * moved_var + eps)
    # d cross / d m_n = w_n fc_n / total and d moved_var / d m_n = 2 w_n mc_n / total (the
    # centring terms vanish because the weighted centred values sum to zero)
    grad = (w / total) * (-fixed_c / norm + cross * fixed_var * moved_c / norm ** 3)
    return -cross / norm, grad


class _MattesMI:
    """Negative mutual information (nats) of a fixed sample against moved samples, as Mattes et
    al. (and ANTs' ``mattes`` metric): the fixed intensity falls into one bin (fixed once), the
    moved intensity spreads over 4 bins with a cubic B-spline Parzen window, so the joint
    histogram costs 4 scatter-adds per point and is smooth in the moved intensity.

    :func:`voxreg.losses.mutual_information` (Gaussian windows over every bin on both sides) is
    the reference measure; on samples of tens of thousands of points it is about ten times slower
    per step because it recomputes dense weights for both images, so the optimiser uses this one.
    Intensities are clipped to [0, 1].
    """

    def __init__(self, fixed: Tensor, bins: int) -> None:
        self.bins = bins
        self.rows = (fixed.clamp(0, 1) * (bins - 1)).round().long() * bins
        self.taps = torch.arange(-1, 3, dtype=torch.long)[:, None]  # (4, 1): base-1 .. base+2

    def value_and_grad(self, moved: Tensor, point_weights: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
        """``-MI`` of ``moved (N,)`` against the fixed sample and its gradient in ``moved``, in
        closed form; ``point_weights (N,)`` (0 or 1) leave points out (default: all count).
        Each point's fixed bin is one; its moved intensity spreads over 4 bins (the edge taps
        fold back onto the edge bins, so its mass is kept).

        With ``p`` the joint histogram and the fixed marginal constant, ``d MI / d p_ij =
        log(p_ij / (p_i q_j))`` (the terms from the moved marginal ``q`` sum to zero), and each
        point's share of ``p`` moves with its 4 B-spline weights, whose derivatives are those of
        the uniform cubic B-spline basis.
        """
        bins = self.bins
        inside = (moved > 0) & (moved < 1)  # the clamp's derivative
        position = moved.clamp(0, 1) * (bins - 1)
        base = position.floor()
        t = position - base
        s = 1.0 - t
        t2, s2 = t * t, s * s
        # weights and derivatives of the taps base-1 .. base+2 (uniform cubic B-spline basis)
        weights = torch.stack([s2 * s / 6, (4 - 6 * t2 + 3 * t2 * t) / 6,
                               (4 - 6 * s2 + 3 * s2 * s) / 6, t2 * t / 6])
        slopes = torch.stack([-0.5 * s2, 1.5 * t2 - 2 * t, 2 * s - 1.5 * s2, 0.5 * t2])
        index = (base.long() + self.taps).clamp_(0, bins - 1).add_(self.rows)
        scale = (bins - 1) * inside.to(moved.dtype)
        if point_weights is not None:
            weights = weights * point_weights
            scale = scale * point_weights
        count = float(moved.numel()) if point_weights is None else point_weights.sum()
        index = index.reshape(-1)
        joint = torch.zeros(bins * bins, dtype=moved.dtype).index_add_(
            0, index, weights.reshape(-1)) / count
        table = joint.reshape(bins, bins)
        outer = table.sum(1, keepdim=True) * table.sum(0, keepdim=True)
        log_ratio = torch.log((table / outer.clamp(min=1e-12)).clamp(min=1e-12)).reshape(-1)
        value = -(joint * log_ratio).sum()
        grad = (log_ratio.index_select(0, index).reshape(4, -1) * slopes).sum(0)
        return value, grad.mul_(scale).div_(-count)


class _Objective:
    """The loss at one pyramid level as a function of the parameters."""

    def __init__(self, fixed: _Level, moving: _Level, loss: str, max_points: int, seed: int,
                 bins: int, window: int, fixed_center: Tensor, moving_center: Tensor,
                 radius: float) -> None:
        ndim = fixed.data.dim() - 2
        self.ndim, self.loss, self.bins, self.window = ndim, loss, bins, window
        self.fixed, self.moving = fixed, moving
        self.fixed_center, self.moving_center, self.radius = fixed_center, moving_center, radius
        self.moving_inverse = torch.as_tensor(np.linalg.inv(moving.grid_to_world))
        self.fixed_grid = torch.as_tensor(fixed.grid_to_world)
        total = fixed.data.numel()
        if loss != "lncc" and total > max_points:
            # a fixed random subset of the voxels (uniform over the whole grid, no repeats), in
            # memory order (friendlier to the caches)
            generator = torch.Generator().manual_seed(seed)
            draws = torch.unique(torch.randint(total, (max_points + max_points // 2,),
                                               generator=generator))
            if draws.numel() > max_points:  # a random subset of the distinct draws
                keep = torch.randperm(draws.numel(), generator=generator)[:max_points]
                draws = draws[keep.sort().values]
            flat = draws
        else:
            flat = torch.arange(total)
        strides = torch.tensor([math.prod(fixed.shape[k + 1:]) for k in range(ndim)])
        sizes = torch.tensor(fixed.shape)
        points = ((flat[:, None] // strides) % sizes).to(fixed.data.dtype)
        values = fixed.data.reshape(-1)[flat]
        self.points, self.values = points, values
        self.mattes = _MattesMI(values, bins) if loss == "mi" else None
        self.fixed_variance = float(values.var()) if values.numel() > 1 else 1.0
        if not self.fixed_variance > 0:
            self.fixed_variance = 1.0
        self.min_points = max(16, points.shape[0] // 10)
        if loss == "lncc":
            # moving voxel y -> u = 2 y / (n - 1) - 1 (align_corners), axes reversed (xy order)
            scale = [2.0 / max(s - 1, 1) for s in moving.shape]
            self.to_sampler = torch.zeros(ndim, ndim + 1, dtype=torch.float64)
            for row, axis in enumerate(reversed(range(ndim))):
                self.to_sampler[row, axis] = scale[axis]
                self.to_sampler[row, ndim] = -1.0
        else:
            self.sampler = _LinearSampler(moving.data)
            self.moving_top = (torch.tensor(moving.shape, dtype=points.dtype) - 1 + 1e-4)[:, None]
            # the points axis by axis with a row of ones: (ndim + 1, N)
            self.homogeneous = torch.cat([points.T, torch.ones(1, len(points), dtype=points.dtype)])

    def voxel_map(self, params: Tensor) -> Tensor:
        """``(ndim+1, ndim+1)`` level fixed voxel -> level moving voxel (float64)."""
        world = _world_matrix(params, self.ndim, self.fixed_center, self.moving_center, self.radius)
        return self.moving_inverse @ world @ self.fixed_grid

    def __call__(self, params: Tensor) -> Tensor:
        if self.loss == "lncc":
            # fixed voxel -> grid_sample's normalised xy coordinates of the moving image
            matrix = (self.to_sampler @ self.voxel_map(params)).to(self.points.dtype)
            n = self.ndim
            grid = torch.addmm(matrix[:, n], self.points, matrix[:, :n].T)
            moved = _sample_grid(self.moving.data, grid)
            return losses.ncc(self.fixed.data, moved.reshape(1, 1, *self.fixed.shape),
                              window=self.window)
        matrix = self.voxel_map(params)[: self.ndim]
        if not (torch.is_grad_enabled() and matrix.requires_grad):
            return self.point_loss(matrix, with_grad=False)[0]
        return _PointLoss.apply(matrix, self)

    def point_loss(self, matrix: Tensor, with_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        """A global loss and its gradient with respect to ``matrix`` ``(ndim, ndim+1)`` (level
        fixed voxel -> level moving voxel), computed without autograd."""
        coords = matrix.detach().to(self.points.dtype) @ self.homogeneous  # (ndim, N)
        # count only the fixed points that map inside the moving grid (as ITK and ANTs do):
        # zeros read from outside would otherwise pull the image into view
        weights = ((coords >= -1e-4) & (coords <= self.moving_top)).all(0).to(coords.dtype)
        if float(weights.sum()) < self.min_points:
            weights = None  # (almost) no overlap: use every point and let the zeros guide it back
        moved, slope = self.sampler(coords)
        if self.loss == "mse":  # over the fixed sample's variance: values near 1, like the others
            value, dmoved = _mse_and_grad(self.values, moved, weights, self.fixed_variance)
        elif self.loss == "ncc":
            value, dmoved = _ncc_and_grad(self.values, moved, weights)
        else:
            value, dmoved = self.mattes.value_and_grad(moved, weights)
        if not with_grad:
            return value, None
        return value, ((slope * dmoved) @ self.homogeneous.T).to(matrix.dtype)


class _PointLoss(torch.autograd.Function):
    """Autograd node of :meth:`_Objective.point_loss`: the loss of a voxel matrix, whose
    gradient was computed with the value, so the parameters' small graph (rotation,
    scales, shears -> matrix) is the only thing autograd runs."""

    @staticmethod
    def forward(ctx: Any, matrix: Tensor, objective: _Objective) -> Tensor:  # type: ignore[override]
        value, grad = objective.point_loss(matrix)
        ctx.save_for_backward(grad)
        return value.to(matrix.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None


def _optimise_lbfgs(objective: _Objective, params: Tensor, free: Tensor, iterations: int,
                    tol: float) -> tuple[Tensor, float, int]:
    """L-BFGS with a strong Wolfe line search on the free parameters; stops after
    ``iterations`` iterations or when the loss or the step changes by less than ``tol``.
    Returns the parameters, their loss and the number of loss evaluations."""
    params = params.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([params], lr=1.0, max_iter=iterations, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=tol,
                                  line_search_fn="strong_wolfe")
    evaluations = 0

    def closure() -> Tensor:
        nonlocal evaluations
        optimiser.zero_grad()
        value = objective(params)
        if not torch.isfinite(value):
            raise ValueError("the affine loss is not finite; check the images")
        value.backward()
        params.grad.mul_(free)
        evaluations += 1
        return value

    optimiser.step(closure)
    with torch.no_grad():
        final = float(objective(params))
    return params.detach(), final, evaluations


def _optimise_adam(objective: _Objective, params: Tensor, free: Tensor, iterations: int,
                   lr: float, patience: int, max_stalls: int, tol: float = 1e-4
                   ) -> tuple[Tensor, float, int]:
    """Adam on the free parameters with learning-rate halving on plateaus; returns the best
    parameters, their loss and the number of steps taken."""
    params = params.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([params], lr=lr)
    best_loss, best = math.inf, params.detach().clone()
    since, stalls, steps = 0, 0, 0
    for step in range(1, iterations + 1):
        steps = step
        optimiser.zero_grad(set_to_none=False)
        value = objective(params)
        value.backward()
        current = float(value.detach())
        if not math.isfinite(current):
            break
        if current < best_loss - tol * max(abs(best_loss), 1e-12) or best_loss == math.inf:
            best_loss, best, since = current, params.detach().clone(), 0
        else:
            since += 1
            if since >= patience:
                stalls += 1
                if stalls > max_stalls:
                    break
                for group in optimiser.param_groups:
                    group["lr"] *= 0.5
                since = 0
        params.grad.mul_(free)
        optimiser.step()
    if best_loss == math.inf:
        raise ValueError("the affine loss is not finite at the start; check the images")
    with torch.no_grad():
        final = float(objective(params))
    if final < best_loss:  # the last step may be the best
        return params.detach(), final, steps
    return best, best_loss, steps


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------


def _positive_ints(values: Sequence[int] | int, name: str) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be positive integers, got {values!r}") from None
    if not out or any(v < 1 for v in out) or any(int(v) != v for v in values):
        raise ValueError(f"{name} must be positive integers, got {values!r}")
    return out


def _per_level(values: Sequence[int] | int | None, defaults: tuple[int, int, int], count: int,
               name: str, single: int) -> tuple[int, ...]:
    """One positive integer per pyramid level: from one number, one per level, or ``None``
    (``defaults`` for the first, middle and finest levels; ``single`` for a one-level pyramid)."""
    if values is None:
        first, middle, last = defaults
        values = (first,) + (middle,) * (count - 2) + (last,) if count > 1 else (single,)
    out = _positive_ints(values, name)
    if len(out) == 1:
        out = out * count
    if len(out) != count:
        raise ValueError(f"{name} must give one number or one per level ({count}), got {len(out)}")
    return out


def register_affine(
    moving: io.Image | np.ndarray,
    fixed: io.Image | np.ndarray,
    *,
    loss: Loss = "mi",
    levels: Sequence[int] = DEFAULT_LEVELS,
    iterations: Sequence[int] | int | None = None,
    rigid_iterations: int | None = None,
    optimizer: Optimizer = "adam+lbfgs",
    lr: float = 0.02,
    tol: float = 1e-5,
    init: Init = "com",
    normalize: io.Normalize = "percentile",
    max_points: Sequence[int] | int | None = None,
    bins: int = 32,
    window: int = 9,
    patience: int = 4,
    max_stalls: int = 2,
    seed: int = 0,
) -> AffineResult:
    """Affine registration of ``moving`` to ``fixed`` (2D or 3D, any two grids).

    Args:
        moving, fixed: :class:`voxreg.io.Image` (their affines place them in the world) or arrays
            ``(*spatial)`` (identity affine: voxel = 1 mm); one channel each.
        loss: ``"mi"`` (mutual information, any contrasts), ``"ncc"`` (global normalised
            cross-correlation), ``"lncc"`` (local NCC, ``window``) or ``"mse"``.
        levels: pyramid shrink factors, coarse to fine, relative to the fixed image's finest
            voxel spacing (1 = full resolution).
        iterations: the most optimiser iterations per level, one number for all levels or one
            per level. Default: first level 200 (Adam) or 50 (L-BFGS), middle levels 30 (L-BFGS)
            or 100 (Adam), finest level 10 (L-BFGS after Adam), 20 (L-BFGS only) or 50 (Adam).
            An L-BFGS iteration may evaluate the loss more than once.
        rigid_iterations: iterations of translation + rotation only before the first level's
            affine stage (0: none); default 50 (Adam on the first level) or 20 (L-BFGS).
        optimizer: ``"adam+lbfgs"`` (default): Adam on the first (coarsest) level, whose
            momentum carries it through shallow local optima while the alignment is rough, then
            L-BFGS with a strong Wolfe line search on the finer levels, which converges in few
            loss evaluations once close; or ``"lbfgs"`` or ``"adam"`` on every level.
        lr: Adam's learning rate on its first level, halved on every next level (parameters are
            in units of the fixed image's radius of gyration, so 0.02 moves points by about 2%
            of the object's size per step).
        tol: L-BFGS ends a stage when the loss or the parameters change by less than ``tol``
            (1e-5: on the brain benchmark 1e-4 lost no Dice but stopped NCC early on synthetic
            images; 1e-6 cost 15% more time for the same Dice).
        init: ``"com"``: match the intensity centres of mass (after the headers' alignment);
            ``"center"``: match the grids' centres; ``"header"``: the headers' alignment alone
            (world identity).
        normalize: how both images are scaled to [0, 1] before the loss (see
            :func:`voxreg.io.normalize`); ``"none"`` for images already in [0, 1].
        max_points: fixed voxels used per level by the global losses (a fixed random subset),
            one number for all levels or one per level. Default 8192 on the first level, 32768
            on the middle ones and 65536 on the finest (the coarse levels only need to get the
            alignment roughly right, and cost most evaluations).
        bins: histogram bins of ``"mi"``.
        window: window of ``"lncc"`` (odd).
        patience, max_stalls: Adam only: a step that does not lower the best loss by 1e-4
            (relative) is a stall; after ``patience`` stalls the learning rate halves; after
            ``max_stalls`` halvings (plus one more plateau) the level ends.
        seed: seed of the point subsets (the result is deterministic for a given seed).

    Returns:
        An :class:`AffineResult`.
    """
    start = time.perf_counter()
    moving = _checked_image(moving, "moving")
    fixed = _checked_image(fixed, "fixed")
    if moving.ndim != fixed.ndim:
        raise ValueError(f"moving is {moving.ndim}D and fixed is {fixed.ndim}D; they must match")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    defaults = _OPTIMIZER_DEFAULTS[optimizer]
    levels = _positive_ints(levels, "levels")
    iterations = _per_level(iterations, defaults["iterations"], len(levels), "iterations",
                            single=defaults["iterations"][0])
    rigid_iterations = defaults["rigid_iterations"] if rigid_iterations is None else rigid_iterations
    for name, value in (("lr", lr), ("tol", tol)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                           and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    for name, value in (("rigid_iterations", rigid_iterations), ("max_stalls", max_stalls)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    for name, value in (("patience", patience), ("bins", bins)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    points_per_level = _per_level(max_points, DEFAULT_MAX_POINTS, len(levels), "max_points",
                                  single=DEFAULT_MAX_POINTS[-1])
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd positive integer, got {window!r}")
    ndim = fixed.ndim

    fixed_data = io.normalize(fixed.data, normalize)
    moving_data = io.normalize(moving.data, normalize)
    fixed_grid = _grid_affine(fixed.affine, ndim)
    moving_grid = _grid_affine(moving.affine, ndim)
    fixed_com, radius = _center_of_mass(fixed_data, fixed_grid)
    if init == "com":
        fixed_center = fixed_com
        moving_center = _center_of_mass(moving_data, moving_grid)[0]
    elif init == "center":
        fixed_center = _grid_center(fixed.shape, fixed_grid)
        moving_center = _grid_center(moving.shape, moving_grid)
    else:
        fixed_center = fixed_com
        moving_center = fixed_com.copy()
    if not radius > 0:
        radius = float(np.abs(fixed_grid[:ndim, :ndim]).sum(0).max())
    fixed_center_t = torch.as_tensor(fixed_center)
    moving_center_t = torch.as_tensor(moving_center)

    layout = _param_layout(ndim)
    n_params = layout["shear"].stop
    params = torch.zeros(n_params, dtype=torch.float64)
    rigid = torch.zeros(n_params, dtype=torch.float64)
    rigid[layout["translation"]] = 1.0
    rigid[layout["rotation"]] = 1.0
    everything = torch.ones(n_params, dtype=torch.float64)

    finest = float(np.min(np.sqrt((fixed_grid[:ndim, :ndim] ** 2).sum(0))))
    history: list[dict[str, Any]] = []
    objective = None
    targets = [shrink * finest for shrink in levels]
    fixed_levels = _pyramid(fixed_data, fixed_grid, targets)
    moving_levels = _pyramid(moving_data, moving_grid, targets)
    for index, (shrink, steps) in enumerate(zip(levels, iterations)):
        fixed_level, moving_level = fixed_levels[index], moving_levels[index]
        objective = _Objective(fixed_level, moving_level, loss, points_per_level[index],
                               seed + index, bins,
                               window, fixed_center_t, moving_center_t, radius)
        stages = [("affine", everything, steps)]
        if index == 0 and rigid_iterations > 0:
            stages.insert(0, ("rigid", rigid, rigid_iterations))
        for stage, free, count in stages:
            stage_start = time.perf_counter()
            if optimizer == "lbfgs" or (optimizer == "adam+lbfgs" and index > 0):
                params, value, taken = _optimise_lbfgs(objective, params, free, count, tol)
                method = "lbfgs"
            else:
                params, value, taken = _optimise_adam(objective, params, free, count,
                                                      lr * 0.5 ** index, patience, max_stalls)
                method = "adam"
            history.append({"shrink": shrink, "stage": stage, "optimizer": method,
                            "evaluations": taken, "loss": value,
                            "seconds": time.perf_counter() - stage_start})

    assert objective is not None
    with torch.no_grad():
        final_loss = float(objective(params))
        initial_loss = float(objective(torch.zeros_like(params)))
        world = _world_matrix(params, ndim, fixed_center_t, moving_center_t, radius).numpy()
    voxel = (np.linalg.inv(moving_grid) @ world @ fixed_grid)[:ndim]
    return AffineResult(
        world_matrix=world, voxel_matrix=voxel, fixed_shape=tuple(fixed.shape),
        fixed_affine=np.asarray(fixed.affine, dtype=np.float64), moving_shape=tuple(moving.shape),
        moving_affine=np.asarray(moving.affine, dtype=np.float64), loss=final_loss,
        initial_loss=initial_loss, loss_name=loss, seconds=time.perf_counter() - start,
        params=params.detach().numpy().copy(), history=history, fixed_header=fixed.header,
    )


def affine_prealign(moving: io.Image, fixed: io.Image, **options: Any) -> tuple[AffineResult, io.Image]:
    """Affine step of a pipeline: register ``moving`` to ``fixed`` and resample it.

    Args:
        moving, fixed: :class:`voxreg.io.Image` (one channel each), possibly on different grids.
        **options: passed to :func:`register_affine` (``loss``, ``levels``, ...).

    Returns:
        ``(result, moved)``: the :class:`AffineResult` and the moving image (its original
        intensities, linear interpolation) on the fixed grid with the fixed affine and header.
        To chain a deformable registration of ``moved`` to ``fixed`` with displacement
        ``deformable_disp`` into one field for the moving image resampled onto the fixed grid
        through the headers: ``compose(result.disp(), deformable_disp)``.
    """
    if not isinstance(moving, io.Image) or not isinstance(fixed, io.Image):
        raise TypeError("affine_prealign takes two voxreg.io.Image (moving, fixed)")
    result = register_affine(moving, fixed, **options)
    return result, result.resample(moving, interp="linear")


# --------------------------------------------------------------------------------------------
# ITK / ANTs text transforms
# --------------------------------------------------------------------------------------------

_ITK_HEADER = "#Insight Transform File V1.0"
_ITK_TYPE = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_([23])_([23])$")


def _lps_flip(ndim: int) -> np.ndarray:
    """RAS <-> LPS: x and y change sign (in 2D both axes)."""
    flip = np.ones(ndim + 1)
    flip[:2] = -1.0
    return np.diag(flip)


def save_itk_affine(path: str | Path, world_matrix: np.ndarray,
                    center: Sequence[float] | None = None) -> Path:
    """Write a fixed-RAS -> moving-RAS affine as an ITK text transform (ANTs reads it).

    ITK works in LPS millimetres and its transform also maps a fixed-space point to the moving
    point (pull-back), so ``antsApplyTransforms -r fixed -i moving -t FILE`` (or
    ``ants.apply_transforms(fixed, moving, [FILE])``) resamples the moving image as
    :meth:`AffineResult.resample` does. The file holds ``AffineTransform_double_3_3`` (``_2_2``
    in 2D): ``Parameters`` = the matrix row by row then the translation, ``FixedParameters`` = the
    centre ``C`` (LPS), with ``T(p) = M (p - C) + C + translation``.

    Args:
        path: destination (written atomically); any extension, ``.txt`` or ``.tfm`` by custom.
        world_matrix: ``(ndim+1, ndim+1)`` or ``(ndim, ndim+1)``, RAS mm, ndim 2 or 3.
        center: the centre ``C`` in **RAS** mm (default the origin; any centre gives the same
            transform, only the stored translation differs).
    """
    matrix = _square(world_matrix, "world_matrix")
    ndim = matrix.shape[0] - 1
    flip = _lps_flip(ndim)
    lps = flip @ matrix @ flip
    linear, offset = lps[:ndim, :ndim], lps[:ndim, ndim]
    if center is None:
        center_lps = np.zeros(ndim)
    else:
        center_ras = np.asarray(center, dtype=np.float64).reshape(-1)
        if center_ras.shape != (ndim,) or not np.all(np.isfinite(center_ras)):
            raise ValueError(f"center must be {ndim} finite numbers, got {center!r}")
        center_lps = (flip[:ndim, :ndim] @ center_ras)
    translation = offset - center_lps + linear @ center_lps
    values = list(linear.reshape(-1)) + list(translation)
    text = "\n".join([
        _ITK_HEADER,
        "#Transform 0",
        f"Transform: AffineTransform_double_{ndim}_{ndim}",
        "Parameters: " + " ".join(f"{v:.17g}" for v in values),
        "FixedParameters: " + " ".join(f"{v:.17g}" for v in center_lps),
        "",
    ])
    path = Path(path)
    with atomic_path(path, suffix=path.suffix or ".txt") as tmp:
        tmp.write_text(text)
    return path


def load_itk_affine(path: str | Path) -> np.ndarray:
    """Read an ITK text affine (``AffineTransform_*`` or ``MatrixOffsetTransformBase_*``, double
    or float, 2D or 3D) as the ``(ndim+1, ndim+1)`` fixed-RAS -> moving-RAS world matrix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ITK text transform file, not one affine transform, or the wrong
            number of parameters (the message says which).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such transform file: {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder, not a transform file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not an ITK text transform (binary file; ANTs .mat "
                         "files are not supported, convert them to .txt)") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise ValueError(f"{str(path)!r} is not an ITK text transform: it must start with "
                         f"{_ITK_HEADER!r}")
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields.setdefault(key.strip(), []).append(value.strip())
    kinds = fields.get("Transform", [])
    if len(kinds) != 1:
        raise ValueError(f"{str(path)!r} must hold exactly one transform, found {len(kinds)}")
    match = _ITK_TYPE.match(kinds[0])
    if match is None or match.group(3) != match.group(4):
        raise ValueError(f"{str(path)!r} holds a {kinds[0]!r}; only AffineTransform_double_3_3 "
                         "(or _2_2, float, MatrixOffsetTransformBase) is supported")
    ndim = int(match.group(3))
    try:
        params = np.array([float(v) for v in fields.get("Parameters", [""])[0].split()])
        fixed = np.array([float(v) for v in fields.get("FixedParameters", [""])[0].split()])
    except ValueError:
        raise ValueError(f"{str(path)!r} has non-numeric transform parameters") from None
    if params.size != ndim * ndim + ndim:
        raise ValueError(f"{str(path)!r}: a {ndim}D affine needs {ndim * ndim + ndim} Parameters, "
                         f"found {params.size}")
    if fixed.size == 0:
        fixed = np.zeros(ndim)
    if fixed.size != ndim:
        raise ValueError(f"{str(path)!r}: a {ndim}D affine needs {ndim} FixedParameters, "
                         f"found {fixed.size}")
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(fixed))):
        raise ValueError(f"{str(path)!r} has non-finite transform parameters")
    linear = params[: ndim * ndim].reshape(ndim, ndim)
    translation = params[ndim * ndim:]
    lps = np.eye(ndim + 1)
    lps[:ndim, :ndim] = linear
    lps[:ndim, ndim] = translation + fixed - linear @ fixed
    flip = _lps_flip(ndim)
    return flip @ lps @ flip
