"""The transform core against independent references (scipy.ndimage, analytic maps, gradcheck)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage as ndi
import torch

import voxreg.transforms as T
from voxreg.nn import layers

SHAPES = [(23, 19), (13, 11, 15)]


def smooth_field(shape, batch=1, magnitude=3.0, seed=0, dtype=torch.float64):
    """A random smooth displacement: coarse noise upsampled with cubic splines."""
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    coarse = rng.normal(size=(batch, ndim) + tuple(4 for _ in shape))
    zoom = [1, 1] + [s / 4 for s in shape]
    field = ndi.zoom(coarse, zoom, order=3)
    field = field / np.abs(field).max() * magnitude
    return torch.as_tensor(field, dtype=dtype)


def random_affine(ndim, batch=1, seed=0, noise=0.1, shift=3.0, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    matrix = np.tile(np.eye(ndim, ndim + 1), (batch, 1, 1))
    matrix[:, :, :ndim] += noise * rng.normal(size=(batch, ndim, ndim))
    matrix[:, :, ndim] = rng.uniform(-shift, shift, size=(batch, ndim))
    return torch.as_tensor(matrix, dtype=dtype)


def scipy_warp(image, disp, order, cval=0.0):
    """Reference pull-back warp of a (C, *spatial) array by a (ndim, *spatial) field."""
    shape = image.shape[1:]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return np.stack(
        [ndi.map_coordinates(c, grid + disp, order=order, mode="grid-constant", cval=cval)
         for c in image]
    )


# ---------------------------------------------------------------------------------------------
# warp


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("interp,order", [("linear", 1), ("nearest", 0)])
def test_warp_dense_matches_map_coordinates(shape, dtype, interp, order, device):
    torch.manual_seed(1)
    image = torch.rand(2, 2, *shape, dtype=dtype)
    disp = smooth_field(shape, batch=2, magnitude=4.0, dtype=dtype)
    moved = T.warp(image.to(device), disp.to(device), interp=interp)
    assert moved.shape == image.shape and moved.dtype == dtype and moved.device == device
    moved = moved.cpu()
    for b in range(2):
        ref = scipy_warp(image[b].double().numpy(), disp[b].double().numpy(), order)
        diff = np.abs(ref - moved[b].double().numpy())
        if interp == "nearest":
            # rounding ties differ only where a coordinate sits within float eps of .5
            assert (diff > 1e-4).mean() < 1e-3
        else:
            assert diff.max() < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_warp_fill_value(shape):
    image = torch.rand(1, 1, *shape, dtype=torch.float64)
    disp = smooth_field(shape, magnitude=8.0)
    moved = T.warp(image, disp, fill_value=-2.5)
    ref = scipy_warp(image[0].numpy(), disp[0].numpy(), 1, cval=-2.5)
    assert np.abs(ref - moved[0].numpy()).max() < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("square", [False, True])
def test_warp_affine_matches_affine_transform(shape, square):
    ndim = len(shape)
    image = torch.rand(1, 1, *shape, dtype=torch.float64)
    affine = random_affine(ndim, seed=3)
    matrix = affine
    if square:
        bottom = torch.zeros(1, 1, ndim + 1, dtype=torch.float64)
        bottom[..., -1] = 1
        matrix = torch.cat([affine, bottom], 1)
    moved = T.warp(image, matrix)
    center = (np.array(shape) - 1) / 2
    linear, shift = affine[0, :, :ndim].numpy(), affine[0, :, ndim].numpy()
    ref = ndi.affine_transform(image[0, 0].numpy(), linear, offset=shift + center - linear @ center,
                               order=1, mode="grid-constant")
    assert np.abs(ref - moved[0, 0].numpy()).max() < 1e-10
    # without shift_center the matrix acts on raw voxel indices
    moved_raw = T.warp(image, affine, shift_center=False)
    ref_raw = ndi.affine_transform(image[0, 0].numpy(), linear, offset=shift, order=1,
                                   mode="grid-constant")
    assert np.abs(ref_raw - moved_raw[0, 0].numpy()).max() < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("interp", ["linear", "nearest"])
def test_warp_affine_equals_warp_of_its_field(shape, interp, device):
    ndim = len(shape)
    image = torch.rand(3, 2, *shape, dtype=torch.float64).to(device)
    affine = random_affine(ndim, batch=3, seed=4).to(device)
    by_matrix = T.warp(image, affine, interp=interp)
    by_field = T.warp(image, T.affine_to_disp(affine, shape), interp=interp)
    assert torch.allclose(by_matrix, by_field, atol=1e-10)


def test_affine_to_disp_is_analytic(device):
    shape = (7, 9, 5)
    affine = random_affine(3, seed=5).to(device)
    disp = T.affine_to_disp(affine, shape)
    assert disp.device == device
    grid = T.identity_grid(shape, device=device, dtype=torch.float64)
    center = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64,
                          device=device).view(3, 1, 1, 1)
    linear, shift = affine[0, :, :3], affine[0, :, 3].view(3, 1, 1, 1)
    expected = torch.einsum("ij,j...->i...", linear, grid - center) + shift + center - grid
    assert torch.allclose(disp[0], expected, atol=1e-12)


def test_nearest_keeps_integer_labels_exactly():
    rng = np.random.default_rng(0)
    labels = torch.as_tensor(rng.choice([0, 3, 17, 1000, 65535], size=(2, 1, 12, 14, 10)),
                             dtype=torch.int32)
    disp = smooth_field((12, 14, 10), batch=2, magnitude=5.0, dtype=torch.float32)
    moved = T.warp(labels, disp, interp="nearest")
    assert moved.dtype == torch.int32
    assert set(moved.unique().tolist()) <= {0, 3, 17, 1000, 65535}
    ref = scipy_warp(labels[0].numpy().astype(float), disp[0].double().numpy(), 0)
    assert (ref == moved[0].numpy()).mean() > 0.999
    # float label maps too: no value that was not in the input
    moved_float = T.warp(labels.float(), disp, interp="nearest")
    assert set(moved_float.unique().tolist()) <= {0.0, 3.0, 17.0, 1000.0, 65535.0}


def label_reference(labels, coords, fill):
    """Per-label linear interpolation of the indicators (scipy), then the largest: the
    definition of ``interp="label"``; also the margin of the winner over the runner-up."""
    values = np.unique(np.append(labels, fill))
    scores = np.stack([ndi.map_coordinates((labels == v).astype(float), coords, order=1,
                                           mode="grid-constant", cval=float(v == fill))
                       for v in values])
    ordered = np.sort(scores, axis=0)
    return values[scores.argmax(0)], ordered[-1] - ordered[-2]


@pytest.mark.parametrize("shape", [(20, 24), (16, 20, 12)])
def test_label_interpolation_is_the_largest_interpolated_indicator(shape):
    ndim = len(shape)
    rng = np.random.default_rng(1)
    blocks = rng.choice([0, 2, 5, 300], size=tuple(s // 4 for s in shape))
    labels = ndi.zoom(blocks, 4, order=0).astype(np.int16)
    disp = smooth_field(shape, batch=1, magnitude=2.5, seed=3, dtype=torch.float64)
    moved = T.warp(torch.from_numpy(labels)[None, None], disp, interp="label", fill_value=5)
    assert moved.dtype == torch.int16 and moved.shape == (1, 1, *shape)
    grid = T.identity_grid(shape, dtype=torch.float64) + disp[0]
    expected, margin = label_reference(labels, grid.reshape(ndim, -1).numpy(), 5)
    got = moved.reshape(-1).numpy()
    clear = margin > 1e-6  # away from exact ties
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], expected[clear])
    # smoother than nearest: it differs from nearest somewhere, and never invents a label
    nearest = T.warp(torch.from_numpy(labels)[None, None], disp, interp="nearest", fill_value=5)
    assert (nearest != moved).any()
    assert set(moved.unique().tolist()) <= {0, 2, 5, 300}
    # an affine, batched, with the batch-1 image broadcast; the identity reproduces the map
    affine = random_affine(ndim, batch=2, seed=6, dtype=torch.float32)
    batched = T.warp(torch.from_numpy(labels)[None, None], affine, interp="label")
    for b in range(2):
        field = T.affine_to_disp(affine[b:b + 1].double(), shape)[0]
        points = (T.identity_grid(shape, dtype=torch.float64) + field).reshape(ndim, -1)
        expected, margin = label_reference(labels, points.numpy(), 0)
        clear = margin > 1e-5
        np.testing.assert_array_equal(batched[b, 0].reshape(-1).numpy()[clear], expected[clear])
    identity = T.warp(torch.from_numpy(labels)[None, None], torch.zeros(1, ndim, *shape),
                      interp="label")
    assert torch.equal(identity[0, 0], torch.from_numpy(labels))
    with pytest.raises(ValueError, match="fill_value must be an integer"):
        T.warp(torch.from_numpy(labels)[None, None], disp, interp="label", fill_value=0.5)
    with pytest.raises(ValueError, match="'linear', 'nearest' or 'label'"):
        T.warp(torch.from_numpy(labels)[None, None], disp, interp="cubic")


def test_warp_broadcasts_batch_of_one(device):
    image = torch.rand(1, 1, 10, 12, dtype=torch.float64).to(device)
    disp = smooth_field((10, 12), batch=3).to(device)
    moved = T.warp(image, disp)
    assert moved.shape == (3, 1, 10, 12)
    for b in range(3):
        assert torch.allclose(moved[b : b + 1], T.warp(image, disp[b : b + 1]))
    # an unbatched matrix applies to the whole batch
    images = torch.rand(4, 1, 10, 12, dtype=torch.float64).to(device)
    affine = random_affine(2)[0].to(device)
    assert T.warp(images, affine).shape == (4, 1, 10, 12)


def test_warp_3d_split_path_matches_scipy(monkeypatch):
    # large enough that the CPU path cuts the volume into pieces for several threads
    shape = (32, 48, 45)
    image = torch.rand(1, 3, *shape, dtype=torch.float32)
    disp = smooth_field(shape, magnitude=3.0, dtype=torch.float32)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert T._split_factor(1, shape[0], torch.device("cpu"), int(np.prod(shape))) == 4
    moved = T.warp(image, disp)
    ref = scipy_warp(image[0].double().numpy(), disp[0].double().numpy(), 1)
    assert np.abs(ref - moved[0].double().numpy()).max() < 1e-4


def test_warp_runs_on_device(device):
    image = torch.rand(1, 1, 9, 10, 11, device=device)
    disp = smooth_field((9, 10, 11), dtype=torch.float32).to(device)
    moved = T.warp(image, disp)
    assert moved.device == device
    ref = T.warp(image.cpu(), disp.cpu())
    assert torch.allclose(moved.cpu(), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# gradients


def test_gradcheck_warp_dense():
    torch.manual_seed(0)
    image = torch.rand(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    disp = (torch.rand(1, 2, 5, 6, dtype=torch.float64) * 2 - 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, d: T.warp(i, d), (image, disp))
    image3 = torch.rand(1, 1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    disp3 = (torch.rand(1, 3, 4, 5, 3, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, d: T.warp(i, d), (image3, disp3))


def test_gradcheck_warp_affine():
    image = torch.rand(1, 1, 6, 5, dtype=torch.float64, requires_grad=True)
    affine = (random_affine(2, seed=7, shift=0.7)).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, a: T.warp(i, a), (image, affine))


def test_gradcheck_integrate_velocity():
    velocity = smooth_field((6, 7), magnitude=1.5, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: T.integrate_velocity(v, steps=3), (velocity,))
    velocity3 = smooth_field((4, 5, 4), magnitude=1.0, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: T.integrate_velocity(v, steps=2), (velocity3,))


# ---------------------------------------------------------------------------------------------
# compose, integrate, invert, resize


def test_compose_affine_with_inverse_is_exact_identity(device):
    affine = random_affine(3, batch=2, seed=8).to(device)
    identity = torch.eye(3, 4, dtype=torch.float64, device=device).expand(2, 3, 4)
    assert torch.allclose(T.compose(affine, T.invert(affine)), identity, atol=1e-12)
    assert torch.allclose(T.compose(T.invert(affine), affine), identity, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_compose_matches_sequential_warps(shape):
    ndim = len(shape)
    # a smooth image so that resampling twice and once agree closely
    grid = T.identity_grid(shape, dtype=torch.float64)
    image = sum(torch.sin(0.3 * g + k) for k, g in enumerate(grid))[None, None]
    first = smooth_field(shape, magnitude=1.5, seed=10)
    second = smooth_field(shape, magnitude=1.5, seed=11)
    affine = random_affine(ndim, seed=12, noise=0.03, shift=1.0)
    inner = tuple(slice(4, -4) for _ in shape)
    for a, b in [(first, second), (affine, second), (first, affine)]:
        two_steps = T.warp(T.warp(image, a), b)
        one_step = T.warp(image, T.compose(a, b))
        err = (two_steps - one_step)[(0, 0) + inner].abs().max()
        assert err < 0.05, err
    # affine/affine gives the matrix that warps like the two in turn
    other = random_affine(ndim, seed=13, noise=0.03, shift=1.0)
    composed = T.compose(affine, other)
    assert composed.shape == (1, ndim, ndim + 1)
    field = T.compose(T.affine_to_disp(affine, shape), T.affine_to_disp(other, shape))
    assert torch.allclose(T.affine_to_disp(composed, shape)[(0, slice(None)) + inner],
                          field[(0, slice(None)) + inner], atol=1e-10)


@pytest.mark.parametrize("shape", [(32, 30), (20, 18, 22)])
def test_dense_compose_with_inverse_is_near_identity(shape):
    disp = smooth_field(shape, batch=2, magnitude=1.0, seed=14)
    assert T.jacobian_determinant(disp).min() > 0.6  # invertible, not too steep
    inverse, residual = T.invert(disp, return_residual=True)
    assert residual.shape == (2,) and residual.max() < 1e-3
    inner = (slice(None), slice(None)) + tuple(slice(3, -3) for _ in shape)
    # stated tolerances, 3 voxels away from the border: the fixed point enforces
    # disp o inverse = id to 1e-3 voxel; inverse o disp also needs the inverse interpolated
    # between grid points, which costs up to ~0.05 voxel on such a field
    assert T.compose(disp, inverse)[inner].abs().max() < 1e-3
    assert T.compose(inverse, disp)[inner].abs().max() < 0.1


def test_constant_velocity_integrates_to_translation(device):
    velocity = torch.empty(2, 3, 8, 9, 7, dtype=torch.float64, device=device)
    velocity[:, 0], velocity[:, 1], velocity[:, 2] = 1.5, -2.25, 0.5
    disp = T.integrate_velocity(velocity, steps=7)
    assert torch.allclose(disp, velocity, atol=1e-10)
    assert T.integrate_velocity(velocity, steps=0) is velocity


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_velocity_integrates_to_matrix_exponential(ndim):
    shape = (31,) * ndim if ndim == 2 else (21,) * 3
    rng = np.random.default_rng(15)
    generator = 0.08 * rng.normal(size=(ndim, ndim))
    center = (np.array(shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")) - center.reshape(
        (-1,) + (1,) * ndim)
    velocity = np.einsum("ij,j...->i...", generator, grid)
    disp = T.integrate_velocity(torch.as_tensor(velocity)[None], steps=10)[0].numpy()
    expected = np.einsum("ij,j...->i...", scipy.linalg.expm(generator) - np.eye(ndim), grid)
    inner = (slice(None),) + tuple(slice(6, -6) for _ in shape)
    assert np.abs(disp - expected)[inner].max() < 1e-3


def test_half_resolution_integration_is_close_to_full():
    velocity = smooth_field((40, 36), magnitude=3.0, seed=22)
    full = T.integrate_velocity(velocity, 7)
    half = T.integrate_velocity(velocity, 7, downsize=2)
    manual = T.resize_disp(T.integrate_velocity(T.resize_disp(velocity, shape=(20, 18)), 7),
                           shape=(40, 36))
    assert torch.allclose(half, manual)
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5))
    assert (half - full)[inner].abs().max() < 0.2


def test_velocity_inverse_by_negation():
    # a 2-voxel velocity; the tolerance (0.05 voxel in the interior) is the discretisation
    # error of scaling and squaring on the grid, not of the negation
    velocity = smooth_field((24, 22), magnitude=2.0, seed=16)
    forward = T.integrate_velocity(velocity, 7)
    backward = T.integrate_velocity(T.invert(velocity, velocity=True), 7)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert T.compose(forward, backward)[inner].abs().max() < 0.05


@pytest.mark.parametrize("shape,new", [((9, 13), (17, 25)), ((12, 10, 8), (6, 5, 4)),
                                       ((9, 13), (14, 20))])
def test_resize_disp_keeps_an_affine_field(shape, new):
    ndim = len(shape)
    affine = random_affine(ndim, seed=17)
    disp = T.affine_to_disp(affine, shape)
    resized = T.resize_disp(disp, shape=new)
    scale = torch.tensor([(n - 1) / (o - 1) for n, o in zip(new, shape)], dtype=torch.float64)
    linear = scale[:, None] * affine[0, :, :ndim] / scale[None, :]
    expected = T.affine_to_disp(torch.cat([linear, (scale * affine[0, :, ndim])[:, None]], 1), new)
    assert resized.shape == (1, ndim, *new)
    assert torch.allclose(resized, expected, atol=1e-10)
    assert T.resize_disp(disp, factor=2.0).shape[2:] == tuple(2 * s for s in shape)


# ---------------------------------------------------------------------------------------------
# points


def test_warp_points_follows_the_analytic_affine():
    shape = (40, 36)
    affine = random_affine(2, seed=18, shift=5.0)
    rng = np.random.default_rng(1)
    points = torch.as_tensor(rng.uniform(8, 28, size=(1, 6, 2)))
    center = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64)
    linear, shift = affine[0, :, :2], affine[0, :, 2]
    expected = (points - center) @ linear.T + shift + center
    by_field = T.warp_points(points, T.affine_to_disp(affine, shape))
    by_matrix = T.warp_points(points, affine, shape=shape)
    assert torch.allclose(by_field, expected, atol=1e-10)
    assert torch.allclose(by_matrix, expected, atol=1e-12)


def test_annotations_follow_the_image_with_the_inverse_field():
    """The seed's recipe: warp the image with A, move its points with the field of inv(A)."""
    shape = (48, 48)
    image = torch.zeros(1, 1, *shape, dtype=torch.float64)
    rng = np.random.default_rng(2)
    points = torch.as_tensor(rng.uniform(14, 34, size=(1, 5, 2)))
    for p in points[0].round().long():
        image[0, 0, p[0], p[1]] = 1.0
    affine = random_affine(2, seed=19, shift=4.0)
    moved = T.warp(image, affine)
    moved_points = T.warp_points(points.round(), T.affine_to_disp(T.invert(affine), shape))
    # each annotation lands where the moved image now shows its spot
    back = T.warp_points(moved_points, affine, shape=shape)
    assert torch.allclose(back, points.round(), atol=1e-8)
    for p in moved_points[0]:
        i, j = p.round().long().tolist()
        neighbourhood = moved[0, 0, i - 1 : i + 2, j - 1 : j + 2]
        assert neighbourhood.max() > 0.2


# ---------------------------------------------------------------------------------------------
# Jacobian


def test_jacobian_of_affine_field_is_matrix_determinant(device):
    for ndim, shape in [(2, (11, 9)), (3, (7, 8, 6))]:
        affine = random_affine(ndim, seed=20, noise=0.2).to(device)
        det = T.jacobian_determinant(T.affine_to_disp(affine, shape))
        expected = torch.linalg.det(affine[0, :, :ndim])
        assert det.shape == (1, *shape)
        assert torch.allclose(det, expected.expand_as(det), atol=1e-10)


def test_jacobian_matches_numpy_gradient():
    disp = smooth_field((9, 10, 11), magnitude=3.0, seed=21)
    det = T.jacobian_determinant(disp)[0].numpy()
    d = disp[0].numpy()
    jac = np.stack([np.stack(np.gradient(d[i]), 0) for i in range(3)]) + np.eye(3)[:, :, None, None, None]
    expected = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    assert np.abs(det - expected).max() < 1e-10


def test_folding_is_detected(device):
    shape = (20, 20)
    disp = torch.zeros(1, 2, *shape, dtype=torch.float64, device=device)
    assert T.folding_fraction(disp).item() == 0.0
    # rows 8..12 are mapped backwards: d/dx (x + disp) = 1 - 2 < 0 there
    rows = torch.arange(20, dtype=torch.float64, device=device)
    band = (rows >= 8) & (rows <= 12)
    disp[0, 0][band] = (-2.0 * (rows[band] - 10)).unsqueeze(1).expand(-1, 20)
    det = T.jacobian_determinant(disp)
    assert (det[0, 9:12] < 0).all()
    fraction = T.folding_fraction(disp)
    assert 0 < fraction.item() < 0.5
    mask = torch.zeros(*shape, device=device)
    mask[:5] = 1
    assert T.folding_fraction(disp, mask=mask).item() == 0.0
    mask[10] = 1
    assert T.folding_fraction(disp, mask=mask).item() > 0


# ---------------------------------------------------------------------------------------------
# modules


def test_layers_match_functions():
    shape = (12, 10, 9)
    image = torch.rand(2, 1, *shape)
    disp = smooth_field(shape, batch=2, dtype=torch.float32)
    transformer = layers.SpatialTransformer(shape)
    assert torch.allclose(transformer(image, disp), T.warp(image, disp), atol=1e-6)
    nearest = layers.SpatialTransformer(shape, interp="nearest")
    assert torch.equal(nearest(image, disp), T.warp(image, disp, interp="nearest"))
    integrate = layers.VecInt(shape, steps=5)
    assert torch.allclose(integrate(disp), T.integrate_velocity(disp, 5), atol=1e-5)
    resize = layers.ResizeTransform(factor=0.5)
    assert torch.allclose(resize(disp), T.resize_disp(disp, factor=0.5))
    # float64 after .double(): the cached grid follows the module
    transformer = transformer.double()
    assert transformer(image.double(), disp.double()).dtype == torch.float64
    assert "identity" not in transformer.state_dict()
    with pytest.raises(ValueError, match="disp must have shape"):
        transformer(image.double(), disp.double()[:, :2])


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_name_the_argument():
    image = torch.rand(1, 1, 8, 9)
    disp = torch.zeros(1, 2, 8, 9)
    with pytest.raises(ValueError, match=r"image must have shape \(B, C, H, W\)"):
        T.warp(torch.rand(8, 9), disp)
    with pytest.raises(ValueError, match=r"transform must have shape \(B, 2, H, W\)"):
        T.warp(image, torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="transform"):
        T.warp(image, torch.zeros(1, 2, 8, 10))
    with pytest.raises(ValueError, match=r"transform must have shape \(B, 2, 3\)"):
        T.warp(image, torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="transform must be a displacement"):
        T.warp(image, torch.zeros(1, 3, 8, 9, 1))
    nan = disp.clone()
    nan[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="transform contains NaN"):
        T.warp(image, nan)
    bad_image = image.clone()
    bad_image[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="image contains NaN"):
        T.warp(bad_image, disp)
    with pytest.raises(ValueError, match="interp"):
        T.warp(image, disp, interp="cubic")
    with pytest.raises(ValueError, match="batch sizes"):
        T.warp(torch.rand(2, 1, 8, 9), torch.zeros(3, 2, 8, 9))
    with pytest.raises(ValueError, match="last row"):
        T.warp(image, torch.ones(1, 3, 3))
    with pytest.raises(TypeError, match="image must be a torch.Tensor"):
        T.warp(np.zeros((1, 1, 8, 9)), disp)
    with pytest.raises(ValueError, match="shape"):
        T.affine_to_disp(torch.eye(3, 4), (8, 9))
    with pytest.raises(ValueError, match="second"):
        T.compose(disp, torch.zeros(1, 2, 7, 9))
    with pytest.raises(ValueError, match="steps"):
        T.integrate_velocity(disp, steps=-1)
    with pytest.raises(ValueError, match="velocity contains NaN"):
        T.integrate_velocity(nan)
    with pytest.raises(ValueError, match="points must have shape"):
        T.warp_points(torch.zeros(1, 4), disp)
    with pytest.raises(ValueError, match="shape is required"):
        T.warp_points(torch.zeros(1, 4, 2), torch.eye(2, 3))
    with pytest.raises(ValueError, match="mask must have spatial shape"):
        T.folding_fraction(disp, mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match="exactly one of factor or shape"):
        T.resize_disp(disp)
