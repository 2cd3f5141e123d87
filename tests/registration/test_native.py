"""The native-scan pipeline (voxreg.apps.native, register_files' default for scans off the
model's grid): world-space correctness on synthetic head phantoms defined in millimetres, one
interpolation, invariance to orientation and voxel size, and on real IXI scans as published."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from voxreg import io
from voxreg import transforms as T
from voxreg.apps.native import register_native
from voxreg.apps.register import register_files
from voxreg.checkpoint import load_model
from voxreg.data.locate import shared_data
from voxreg.domain import ModelDomain, model_domain
from voxreg.metrics import mean_dice_present
from voxreg.nn.networks import VxmDense
from voxreg.registration import InputRangeWarning, register

DOMAIN_SHAPE = (24, 28, 24)
DOMAIN_AFFINE = np.diag([6.0, 6.0, 6.0, 1.0])
DOMAIN_AFFINE[:3, 3] = -(np.array(DOMAIN_SHAPE) - 1) / 2 * 6.0
DOMAIN = ModelDomain(ndim=3, shape=DOMAIN_SHAPE, affine=DOMAIN_AFFINE, space="phantom",
                     skull_stripped=True, contrast="T1", reference="phantom", mask="phantom-mask",
                     normalize={"method": "percentile", "upper": 99.5, "within": "brain mask",
                                "clip": [0.0, 1.0]})
# structures of the phantom brain: centre (RAS mm), radius, intensity, label
BLOBS = (((20, 10, 0), 14, 800.0, 1), ((-20, 10, 0), 14, 300.0, 2), ((0, -30, 12), 16, 650.0, 3),
         ((30, -20, 22), 10, 200.0, 6), ((-25, 38, -18), 9, 950.0, 7), ((8, 45, 28), 8, 150.0, 8),
         ((-35, -40, -10), 9, 820.0, 9))


def _ellipsoid(points: np.ndarray, radii) -> np.ndarray:
    return np.sqrt(sum((points[k] / radii[k]) ** 2 for k in range(3)))


def _phantom(points: np.ndarray, head: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Intensity (T1-like, scanner units) and labels of the phantom at RAS points ``(3, ...)``:
    white matter inside grey matter, three deep structures; with ``head``, CSF, a dark skull and
    bright scalp fat around the brain."""
    radius = _ellipsoid(points, (58, 70, 60))
    brain = radius < 1
    image = np.where(brain, np.where(radius < 0.8, 650.0, 400.0), 0.0)
    labels = np.where(brain, np.where(radius < 0.8, 5, 4), 0)
    for centre, size, value, label in BLOBS:
        inside = np.linalg.norm(points - np.reshape(centre, (3,) + (1,) * (points.ndim - 1)),
                                axis=0) < size
        image = np.where(inside & brain, value, image)
        labels = np.where(inside & brain, label, labels)
    if head:
        shell = _ellipsoid(points, (72, 86, 76))
        image = np.where((shell < 0.9) & ~brain, 60.0, image)  # CSF
        image = np.where((shell >= 0.9) & (shell < 0.95), 30.0, image)  # skull
        image = np.where((shell >= 0.95) & (shell < 1), 900.0, image)  # scalp fat
    return image.astype(np.float32), labels.astype(np.int16)


def _grid(shape, affine) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return np.tensordot(affine[:3, :3], index, axes=1) + affine[:3, 3].reshape(3, 1, 1, 1)


def _scan(shape, spacing, rotation_deg=(0, 0, 0), shift=(0, 0, 0), world_motion=None,
          head=False):
    """A phantom scan on its own oblique grid (skull-stripped unless ``head``); ``world_motion``
    (4x4) moves the head in the world: the scan shows the phantom at ``inv(motion) @ p``."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix() @ np.diag(
        spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2) + np.array(shift)
    points = _grid(shape, affine)
    if world_motion is not None:
        inverse = np.linalg.inv(world_motion)
        points = np.tensordot(inverse[:3, :3], points, axes=1) + inverse[:3, 3].reshape(3, 1, 1, 1)
    image, labels = _phantom(points, head=head)
    return io.Image(image, affine), io.Image(labels, affine)


@pytest.fixture(scope="module")
def reference():
    image, labels = _phantom(_grid(DOMAIN_SHAPE, DOMAIN_AFFINE), head=False)
    return io.Image(image / image.max(), DOMAIN_AFFINE), labels > 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VxmDense(DOMAIN_SHAPE, nb_features=[[4, 4], [4, 4, 4]], int_steps=0).eval()


def _motion(degrees, shift):
    motion = np.eye(4)
    motion[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    motion[:3, 3] = shift
    return motion


def test_native_recovers_a_known_motion_in_world_space(reference, model):
    """The moving scan shows the brain moved by a rigid motion M, on another oblique grid: the
    composed map of the fixed grid lands on M(p) (the network is untrained, so it is the
    alignments to the reference and their composition that are checked; whole heads are
    checked on real scans below, since a phantom head has no anatomy to tell it from a brain)."""
    motion = _motion((6, -4, 8), (5.0, -7.0, 4.0))
    fixed, fixed_labels = _scan((40, 44, 38), (4.0, 4.2, 4.4), (0, 5, 0))
    moving, _ = _scan((36, 40, 34), (4.5, 4.5, 4.5), (10, 0, -5), (3, 2, -1), world_motion=motion)
    result = register_native(moving, fixed, model, DOMAIN, reference=reference[0],
                             reference_mask=reference[1], mask_dilation=1)
    fixed_points = _grid(fixed.shape, fixed.affine)
    error = _map_error(result, fixed, motion)
    brain = fixed_labels.data > 0
    # within one voxel of the reference grid (6 mm: the phantom's few edges limit the affine
    # stages); a map in the wrong direction or frame is off by tens of millimetres
    assert np.median(error[brain]) < 6.0
    assert np.percentile(error[brain], 95) < 9.0
    # the world displacement and the voxel coordinates describe the same map
    moving_points = np.tensordot(moving.affine[:3, :3], result.coords, axes=1) + moving.affine[
        :3, 3].reshape(3, 1, 1, 1)
    np.testing.assert_allclose(moving_points, fixed_points + result.world_disp, atol=1e-3)


def test_moved_image_is_one_interpolation_of_the_original(reference, model):
    fixed, _ = _scan((30, 34, 30), (5.0, 5.0, 5.0))
    moving, moving_labels = _scan((32, 32, 28), (4.8, 5.2, 5.0), (0, 0, 12),
                                  world_motion=_motion((0, 0, 5), (4, 0, 0)))
    result = register_native(moving, fixed, model, DOMAIN, reference=reference[0],
                             reference_mask=reference[1])
    once = T.sample(torch.from_numpy(moving.data)[None, None],
                    torch.from_numpy(result.coords)[None])[0, 0].numpy()
    np.testing.assert_array_equal(result.resample(moving), once)
    # in the scan's own units (not normalised), labels keep their dtype and values
    assert once.max() > 100
    labels = result.resample(moving_labels, interp="label")
    assert labels.dtype == np.int16 and set(np.unique(labels)) <= set(range(10))


def _map_error(result, fixed, motion) -> np.ndarray:
    """Distance (mm) between each fixed voxel's mapped point and where the motion puts it."""
    points = _grid(fixed.shape, fixed.affine)
    truth = np.tensordot(motion[:3, :3], points, axes=1) + motion[:3, 3].reshape(3, 1, 1, 1)
    return np.linalg.norm(points + result.world_disp - truth, axis=0)


def test_orientation_and_voxel_size_invariance(reference, model):
    """The same fixed scan stored flipped and permuted (another orientation, same world image)
    gives the same map in the world; on a grid of half the voxel size the map is as right."""
    motion = _motion((4, 0, -6), (-4.0, 6.0, 0.0))
    moving, _ = _scan((36, 40, 34), (4.5, 4.5, 4.5), (8, 0, 0), world_motion=motion)
    fixed, fixed_labels = _scan((36, 40, 36), (4.0, 4.0, 4.0), (0, 0, 6))
    brain = fixed_labels.data > 0
    options = dict(reference=reference[0], reference_mask=reference[1])
    base = register_native(moving, fixed, model, DOMAIN, **options)
    # another orientation: array axes permuted and flipped, affine adjusted (same world grid)
    data = np.flip(np.transpose(fixed.data, (2, 0, 1)), axis=0)
    perm = np.zeros((4, 4))
    perm[3, 3] = perm[2, 0] = perm[0, 1] = perm[1, 2] = 1  # old index = perm @ new index
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, fixed.shape[2] - 1
    reoriented = io.Image(np.ascontiguousarray(data), fixed.affine @ perm @ flip)
    other = register_native(moving, reoriented, model, DOMAIN, **options)
    back = np.transpose(np.flip(other.world_disp, axis=1), (0, 2, 3, 1))
    assert np.median(np.linalg.norm(back - base.world_disp, axis=0)[brain]) < 0.5  # mm
    # half the voxel size, and an anisotropic grid: the map is right on each
    fine, fine_labels = _scan((72, 80, 72), (2.0, 2.0, 2.0), (0, 0, 6))
    thick, thick_labels = _scan((72, 80, 24), (2.0, 2.0, 6.0), (0, 0, 6))
    for grid, labels in ((fixed, fixed_labels), (fine, fine_labels), (thick, thick_labels)):
        result = register_native(moving, grid, model, DOMAIN, **options)
        error = _map_error(result, grid, motion)[labels.data > 0]
        assert np.median(error) < 6.0, grid.shape  # mm: one voxel of the reference grid


def test_shipped_3d_models_record_their_domain():
    for name in ("brain3d", "brain3d-diff", "synth3d"):
        domain = model_domain(load_model(name))
        assert domain.shape == (96, 112, 96) and domain.voxel_size == (2.0, 2.0, 2.0)
        assert domain.orientation == "RAS" and domain.skull_stripped
        assert domain.reference_image().shape == domain.shape
        mask = domain.reference_mask()
        assert mask.shape == domain.shape and 0.1 < mask.mean() < 0.5


def _raw(name):
    root = shared_data("ixi-raw")
    if root is None:
        pytest.skip("../shared/data/ixi-raw is not available")
    return root / "images" / f"{name}.nii.gz", root / "labels" / f"{name}.nii.gz"


@pytest.mark.slow
def test_raw_whole_head_scans_beat_affine_alone(one_thread):
    """Two IXI T1 scans exactly as published (native grids, whole head, scanner units): the
    default command's labels agree with the fixed scan's better than affine alignment alone."""
    moving, moving_labels = _raw("IXI440-HH-2127")
    fixed, fixed_labels = _raw("IXI014-HH-1236")
    result = register_files(moving, fixed, "brain3d-diff", moving_labels=moving_labels,
                            progress=False)
    assert result.native is not None
    fixed_lab = io.load_labels(fixed_labels).data
    mov_lab = io.load_labels(moving_labels).data
    native = mean_dice_present(fixed_lab, result.moved_labels.data, mov_lab)
    affine_only = mean_dice_present(fixed_lab, T.sample(
        torch.from_numpy(mov_lab)[None, None], torch.from_numpy(np.asarray(
            _affine_coords(result), np.float32))[None], "label")[0, 0].numpy(), mov_lab)
    assert native > affine_only + 0.05
    assert native > 0.55
    # intensities in scanner units, on the fixed grid
    assert result.moved.data.shape == io.load_image(fixed).shape
    assert result.moved.data.max() > 100


def _affine_coords(result) -> np.ndarray:
    """The affine part of a native result alone, as moving voxel coordinates of the fixed grid."""
    native = result.native
    moving_inv = np.linalg.inv(io.load_image(_raw("IXI440-HH-2127")[0]).affine)
    fixed_affine = io.load_image(_raw("IXI014-HH-1236")[0]).affine
    matrix = moving_inv @ native.fixed_to_moving @ fixed_affine
    shape = native.coords.shape[1:]
    index = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return np.tensordot(matrix[:3, :3], index, axes=1) + matrix[:3, 3].reshape(3, 1, 1, 1)


def test_scanner_units_into_a_model_trained_on_unit_range_warn():
    """In Python, 0..255 (or scanner-unit) images given straight to a shipped model warn, naming
    the input and the remedy; images in [0, 1] do not."""


    model = load_model("brain2d-smooth")
    rng = np.random.default_rng(0)
    image = rng.random((96, 112)).astype(np.float32)
    with pytest.warns(InputRangeWarning, match=r"moving intensities span .*voxreg\.register_files"):
        register(model, image * 255, image)


    with warnings.catch_warnings():
        warnings.simplefilter("error", InputRangeWarning)
        register(model, image, image)


def test_a_2d_scan_for_a_3d_model_is_named():
    flat = io.Image(np.zeros((40, 40), np.float32), np.eye(4))
    volume = io.Image(np.zeros((20, 22, 18), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"moving image <in memory> is 2D .* the model is 3D"):
        register_files(flat, volume, "brain3d-diff", progress=False)
