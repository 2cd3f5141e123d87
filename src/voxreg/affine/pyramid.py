"""The multi-resolution pyramid of affine registration: :class:`Level` (one image at one
resolution) and :func:`gaussian_pyramid` (Gaussian smoothing and shrinking, as a cascade).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor


@dataclass
class Level:
    """One image at one pyramid level: data ``(1, 1, *shape)`` and voxel-to-world matrix."""

    data: Tensor
    grid_to_world: np.ndarray  # (ndim+1, ndim+1)

    @property
    def shape(self) -> tuple[int, ...]:
        """The level's grid shape ``(*spatial)``."""
        return tuple(self.data.shape[2:])


def gaussian_pyramid(data: np.ndarray, grid_to_world: np.ndarray,
                     targets: Sequence[float]) -> list[Level]:
    """One :class:`Level` per target spacing (in the order given): ``data`` smoothed and shrunk
    so that its spacing is about the target (never finer than it is).

    Per axis the shrink factor is ``f = max(1, target / spacing)``, the Gaussian sigma ``f / 2``
    original voxels (as ANTs smooths) and the new size ``round((n - 1) / f) + 1`` (the end voxel
    centres are kept, ``align_corners``). The levels are made finest first, each from the one
    before it (a Gaussian cascade: the sigmas add in quadrature), so the wide kernels of the
    coarse levels run on the small grids.
    """
    ndim = data.ndim
    spacing = np.sqrt((grid_to_world[:ndim, :ndim] ** 2).sum(0))
    order = sorted(range(len(targets)), key=lambda k: targets[k])
    out: list[Level | None] = [None] * len(targets)
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
        out[k] = Level(tensor.contiguous(), grid_to_world @ np.diag(np.append(steps, 1.0)))
        source, source_step = tensor[0, 0].numpy(), steps
    return [level for level in out if level is not None]
