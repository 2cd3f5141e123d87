"""Affine registration itself: the options, input checks, :func:`register_affine` (pyramid,
initialisation and the optimisation stages, level by level) and :func:`affine_prealign` (the
affine step of a pipeline).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from voxreg import io
from voxreg.affine.matrices import (
    center_of_mass,
    grid_affine,
    grid_center,
    param_layout,
    world_matrix,
)
from voxreg.affine.objective import Objective
from voxreg.affine.optimise import optimise_adam, optimise_lbfgs, per_level, positive_ints
from voxreg.affine.pyramid import gaussian_pyramid
from voxreg.affine.result import AffineResult, as_image

Loss = Literal["mi", "ncc", "lncc", "mse"]
Init = Literal["com", "center", "header"]
Optimizer = Literal["adam+lbfgs", "lbfgs", "adam"]
LOSSES = ("mi", "ncc", "lncc", "mse")
INITS = ("com", "center", "header")
OPTIMIZERS = ("adam+lbfgs", "lbfgs", "adam")

# defaults chosen on 3D brains (docs/affine.md, benchmarks/README.md)
DEFAULT_LEVELS = (4, 2, 1)
DEFAULT_MAX_POINTS = (8192, 32768, 65536)
# per optimizer: the most iterations at the first, middle and finest levels, and rigid ones
_OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam+lbfgs": {"iterations": (200, 30, 10), "rigid_iterations": 50},
    "lbfgs": {"iterations": (50, 30, 20), "rigid_iterations": 20},
    "adam": {"iterations": (200, 100, 50), "rigid_iterations": 50},
}


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _checked_image(value: Any, name: str) -> io.Image:
    """``value`` as a one-channel 2D or 3D :class:`voxreg.io.Image` with finite numeric data and
    a finite, invertible affine; a :class:`ValueError` (or :class:`TypeError`) otherwise."""
    image = as_image(value, name)
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
    if abs(np.linalg.det(grid_affine(affine, image.ndim)[: image.ndim, : image.ndim])) < 1e-12:
        raise ValueError(f"{name}'s affine is singular (zero voxel size?)")
    return image


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------


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
        optimizer: ``"adam+lbfgs"`` (default): Adam on the first (coarsest) level, then L-BFGS
            with a strong Wolfe line search on the finer levels (``docs/affine.md`` says why);
            or ``"lbfgs"`` or ``"adam"`` on every level.
        lr: Adam's learning rate on its first level, halved on every next level (parameters are
            in units of the fixed image's radius of gyration, so 0.02 moves points by about 2%
            of the object's size per step).
        tol: L-BFGS ends a stage when the loss or the parameters change by less than ``tol``.
        init: ``"com"``: match the intensity centres of mass (after the headers' alignment);
            ``"center"``: match the grids' centres; ``"header"``: the headers' alignment alone
            (world identity).
        normalize: how both images are scaled to [0, 1] before the loss (see
            :func:`voxreg.io.normalize`); ``"none"`` for images already in [0, 1].
        max_points: fixed voxels used per level by the global losses (a fixed random subset),
            one number for all levels or one per level. Default 8192 on the first level, 32768
            on the middle ones and 65536 on the finest.
        bins: histogram bins of ``"mi"``.
        window: window of ``"lncc"`` (odd).
        patience, max_stalls: Adam only: a step that does not lower the best loss by 1e-4
            (relative) is a stall; after ``patience`` stalls the learning rate halves; after
            ``max_stalls`` halvings (plus one more plateau) the level ends.
        seed: seed of the point subsets (the result is deterministic for a given seed).

    Returns:
        An :class:`AffineResult`; deterministic for given inputs, options, machine and number
        of threads.

    Example: a 2D scene moved by 2 and -3 voxels (arrays: identity affines, 1 mm voxels).

    >>> import numpy as np
    >>> y, x = np.mgrid[:32, :32].astype(float)
    >>> def scene(dy, dx):  # two Gaussian blobs, moved by (dy, dx) voxels
    ...     blob = lambda cy, cx: np.exp(-((y - cy - dy) ** 2 / 30 + (x - cx - dx) ** 2 / 15))
    ...     return blob(14, 16) + 0.5 * blob(20, 10)
    >>> result = register_affine(scene(2, -3), scene(0, 0), loss="mse", levels=(2, 1))
    >>> result.voxel_matrix[:, 2].round(1)  # fixed voxel x -> moving voxel x + (2, -3)
    array([ 2., -3.])
    >>> result.world_matrix.shape
    (3, 3)
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
    levels = positive_ints(levels, "levels")
    iterations = per_level(iterations, defaults["iterations"], len(levels), "iterations",
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
    points_per_level = per_level(max_points, DEFAULT_MAX_POINTS, len(levels), "max_points",
                                 single=DEFAULT_MAX_POINTS[-1])
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd positive integer, got {window!r}")
    ndim = fixed.ndim

    fixed_data = io.normalize(fixed.data, normalize)
    moving_data = io.normalize(moving.data, normalize)
    fixed_grid = grid_affine(fixed.affine, ndim)
    moving_grid = grid_affine(moving.affine, ndim)
    fixed_com, radius = center_of_mass(fixed_data, fixed_grid)
    if init == "com":
        fixed_center = fixed_com
        moving_center = center_of_mass(moving_data, moving_grid)[0]
    elif init == "center":
        fixed_center = grid_center(fixed.shape, fixed_grid)
        moving_center = grid_center(moving.shape, moving_grid)
    else:
        fixed_center = fixed_com
        moving_center = fixed_com.copy()
    if not radius > 0:
        radius = float(np.abs(fixed_grid[:ndim, :ndim]).sum(0).max())
    fixed_center_t = torch.as_tensor(fixed_center)
    moving_center_t = torch.as_tensor(moving_center)

    layout = param_layout(ndim)
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
    fixed_levels = gaussian_pyramid(fixed_data, fixed_grid, targets)
    moving_levels = gaussian_pyramid(moving_data, moving_grid, targets)
    for index, (shrink, steps) in enumerate(zip(levels, iterations)):
        fixed_level, moving_level = fixed_levels[index], moving_levels[index]
        objective = Objective(fixed_level, moving_level, loss, points_per_level[index],
                              seed + index, bins, window, fixed_center_t, moving_center_t, radius)
        stages = [("affine", everything, steps)]
        if index == 0 and rigid_iterations > 0:
            stages.insert(0, ("rigid", rigid, rigid_iterations))
        for stage, free, count in stages:
            stage_start = time.perf_counter()
            if optimizer == "lbfgs" or (optimizer == "adam+lbfgs" and index > 0):
                params, value, taken = optimise_lbfgs(objective, params, free, count, tol)
                method = "lbfgs"
            else:
                params, value, taken = optimise_adam(objective, params, free, count,
                                                     lr * 0.5 ** index, patience, max_stalls)
                method = "adam"
            history.append({"shrink": shrink, "stage": stage, "optimizer": method,
                            "evaluations": taken, "loss": value,
                            "seconds": time.perf_counter() - stage_start})

    assert objective is not None
    with torch.no_grad():
        final_loss = float(objective(params))
        initial_loss = float(objective(torch.zeros_like(params)))
        world = world_matrix(params, ndim, fixed_center_t, moving_center_t, radius).numpy()
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
