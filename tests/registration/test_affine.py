"""Affine registration (voxreg.affine): recovery of known affines in 2D and 3D, different grids,
ITK/ANTs text transforms, and the ``voxreg affine`` command."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run
from scipy import ndimage

from voxreg import affine, io
from voxreg.affine.matrices import grid_affine
from voxreg.affine.objective import (
    LinearSampler,
    MattesMI,
    Objective,
    mse_and_grad,
    ncc_and_grad,
    sample_points,
)
from voxreg.affine.pyramid import Level, gaussian_pyramid
from voxreg.transforms import affine_to_disp, compose, warp


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny images: one thread is fastest and the machine may be shared."""


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------


def blob(shape, seed=0):
    """A smooth random texture under a Gaussian envelope (no symmetry an affine could exploit)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random(tuple(max(2, s // 6) for s in shape))
    texture = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=3)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    return (texture * np.exp(-(grid ** 2).sum(0) / 0.35)).astype(np.float32)


def random_affine(ndim, seed, linear=0.12, shift=3.0):
    """A voxel affine ``(ndim, ndim+1)`` about the grid centre (absolute coordinates)."""
    rng = np.random.default_rng(seed)
    matrix = np.eye(ndim) + rng.uniform(-linear, linear, (ndim, ndim))
    return matrix, rng.uniform(-shift, shift, ndim)


def known_pair(shape, seed=1):
    """``(moving, fixed, A)`` with ``fixed(x) = moving(A x)`` (A in absolute voxel coordinates)."""
    ndim = len(shape)
    fixed = blob(shape)
    matrix, shift = random_affine(ndim, seed)
    center = (np.asarray(shape) - 1) / 2
    true = np.concatenate([matrix, (shift + center - matrix @ center)[:, None]], axis=1)
    inverse = np.linalg.inv(np.vstack([true, np.eye(ndim + 1)[-1]]))
    # scipy's affine_transform pulls back too: moving(y) = fixed(inverse @ y)
    moving = ndimage.affine_transform(fixed, inverse[:ndim, :ndim], inverse[:ndim, ndim], order=3)
    return moving.astype(np.float32), fixed, true


def grid_error(found, true, shape):
    """Mean and max distance (voxels) between the points two voxel affines map the grid to."""
    ndim = len(shape)
    points = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).reshape(ndim, -1)
    diff = (found[:, :ndim] - true[:, :ndim]) @ points + (found[:, ndim] - true[:, ndim])[:, None]
    dist = np.sqrt((diff ** 2).sum(0))
    return float(dist.mean()), float(dist.max())


IDENTITY_ERROR_2D = grid_error(np.eye(2, 3), known_pair((48, 48))[2], (48, 48))[0]


# --------------------------------------------------------------------------------------------
# recovery of a known affine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "ncc"])
def test_recovers_known_affine_2d(loss):
    moving, fixed, true = known_pair((48, 48))
    assert IDENTITY_ERROR_2D > 2.0  # a real misalignment to undo
    result = affine.register_affine(moving, fixed, loss=loss, levels=(2, 1), normalize="none")
    mean, worst = grid_error(result.voxel_matrix, true, fixed.shape)
    assert mean < 0.25 and worst < 0.6, (mean, worst)
    assert result.loss < result.initial_loss
    # the moved image matches the fixed one
    moved = result.resample(moving).data
    inner = (slice(6, -6),) * 2
    assert np.abs(moved - fixed)[inner].mean() < 0.1 * np.abs(moving - fixed)[inner].mean()


def test_local_ncc_recovers_a_milder_affine():
    fixed = blob((48, 48))
    true = np.array([[1.04, 0.05, -1.0], [-0.03, 0.97, 1.8]])
    inverse = np.linalg.inv(np.vstack([true, [0, 0, 1]]))
    moving = ndimage.affine_transform(fixed, inverse[:2, :2], inverse[:2, 2], order=3)
    start = grid_error(np.eye(2, 3), true, fixed.shape)[0]
    result = affine.register_affine(moving, fixed, loss="lncc", levels=(2, 1), normalize="none")
    mean = grid_error(result.voxel_matrix, true, fixed.shape)[0]
    assert start > 1.4 and mean < 0.5, (start, mean)  # local NCC: the least precise here


def test_recovers_known_affine_3d():
    moving, fixed, true = known_pair((32, 32, 32))
    start = grid_error(np.eye(3, 4), true, fixed.shape)[0]
    result = affine.register_affine(moving, fixed, loss="ncc", levels=(2, 1))
    mean, worst = grid_error(result.voxel_matrix, true, fixed.shape)
    assert start > 2.0 and mean < 0.3 and worst < 0.8, (start, mean, worst)
    assert result.voxel_matrix.shape == (3, 4) and result.world_matrix.shape == (4, 4)
    # on one grid with identity affines the world and voxel matrices agree
    np.testing.assert_allclose(result.world_matrix[:3], result.voxel_matrix, atol=1e-9)


@pytest.mark.parametrize("shape", [(48, 48), (32, 32, 32)])
def test_mutual_information_against_inverted_contrast(shape):
    moving, fixed, true = known_pair(shape)
    inverted = moving.max() - moving  # an intensity-inverted copy: MSE cannot match it
    mi = affine.register_affine(inverted, fixed, loss="mi", levels=(2, 1))
    mi_mean, mi_worst = grid_error(mi.voxel_matrix, true, shape)
    mse = affine.register_affine(inverted, fixed, loss="mse", levels=(2, 1))
    mse_mean = grid_error(mse.voxel_matrix, true, shape)[0]
    assert mi_mean < 0.5 and mi_worst < 1.2, (mi_mean, mi_worst)
    assert mse_mean > 3 * mi_mean, (mse_mean, mi_mean)


def test_point_sampler_matches_scipy_and_splits_across_threads():
    rng = np.random.default_rng(0)
    image = rng.random((9, 10, 11)).astype(np.float32)
    points = rng.uniform(-1.5, 11.5, (20001, 3)).astype(np.float32)  # some outside the grid
    reference = ndimage.map_coordinates(image, points.T, order=1, mode="grid-constant")
    tensor = torch.from_numpy(image)[None, None]
    single = sample_points(tensor, torch.from_numpy(points))
    np.testing.assert_allclose(single.numpy(), reference, atol=1e-5)
    torch.set_num_threads(3)  # 20001 points in 3 pieces (one padded)
    try:
        split = sample_points(tensor, torch.from_numpy(points))
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(split, single, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(9, 12), (7, 9, 10)])
def test_linear_sampler_value_and_gradient(shape):
    """Values as scipy's linear interpolation with zero padding; gradients as central finite
    differences of the same interpolant (points kept off cell boundaries, where the
    piecewise-linear interpolant has kinks); zero gradient beyond the one-voxel zero band."""
    ndim = len(shape)
    rng = np.random.default_rng(3)
    image = rng.random(shape)
    sampler = LinearSampler(torch.from_numpy(image)[None, None])
    coords = rng.uniform(-1.6, np.asarray(shape) + 0.6, (4000, ndim))
    # keep every coordinate at least 0.01 from an integer
    coords = np.where(np.abs(coords - np.round(coords)) < 0.01, coords + 0.05, coords)
    values, grads = sampler(torch.from_numpy(coords.T.copy()))
    reference = ndimage.map_coordinates(image, coords.T, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(values.numpy(), reference, atol=1e-12)
    step = 1e-4
    for axis in range(ndim):
        offset = np.zeros(ndim)
        offset[axis] = step
        plus = ndimage.map_coordinates(image, (coords + offset).T, order=1, mode="grid-constant")
        minus = ndimage.map_coordinates(image, (coords - offset).T, order=1, mode="grid-constant")
        np.testing.assert_allclose(grads[axis].numpy(), (plus - minus) / (2 * step), atol=1e-6)
    far = torch.tensor([[-3.0] + [2.0] * (ndim - 1), [s + 2.0 for s in shape]]).T.contiguous()
    far_values, far_grads = sampler(far.to(torch.float64))
    assert far_values.abs().max() == 0 and far_grads.abs().max() == 0


def weighted_mean(values, weights):
    return values.mean() if weights is None else (values * weights).sum() / weights.sum()


def global_ncc_autograd(fixed, moved, weights, eps=1e-8):
    """The negated weighted Pearson correlation, written directly (autograd differentiates it)."""
    fixed = fixed - weighted_mean(fixed, weights)
    moved = moved - weighted_mean(moved, weights)
    cross = weighted_mean(fixed * moved, weights)
    return -cross / torch.sqrt(weighted_mean(fixed * fixed, weights)
                               * weighted_mean(moved * moved, weights) + eps)


def mattes_autograd(mattes, moved, weights):
    """The Mattes MI of ``voxreg.affine.objective.MattesMI`` written directly: the cubic
    B-spline kernel evaluated at each of the 4 taps, edge taps folded back; autograd
    differentiates it."""
    bins = mattes.bins
    position = moved.clamp(0, 1) * (bins - 1)
    index = position.detach().floor().long()[:, None] + torch.arange(-1, 3)  # (N, 4)
    distance = (position[:, None] - index.to(position.dtype)).abs()
    kernel = torch.where(distance < 1, (4 - 6 * distance ** 2 + 3 * distance ** 3) / 6,
                         (2 - distance).clamp(min=0) ** 3 / 6)
    if weights is not None:
        kernel = kernel * weights[:, None]
    flat = (mattes.rows[:, None] + index.clamp(0, bins - 1)).reshape(-1)
    joint = torch.zeros(bins * bins, dtype=moved.dtype).index_add(0, flat, kernel.reshape(-1))
    joint = joint.reshape(bins, bins) / (moved.numel() if weights is None else weights.sum())
    outer = joint.detach().sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    ratio = joint / outer.clamp(min=1e-12)
    return -(joint * torch.log(ratio.clamp(min=1e-12))).sum()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("loss", ["mi", "ncc", "mse"])
def test_closed_form_loss_gradients_match_autograd(loss, masked):
    rng = np.random.default_rng(4)
    fixed = torch.from_numpy(rng.random(3000))
    moved = (0.6 * fixed + 0.4 * torch.from_numpy(rng.random(3000))).clamp(0.001, 0.999)
    weights = torch.from_numpy((rng.random(3000) > 0.3).astype(np.float64)) if masked else None
    leaf = moved.clone().requires_grad_(True)
    if loss == "mi":
        mattes = MattesMI(fixed, 16)
        reference = mattes_autograd(mattes, leaf, weights)
        value, grad = mattes.value_and_grad(moved, weights)
    elif loss == "ncc":
        reference = global_ncc_autograd(fixed, leaf, weights)
        value, grad = ncc_and_grad(fixed, moved, weights)
    else:
        reference = weighted_mean((fixed - leaf) ** 2, weights) / 0.3
        value, grad = mse_and_grad(fixed, moved, weights, 0.3)
    reference.backward()
    assert float(value) == pytest.approx(float(reference.detach()), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", ["mi", "ncc", "mse"])
def test_objective_gradient_matches_finite_differences(loss):
    """The closed-form gradient of a whole pyramid level, through the parameters (rotation,
    scales, shears), against central differences of the loss (float64 images)."""
    moving, fixed, _ = known_pair((40, 44))
    fixed_level = Level(torch.from_numpy(fixed.astype(np.float64))[None, None],
                        np.diag([1.3, 1.1, 1.0]))
    moving_level = Level(torch.from_numpy(moving.astype(np.float64))[None, None],
                         np.diag([1.2, 1.0, 1.0]))
    center = torch.tensor([25.0, 24.0], dtype=torch.float64)
    objective = Objective(fixed_level, moving_level, loss, 1000, 0, 16, 9, center,
                          center + 0.5, 12.0)
    assert objective.points.shape[0] == 1000  # a subset of the 1760 voxels
    params = torch.tensor([0.02, -0.03, 0.05, 0.03, -0.02, 0.04], dtype=torch.float64,
                          requires_grad=True)
    objective(params).backward()
    numeric = []
    for k in range(params.numel()):
        step = torch.zeros_like(params)
        step[k] = 1e-6
        with torch.no_grad():
            numeric.append((float(objective(params + step)) - float(objective(params - step)))
                           / 2e-6)
    np.testing.assert_allclose(params.grad.numpy(), numeric, rtol=2e-3, atol=1e-6)


def test_point_subset_is_spread_over_the_whole_grid():
    """The random subset of a level's voxels is uniform: no part of the grid is left out (a
    subset that kept the first distinct draws in memory order once missed the far end)."""
    shape = (60, 40, 30)
    level = Level(torch.rand(1, 1, *shape), np.eye(4))
    center = torch.zeros(3, dtype=torch.float64)
    objective = Objective(level, level, "mi", 8000, 0, 32, 9, center, center, 10.0)
    points = objective.points
    assert points.shape[0] == 8000 and len(torch.unique(points, dim=0)) == 8000
    for axis, size in enumerate(shape):
        counts = torch.bincount(points[:, axis].long(), minlength=size).double()
        halves = counts[: size // 2].sum(), counts[size // 2:].sum()
        assert abs(float(halves[0] - halves[1])) < 0.05 * 8000, (axis, halves)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.1, 1.3, 1.2)])
def test_pyramid_cascade_matches_direct_smoothing(spacing):
    """Levels made one from the next (sigmas adding in quadrature) match smoothing the
    original with each level's sigma and then shrinking it (the definition)."""
    data = blob((48, 44, 40)) + 0.1 * np.random.default_rng(0).random((48, 44, 40)).astype(np.float32)
    grid = np.diag([*spacing, 1.0])
    targets = [4.0, 2.0, 1.0]
    levels = gaussian_pyramid(data, grid, targets)
    for level, target in zip(levels, targets):
        factors = np.maximum(1.0, target / np.asarray(spacing))
        sigmas = [f / 2 if f > 1 + 1e-6 else 0.0 for f in factors]
        direct = ndimage.gaussian_filter(data, sigmas, mode="nearest", truncate=3.0)
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(direct)[None, None], size=level.shape, mode="trilinear",
            align_corners=True)[0, 0].numpy()
        assert level.shape == tuple(max(2, int(round((n - 1) / f)) + 1)
                                    for n, f in zip(data.shape, factors))
        # the cascade resamples between levels: equal up to that interpolation
        assert np.abs(level.data[0, 0].numpy() - expected).max() < 0.02 * np.ptp(data)
        steps = (np.asarray(data.shape) - 1) / (np.asarray(level.shape) - 1)
        np.testing.assert_allclose(level.grid_to_world, grid @ np.diag([*steps, 1.0]))


def test_deterministic():
    moving, fixed, _ = known_pair((48, 48))
    first = affine.register_affine(moving, fixed, loss="mi", levels=(2, 1))
    second = affine.register_affine(moving, fixed, loss="mi", levels=(2, 1))
    np.testing.assert_array_equal(first.voxel_matrix, second.voxel_matrix)
    assert first.loss == second.loss


def test_mattes_mi_matches_a_dense_reference():
    """The optimiser's MI (fixed: one bin; moved: cubic B-spline over 4 bins) equals a numpy
    joint histogram that evaluates the kernel at every bin."""
    rng = np.random.default_rng(0)
    fixed = rng.random(4000)
    moved = np.clip(0.7 * fixed + 0.3 * rng.random(4000), 0, 1)
    bins = 16

    def bspline(x):
        x = np.abs(x)
        return np.where(x < 1, (4 - 6 * x ** 2 + 3 * x ** 3) / 6, np.clip(2 - x, 0, None) ** 3 / 6)

    fixed_bin = np.rint(fixed * (bins - 1)).astype(int)
    weights = np.zeros((moved.size, bins))
    position = moved * (bins - 1)
    for k in range(-1, bins + 1):  # taps outside fold onto the edge bins
        weights[:, min(max(k, 0), bins - 1)] += bspline(position - k)
    joint = np.zeros((bins, bins))
    np.add.at(joint, fixed_bin, weights)
    joint /= moved.size
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nonzero = joint > 0
    expected = -(joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])).sum()
    mi = MattesMI(torch.tensor(fixed), bins)
    assert float(mi.value_and_grad(torch.tensor(moved))[0]) == pytest.approx(expected, rel=1e-6)
    # and it tracks voxreg's Gaussian-window MI (the same measure up to the window)
    from voxreg.losses import mutual_information

    gaussian = float(mutual_information(torch.tensor(fixed).view(1, 1, -1, 1),
                                        torch.tensor(moved).view(1, 1, -1, 1), bins=bins))
    assert expected == pytest.approx(gaussian, rel=0.15)


# --------------------------------------------------------------------------------------------
# world space and different grids
# --------------------------------------------------------------------------------------------


def world_image(points):
    """An analytic, asymmetric image of world points ``(ndim, N)`` (mm): a sum of Gaussians."""
    ndim = points.shape[0]
    rng = np.random.default_rng(7)
    value = np.zeros(points.shape[1])
    for _ in range(6):
        center = rng.uniform(-12, 12, ndim)
        width = rng.uniform(4, 8)
        value += rng.uniform(0.4, 1.0) * np.exp(-((points - center[:, None]) ** 2).sum(0)
                                                / (2 * width ** 2))
    return value


def sample_grid(shape, vox2world, world_map=None):
    """The analytic image on a grid; ``world_map`` (square) is applied to the world points first."""
    ndim = len(shape)
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).reshape(ndim, -1)
    square = grid_affine(vox2world, ndim)
    world = square[:ndim, :ndim] @ index + square[:ndim, ndim:]
    if world_map is not None:
        world = world_map[:ndim, :ndim] @ world + world_map[:ndim, ndim:]
    return world_image(world).reshape(shape).astype(np.float32)


def rotation_2d(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


@pytest.mark.parametrize("ndim", [2, 3])
def test_different_grids_recovered_in_world_space(ndim):
    # fixed: 1.6 mm voxels, one origin; moving: 1.1 x 1.3 (x 1.2) mm voxels, axes swapped, another
    # origin; the true world map is a rotation, scaling and shift (fixed mm -> moving mm)
    fixed_affine = np.diag([1.6, 1.6, 1.6, 1.0])
    fixed_affine[:3, 3] = -20.0
    moving_affine = np.zeros((4, 4))
    moving_affine[0, 1], moving_affine[1, 0], moving_affine[2, 2], moving_affine[3, 3] = 1.3, 1.1, 1.2, 1
    moving_affine[:3, 3] = [-22.0, -25.0, -24.0]
    true = np.eye(ndim + 1)
    if ndim == 2:
        true[:2, :2] = rotation_2d(0.15) @ np.diag([1.08, 0.95])
        true[:2, 2] = [2.5, -1.5]
        fixed_shape, moving_shape = (26, 26), (40, 36)
    else:
        tilt = np.eye(3)
        tilt[:2, :2] = rotation_2d(0.12)
        true[:3, :3] = tilt @ np.diag([1.06, 0.96, 1.02])
        true[:3, 3] = [2.0, -1.5, 1.0]
        fixed_shape, moving_shape = (26, 26, 26), (38, 34, 35)
    # moving(y) = I(inv(W) y), so that fixed(x) = I(x) = moving(W x)
    fixed = io.Image(sample_grid(fixed_shape, fixed_affine), fixed_affine)
    moving = io.Image(sample_grid(moving_shape, moving_affine, np.linalg.inv(true)), moving_affine)
    result = affine.register_affine(moving, fixed, loss="ncc", levels=(2, 1))

    # world error over the fixed field of view, in mm
    corners = np.stack(np.meshgrid(*[[0, s - 1] for s in fixed_shape], indexing="ij")).reshape(ndim, -1)
    square = grid_affine(fixed_affine, ndim)
    world = square[:ndim, :ndim] @ corners + square[:ndim, ndim:]
    error = (result.world_matrix - true)[:ndim, :ndim] @ world + (result.world_matrix - true)[:ndim, ndim:]
    start = (true - np.eye(ndim + 1))[:ndim, :ndim] @ world + (true - np.eye(ndim + 1))[:ndim, ndim:]
    assert np.abs(start).max() > 3.0
    # within half a fixed voxel (0.8 mm) at the corners of the fixed field of view: the
    # measure's own optimum lies about 0.5 mm from the true map here (linear interpolation of
    # the moving image, the edges of its field of view), and the optimiser reaches a lower loss
    # than the true map has
    assert np.abs(error).max() < 0.8, np.abs(error).max()

    # the stored voxel matrix is inv(moving affine) @ world @ fixed affine
    voxel = np.linalg.inv(grid_affine(moving_affine, ndim)) @ result.world_matrix @ square
    np.testing.assert_allclose(result.voxel_matrix, voxel[:ndim], atol=1e-9)

    # resample = scipy map_coordinates of the moving data at voxel_matrix @ x (order 1)
    moved = result.resample(moving)
    assert moved.shape == fixed_shape
    np.testing.assert_allclose(moved.affine, fixed_affine)
    index = np.stack(np.meshgrid(*[np.arange(s) for s in fixed_shape], indexing="ij")).reshape(ndim, -1)
    coords = result.voxel_matrix[:, :ndim] @ index + result.voxel_matrix[:, ndim:]
    reference = ndimage.map_coordinates(moving.data, coords, order=1, mode="grid-constant")
    reference = reference.reshape(fixed_shape)
    np.testing.assert_allclose(moved.data, reference, atol=1e-4)
    # and the moved image is the fixed one where the moving grid covers it
    upper = np.asarray(moving_shape)[:, None] - 1
    covered = ((coords >= 0) & (coords <= upper)).all(0).reshape(fixed_shape)
    assert covered.mean() > 0.7
    assert np.abs(moved.data - fixed.data)[covered].max() < 0.05 * fixed.data.max()


def test_labels_resampled_nearest_keep_values():
    moving, fixed, _ = known_pair((32, 32, 32))
    result = affine.register_affine(moving, fixed, loss="ncc", levels=(2, 1), iterations=30)
    labels = (np.digitize(moving, [0.1, 0.3, 0.5]) * 7).astype(np.int16)  # values 0, 7, 14, 21
    moved = result.resample(labels)
    assert moved.data.dtype == np.int16
    assert set(np.unique(moved.data)) <= {0, 7, 14, 21}
    index = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij")).reshape(3, -1)
    coords = result.voxel_matrix[:, :3] @ index + result.voxel_matrix[:, 3:]
    reference = ndimage.map_coordinates(labels, coords, order=0, cval=0).reshape(32, 32, 32)
    # nearest-neighbour ties (exact .5) may round either way: allow a few voxels
    assert (moved.data != reference).mean() < 1e-3


def test_disp_and_composition():
    # moving and fixed on different grids: the displacement acts on the moving image resampled
    # onto the fixed grid through the headers
    fixed_affine = np.diag([2.0, 2.0, 1.0, 1.0])
    moving_affine = np.diag([1.5, 1.5, 1.0, 1.0])
    moving_affine[:2, 3] = [-3.0, 2.0]
    moving = io.Image(blob((56, 56), seed=3), moving_affine)
    fixed = io.Image(np.zeros((40, 40), np.float32), fixed_affine)
    world = np.eye(3)
    world[:2, :2] = rotation_2d(0.1)
    world[:2, 2] = [3.0, -4.0]
    result = affine.AffineResult(
        world_matrix=world, voxel_matrix=(np.linalg.inv(grid_affine(moving_affine, 2))
                                          @ world @ grid_affine(fixed_affine, 2))[:2],
        fixed_shape=(40, 40), fixed_affine=fixed_affine, moving_shape=(56, 56),
        moving_affine=moving_affine, loss=0.0, initial_loss=0.0, loss_name="ncc", seconds=0.0,
        params=np.zeros(6))
    disp = result.disp(dtype=torch.float64)
    assert disp.shape == (1, 2, 40, 40)
    on_fixed = io.resample_to(moving, fixed)
    via_disp = warp(torch.from_numpy(on_fixed.data.astype(np.float64))[None, None], disp)[0, 0].numpy()
    direct = result.resample(moving).data
    inner = (slice(8, -8),) * 2  # away from where the first resampling cropped the moving image
    assert np.abs(via_disp - direct)[inner].max() < 0.05 * direct.max()
    # composing with a deformable field applies the affine first, then the field (rule 6)
    rng = torch.Generator().manual_seed(0)
    field = torch.nn.functional.interpolate(torch.randn(1, 2, 5, 5, generator=rng, dtype=torch.float64),
                                            size=(40, 40), mode="bilinear", align_corners=True)
    image = torch.from_numpy(on_fixed.data.astype(np.float64))[None, None]
    twice = warp(warp(image, disp), field)
    once = warp(image, compose(disp, field))
    assert (twice - once)[..., 8:-8, 8:-8].abs().max() < 0.05 * float(image.max())
    # on one grid the displacement is the voxel matrix's
    same = affine.AffineResult(world, world[:2], (40, 40), np.eye(4), (40, 40), np.eye(4), 0.0, 0.0,
                               "ncc", 0.0, np.zeros(6))
    expected = affine_to_disp(torch.as_tensor(world[:2])[None], (40, 40), shift_center=False)
    torch.testing.assert_close(same.disp(dtype=torch.float64), expected)
    # the centred form means the same map for warp()
    img = torch.from_numpy(blob((40, 40)).astype(np.float64))[None, None]
    torch.testing.assert_close(
        warp(img, same.voxel_affine(shift_center=True, dtype=torch.float64)),
        warp(img, same.voxel_affine(dtype=torch.float64), shift_center=False))


def test_affine_prealign_returns_result_and_moved_image():
    moving, fixed, true = known_pair((48, 48))
    result, moved = affine.affine_prealign(io.Image(moving), io.Image(fixed), loss="ncc",
                                           levels=(2, 1))
    assert isinstance(result, affine.AffineResult)
    assert moved.shape == (48, 48)
    np.testing.assert_allclose(moved.data, result.resample(moving).data)
    with pytest.raises(TypeError, match="voxreg.io.Image"):
        affine.affine_prealign(moving, fixed)


def test_bad_inputs():
    image = blob((24, 24))
    with pytest.raises(ValueError, match="loss must be one of"):
        affine.register_affine(image, image, loss="ssd")
    with pytest.raises(ValueError, match="moving is 3D and fixed is 2D"):
        affine.register_affine(blob((16, 16, 16)), image)
    with pytest.raises(ValueError, match="channels"):
        affine.register_affine(io.Image(np.stack([image, image]), channels=True), image)
    with pytest.raises(ValueError, match="NaN"):
        affine.register_affine(np.full((24, 24), np.nan), image)
    with pytest.raises(ValueError, match="iterations must give one number or one per level"):
        affine.register_affine(image, image, levels=(2, 1), iterations=(5, 5, 5))
    with pytest.raises(ValueError, match="levels must be positive integers"):
        affine.register_affine(image, image, levels=(0,))
    with pytest.raises(ValueError, match="max_points must give one number or one per level"):
        affine.register_affine(image, image, levels=(2, 1), max_points=(100, 100, 100))
    with pytest.raises(ValueError, match="max_points must be positive integers"):
        affine.register_affine(image, image, max_points=0)
    with pytest.raises(TypeError, match="moving must be"):
        affine.register_affine("moving.nii.gz", image)
    result = affine.register_affine(image, image, levels=(1,), iterations=5)
    with pytest.raises(ValueError, match="registered moving grid"):
        result.resample(np.zeros((20, 20)))


# --------------------------------------------------------------------------------------------
# ITK / ANTs text transforms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_round_trip(tmp_path, ndim):
    rng = np.random.default_rng(ndim)
    world = np.eye(ndim + 1)
    world[:ndim, :ndim] += rng.uniform(-0.2, 0.2, (ndim, ndim))
    world[:ndim, ndim] = rng.uniform(-10, 10, ndim)
    path = affine.save_itk_affine(tmp_path / "t.txt", world)
    np.testing.assert_allclose(affine.load_itk_affine(path), world, atol=1e-12)
    # another centre stores other numbers but the same transform
    centered = affine.save_itk_affine(tmp_path / "c.tfm", world, center=rng.uniform(-50, 50, ndim))
    assert centered.read_text() != path.read_text()
    np.testing.assert_allclose(affine.load_itk_affine(centered), world, atol=1e-9)
    text = path.read_text().splitlines()
    assert text[0] == "#Insight Transform File V1.0"
    assert text[2] == f"Transform: AffineTransform_double_{ndim}_{ndim}"


def test_itk_analytic_cases(tmp_path):
    # a RAS translation (1, 2, 3) mm is the LPS translation (-1, -2, 3)
    world = np.eye(4)
    world[:3, 3] = [1.0, 2.0, 3.0]
    lines = affine.save_itk_affine(tmp_path / "shift.txt", world).read_text().splitlines()
    values = [float(v) for v in lines[3].split(":")[1].split()]
    np.testing.assert_allclose(values, [1, 0, 0, 0, 1, 0, 0, 0, 1, -1, -2, 3])
    assert lines[4].split(":")[1].split() == ["0", "0", "0"]
    # a rotation about z by +90 degrees in RAS (x -> y) is the same rotation in LPS (both axes flip)
    rotation = np.eye(4)
    rotation[:2, :2] = [[0, -1], [1, 0]]
    lines = affine.save_itk_affine(tmp_path / "rot.txt", rotation).read_text().splitlines()
    values = [float(v) for v in lines[3].split(":")[1].split()]
    np.testing.assert_allclose(values[:9], [0, -1, 0, 1, 0, 0, 0, 0, 1], atol=1e-15)
    # a file written by hand: scale 2 about the LPS centre (10, 0, 0): T(p) = 2 (p - C) + C,
    # i.e. p -> 2 p - C in LPS, p -> 2 p + (10, 0, 0) in RAS
    hand = tmp_path / "hand.txt"
    hand.write_text("#Insight Transform File V1.0\n#Transform 0\n"
                    "Transform: MatrixOffsetTransformBase_double_3_3\n"
                    "Parameters: 2 0 0 0 2 0 0 0 2 0 0 0\nFixedParameters: 10 0 0\n")
    expected = np.diag([2.0, 2.0, 2.0, 1.0])
    expected[0, 3] = 10.0
    np.testing.assert_allclose(affine.load_itk_affine(hand), expected)


def test_itk_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such transform file"):
        affine.load_itk_affine(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="not an ITK text transform"):
        affine.load_itk_affine(bad)
    bad.write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: Euler3DTransform_double_3_3\n"
                   "Parameters: 0 0 0 0 0 0\nFixedParameters: 0 0 0\n")
    with pytest.raises(ValueError, match="Euler3DTransform"):
        affine.load_itk_affine(bad)
    bad.write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                   "Parameters: 1 0 0 0 1 0 0 0 1\nFixedParameters: 0 0 0\n")
    with pytest.raises(ValueError, match="needs 12 Parameters, found 9"):
        affine.load_itk_affine(bad)
    with pytest.raises(ValueError, match="world_matrix must be"):
        affine.save_itk_affine(tmp_path / "x.txt", np.eye(5))


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

FIXED_AFFINE = np.array([[0, 0, 2.0, -20], [-2.0, 0, 0, 30], [0, 2.0, 0, -25], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A moving image and labels on a 1.5 mm grid, a fixed image on a 2 mm grid (other axes and
    origin) showing the same analytic scene moved by a known world affine."""
    root = tmp_path_factory.mktemp("affine_cli")
    moving_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    moving_affine[:3, 3] = [-28.0, -27.0, -26.0]
    true = np.eye(4)
    true[:3, :3] = np.array([[1.0, 0.05, 0], [-0.05, 1.0, 0.03], [0, -0.03, 1.02]])
    true[:3, 3] = [2.0, -1.0, 1.5]
    fixed = sample_grid((24, 24, 24), FIXED_AFFINE)
    moving = sample_grid((36, 36, 36), moving_affine, np.linalg.inv(true))
    labels = np.digitize(moving, [0.2, 0.5]).astype(np.uint8)
    out = {"root": root, "true": true}
    out["moving"] = io.save_image(root / "moving.nii.gz", moving * 1000, moving_affine)
    out["fixed"] = io.save_image(root / "fixed.nii.gz", fixed * 1000, FIXED_AFFINE)
    out["labels"] = io.save_image(root / "labels.nii.gz", labels, moving_affine)
    out["fixed_labels"] = io.save_image(root / "fixed_labels.nii.gz",
                                        np.digitize(fixed, [0.2, 0.5]).astype(np.uint8), FIXED_AFFINE)
    return out




def test_cli_affine(files, tmp_path):
    moved, transform, moved_labels = (tmp_path / "moved.nii.gz", tmp_path / "affine.txt",
                                      tmp_path / "moved_labels.nii.gz")
    result = run("affine", files["moving"], files["fixed"], "--moved", moved, "--transform",
                 transform, "--labels", files["labels"], "--moved-labels", moved_labels,
                 "--loss", "ncc", "--levels", "2,1")
    assert result.exit_code == 0, (result.output, result.stderr)
    assert "seconds:" in result.output
    moved_img, labels_img = nib.load(moved), nib.load(moved_labels)
    np.testing.assert_allclose(moved_img.affine, FIXED_AFFINE)
    np.testing.assert_allclose(labels_img.affine, FIXED_AFFINE)
    assert moved_img.shape == (24, 24, 24) and labels_img.shape == (24, 24, 24)
    fixed = io.load_image(files["fixed"]).data
    moved_data = np.asarray(moved_img.dataobj)
    assert np.abs(moved_data - fixed).max() < 0.05 * fixed.max()
    labels = np.asarray(labels_img.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    # the saved transform maps the fixed field of view where the true one does (mm)
    world = affine.load_itk_affine(transform)
    corners = np.stack(np.meshgrid(*[[0, 23]] * 3, indexing="ij")).reshape(3, -1)
    points = FIXED_AFFINE[:3, :3] @ corners + FIXED_AFFINE[:3, 3:]
    error = (world - files["true"])[:3, :3] @ points + (world - files["true"])[:3, 3:]
    assert np.abs(error).max() < 1.0, np.abs(error).max()
    # the labels are carried by the written transform, with label interpolation by default
    moving_labels = io.load_labels(files["labels"])
    fixed_grid = io.load_image(files["fixed"])
    shifted = io.Image(moving_labels.data, np.linalg.inv(world) @ moving_labels.affine)
    by_label = io.resample_to(shifted, fixed_grid, interp="label").data
    assert (labels == by_label).mean() > 0.999
    nearest_out = tmp_path / "moved_labels_nearest.nii.gz"
    result = run("affine", files["moving"], files["fixed"], "--moved", tmp_path / "m2.nii.gz",
                 "--labels", files["labels"], "--moved-labels", nearest_out, "--loss", "ncc",
                 "--levels", "2,1", "--label-interp", "nearest")
    assert result.exit_code == 0, (result.output, result.stderr)
    by_nearest = io.resample_to(shifted, fixed_grid, interp="nearest").data
    assert (np.asarray(nib.load(nearest_out).dataobj) == by_nearest).mean() > 0.999
    help_text = run("affine", "--help").output
    for option in ("--moved", "--transform", "--loss", "--labels", "--moved-labels",
                   "--label-interp"):
        assert option in help_text


def test_cli_affine_errors(files, tmp_path):
    moved = tmp_path / "m.nii.gz"
    assert_user_error(run("affine", tmp_path / "nope.nii.gz", files["fixed"], "--moved", moved),
                      "moving image", "does not exist")
    assert_user_error(run("affine", files["moving"], files["fixed"], "--moved",
                          tmp_path / "no_folder" / "m.nii.gz"), "does not exist")
    assert_user_error(run("affine", files["moving"], files["fixed"], "--moved",
                          files["fixed"] / "m.nii.gz"), "is not a folder")
    assert_user_error(run("affine", files["moving"], files["fixed"], "--moved", files["moving"]),
                      "is the input")
    assert_user_error(run("affine", files["moving"], files["fixed"], "--moved", moved,
                          "--transform", files["fixed"]), "--transform must be a .txt")
    assert_user_error(run("affine", files["moving"], files["fixed"], "--moved", moved,
                          "--labels", files["labels"]), "--labels and --moved-labels")
    assert_user_error(run("affine", files["moving"], files["fixed"], "--moved", moved,
                          "--labels", files["fixed_labels"], "--moved-labels", tmp_path / "l.nii.gz"),
                      "must lie on the moving image's grid")
    assert_user_error(run("affine", files["moving"], files["fixed"], "--moved", moved,
                          "--levels", "2,x"), "--levels")
    assert not moved.exists()
