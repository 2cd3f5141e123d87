"""The loss of one pyramid level as a function of the affine parameters.

Owns: reading an image at points (:func:`sample_points`, and :class:`LinearSampler`, which also
gives the interpolant's exact spatial gradient), the global losses with their closed-form
gradients in the moved intensities (:func:`mse_and_grad`, :func:`ncc_and_grad`,
:class:`MattesMI`), the level's :class:`Objective` and its autograd node :class:`PointLoss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from voxreg import losses
from voxreg.affine.matrices import world_matrix
from voxreg.affine.pyramid import Level

# --------------------------------------------------------------------------------------------
# reading the moving image at points
# --------------------------------------------------------------------------------------------


def _grid(points: Tensor, shape: Sequence[int]) -> Tensor:
    """``grid_sample``'s grid (normalised, ``xy`` order) for voxel coordinates ``(N, ndim)``."""
    ndim = points.shape[1]
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], dtype=points.dtype)
    normalised = (points * scale - 1.0).flip(-1)  # grid_sample wants xy order
    return normalised.reshape(1, -1, *([1] * (ndim - 1)), ndim)


def sample_points(moving: Tensor, points: Tensor) -> Tensor:
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


class LinearSampler:
    """Linear interpolation of one image **and its exact spatial gradient** at a list of points.

    The corners of each point's cell are gathered once, and one pass of linear blends gives the
    value and the derivative along every axis: the derivative of the piecewise-linear
    interpolant, so the gradient is consistent with the loss (as L-BFGS's line search needs).
    Points are given axis by axis, ``(ndim, N)``.

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


# --------------------------------------------------------------------------------------------
# global losses: value and gradient in the moved intensities
# --------------------------------------------------------------------------------------------


def mse_and_grad(fixed: Tensor, moved: Tensor, weights: Tensor | None,
                  variance: float) -> tuple[Tensor, Tensor]:
    """Weighted mean squared difference over ``variance`` and its gradient in ``moved``."""
    residual = moved - fixed
    total = float(moved.numel()) if weights is None else weights.sum()
    if weights is not None:
        residual = residual * weights  # weights are 0 or 1
    value = (residual * residual).sum() / (total * variance)
    return value, residual * (2.0 / (total * variance))


def ncc_and_grad(fixed: Tensor, moved: Tensor, weights: Tensor | None,
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


class MattesMI:
    """Negative mutual information (nats) of a fixed sample against moved samples, as Mattes et
    al. (and ANTs' ``mattes`` metric): the fixed intensity falls into one bin (fixed once), the
    moved intensity spreads over 4 bins with a cubic B-spline Parzen window, so the joint
    histogram costs 4 scatter-adds per point and is smooth in the moved intensity.

    The measure is that of :func:`voxreg.losses.mutual_information` (Gaussian windows over every
    bin on both sides) with a compact Parzen window, which is cheaper per step. Intensities are
    clipped to [0, 1].
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


# --------------------------------------------------------------------------------------------
# one level's objective
# --------------------------------------------------------------------------------------------


class Objective:
    """The loss at one pyramid level as a function of the parameters (called on a ``(n_params,)``
    float64 tensor, returns a scalar; differentiable in the parameters).

    ``loss`` is ``"mi"`` (Mattes MI, ``bins``), ``"ncc"``, ``"mse"`` (over the fixed sample's
    variance) or ``"lncc"`` (:func:`voxreg.losses.ncc`, ``window``). The global losses read a
    fixed random subset of at most ``max_points`` fixed voxels (uniform over the grid, no
    repeats, seeded by ``seed``) and count only the points that map inside the moving grid
    (all of them when fewer than ``max(16, N / 10)`` do); their gradient is in closed form
    (:class:`PointLoss`). ``"lncc"`` reads the whole grid through ``grid_sample`` and autograd.
    ``fixed_center``, ``moving_center`` and ``radius`` define the parameterisation
    (:func:`voxreg.affine.matrices.world_matrix`).
    """

    def __init__(self, fixed: Level, moving: Level, loss: str, max_points: int, seed: int,
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
        self.mattes = MattesMI(values, bins) if loss == "mi" else None
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
            self.sampler = LinearSampler(moving.data)
            self.moving_top = (torch.tensor(moving.shape, dtype=points.dtype) - 1 + 1e-4)[:, None]
            # the points axis by axis with a row of ones: (ndim + 1, N)
            self.homogeneous = torch.cat([points.T, torch.ones(1, len(points), dtype=points.dtype)])

    def voxel_map(self, params: Tensor) -> Tensor:
        """``(ndim+1, ndim+1)`` level fixed voxel -> level moving voxel (float64)."""
        world = world_matrix(params, self.ndim, self.fixed_center, self.moving_center, self.radius)
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
        return PointLoss.apply(matrix, self)

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
            value, dmoved = mse_and_grad(self.values, moved, weights, self.fixed_variance)
        elif self.loss == "ncc":
            value, dmoved = ncc_and_grad(self.values, moved, weights)
        else:
            value, dmoved = self.mattes.value_and_grad(moved, weights)
        if not with_grad:
            return value, None
        return value, ((slope * dmoved) @ self.homogeneous.T).to(matrix.dtype)


class PointLoss(torch.autograd.Function):
    """Autograd node of :meth:`Objective.point_loss`: the loss of a voxel matrix, whose
    gradient was computed with the value, so the parameters' small graph (rotation,
    scales, shears -> matrix) is the only thing autograd runs."""

    @staticmethod
    def forward(ctx: Any, matrix: Tensor, objective: Objective) -> Tensor:  # type: ignore[override]
        value, grad = objective.point_loss(matrix)
        ctx.save_for_backward(grad)
        return value.to(matrix.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None
