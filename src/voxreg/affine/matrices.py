"""Matrix helpers of affine registration (numpy float64 unless stated): grid matrices, the
parameterisation of the affine map, and the centres it turns about.

Owns: the ``(ndim+1, ndim+1)`` voxel-to-world matrix of a grid (:func:`grid_affine`), 2D/3D
embedding and checks of homogeneous matrices, the RAS <-> LPS flip, intensity centre of mass and
grid centre, and the map from the ``2 ndim + 2 n_rot`` parameters (``n_rot`` = 1 in 2D, 3 in 3D)
to the fixed-world -> moving-world matrix (:func:`world_matrix`, torch, differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# grid matrices
# --------------------------------------------------------------------------------------------


def grid_affine(affine: np.ndarray, ndim: int) -> np.ndarray:
    """The ``(ndim+1, ndim+1)`` voxel-to-world matrix of a grid from its 4x4 affine (2D: rows and
    columns 0, 1, 3)."""
    affine = np.asarray(affine, dtype=np.float64)
    if ndim == 3:
        return affine.copy()
    keep = [0, 1, 3]
    return affine[np.ix_(keep, keep)].copy()


def embed_4x4(matrix: np.ndarray) -> np.ndarray:
    """A 2D ``(3, 3)`` world matrix as a 4x4 one (third axis untouched); a 4x4 is returned as is."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape == (4, 4):
        return matrix.copy()
    out = np.eye(4)
    keep = [0, 1, 3]
    out[np.ix_(keep, keep)] = matrix
    return out


def square_matrix(matrix: np.ndarray, name: str) -> np.ndarray:
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
# centres
# --------------------------------------------------------------------------------------------


def center_of_mass(data: np.ndarray, grid_to_world: np.ndarray) -> tuple[np.ndarray, float]:
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


def grid_center(shape: Sequence[int], grid_to_world: np.ndarray) -> np.ndarray:
    """World position of the middle of a grid ``shape`` (voxel ``(shape - 1) / 2``)."""
    ndim = len(shape)
    middle = (np.asarray(shape, dtype=np.float64) - 1) / 2
    return grid_to_world[:ndim, :ndim] @ middle + grid_to_world[:ndim, ndim]


# --------------------------------------------------------------------------------------------
# parameterisation
# --------------------------------------------------------------------------------------------


def param_layout(ndim: int) -> dict[str, slice]:
    """Where each kind of parameter sits: translation, rotation, log-scale, shear."""
    n_rot = ndim * (ndim - 1) // 2
    return {
        "translation": slice(0, ndim),
        "rotation": slice(ndim, ndim + n_rot),
        "scale": slice(ndim + n_rot, 2 * ndim + n_rot),
        "shear": slice(2 * ndim + n_rot, 2 * ndim + 2 * n_rot),
    }


def linear_part(params: Tensor, ndim: int) -> Tensor:
    """``L = R @ diag(exp(s)) @ H`` from the parameters (``(ndim, ndim)``, params' dtype)."""
    layout = param_layout(ndim)
    upper = torch.triu_indices(ndim, ndim, offset=1)
    zeros = torch.zeros(ndim, ndim, dtype=params.dtype)
    skew = zeros.index_put((upper[0], upper[1]), params[layout["rotation"]])
    skew = skew - skew.T
    rotation = torch.linalg.matrix_exp(skew)
    scale = torch.diag(torch.exp(params[layout["scale"]]))
    shear = torch.eye(ndim, dtype=params.dtype) + zeros.index_put(
        (upper[0], upper[1]), params[layout["shear"]])
    return rotation @ scale @ shear


def world_matrix(params: Tensor, ndim: int, fixed_center: Tensor, moving_center: Tensor,
                 radius: float) -> Tensor:
    """``(ndim+1, ndim+1)`` fixed world -> moving world: ``W x = L (x - c_f) + c_m + r t``."""
    linear = linear_part(params, ndim)
    translation = moving_center + radius * params[param_layout(ndim)["translation"]] \
        - linear @ fixed_center
    top = torch.cat([linear, translation[:, None]], dim=1)
    bottom = torch.zeros(1, ndim + 1, dtype=params.dtype)
    bottom[0, ndim] = 1.0
    return torch.cat([top, bottom], dim=0)


# --------------------------------------------------------------------------------------------
# ITK's frame
# --------------------------------------------------------------------------------------------


def lps_flip(ndim: int) -> np.ndarray:
    """RAS <-> LPS: x and y change sign (in 2D both axes)."""
    flip = np.ones(ndim + 1)
    flip[:2] = -1.0
    return np.diag(flip)
