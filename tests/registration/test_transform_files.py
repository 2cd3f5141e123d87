"""voxreg.transform_files against SimpleITK (in this environment) and ANTsPy (in its own
environment, run in one subprocess per session): displacement-field conventions, .mat affines,
ANTs-order chains applied with one interpolation, and the files of ``voxreg register --warp`` and
``voxreg warp -t ... -r ...`` against ANTs.

ANTsPy is looked for at ``<repo>/.venv-ants/bin/python`` (for a linked git worktree also in the
main checkout), or wherever ``VOXREG_ANTS_PYTHON`` points; the ANTs tests skip without it, the
SimpleITK tests without SimpleITK.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.io
import torch
from cli_helpers import assert_ok, run
from scipy import ndimage

import voxreg
from voxreg import io
from voxreg import transform_files as tf
from voxreg.transforms import warp

try:
    import SimpleITK as sitk
except ImportError:  # pragma: no cover - SimpleITK is a test-only dependency
    sitk = None

needs_sitk = pytest.mark.skipif(sitk is None, reason="SimpleITK is not installed")

FLIP = np.diag([-1.0, -1.0, 1.0])
FIXED_SHAPE = (12, 14, 10)
MOVING_SHAPE = (16, 17, 13)


# --------------------------------------------------------------------------------------------
# geometry and data
# --------------------------------------------------------------------------------------------


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = (math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay),
                              math.cos(az), math.sin(az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_grid(shape, spacing, angles, centre) -> np.ndarray:
    """A rotated, anisotropic voxel-to-RAS affine centred on ``centre`` (float32-exact, as a
    NIfTI sform stores it)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(*angles) @ np.diag(spacing)
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine.astype(np.float32).astype(np.float64)


FIXED_AFFINE = oblique_grid(FIXED_SHAPE, (1.2, 0.9, 1.5), (0.3, -0.2, 0.25), (2.0, -3.0, 4.0))
MOVING_AFFINE = oblique_grid(MOVING_SHAPE, (1.1, 1.0, 1.3), (-0.1, 0.15, -0.3), (2.5, -2.5, 3.5))


def world_matrix() -> np.ndarray:
    """Fixed RAS -> moving RAS: a small rotation and anisotropic scaling about the fixed grid's
    centre, plus a shift."""
    centre = np.array([2.0, -3.0, 4.0])
    linear = rotation(0.05, -0.04, 0.06) @ np.diag([1.03, 0.97, 1.02])
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre + np.array([0.8, -0.6, 0.5])
    return matrix


def smooth_disp(shape=FIXED_SHAPE) -> np.ndarray:
    """A known smooth field (voxels, below one voxel, invertible)."""
    i, j, k = np.indices(shape) / (np.asarray(shape) - 1).reshape(3, 1, 1, 1)
    return np.stack([
        0.9 * np.sin(2 * np.pi * j) * np.cos(np.pi * k) + 0.3,
        -0.7 * np.cos(np.pi * i) * np.sin(2 * np.pi * k),
        0.6 * np.sin(np.pi * (i + j)) - 0.2,
    ]).astype(np.float32)


def world_points(shape, affine) -> np.ndarray:
    index = np.indices(shape).reshape(3, -1).astype(np.float64)
    return (affine[:3, :3] @ index + affine[:3, 3:]).reshape(3, *shape)


def pattern(points: np.ndarray) -> np.ndarray:
    """An image with detail at a few voxels' scale, as a function of RAS mm."""
    x, y, z = points
    return (np.sin(1.3 * x) * np.cos(1.1 * y + 0.3) + 0.5 * np.sin(0.9 * z) + 0.05 * x).astype(
        np.float32)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.to_filename(str(path))
    return path


def to_itk_grid(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, spacing, direction) in LPS of a RAS voxel-to-world affine."""
    lps = FLIP @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    return FLIP @ affine[:3, 3], spacing, lps / spacing


def itk_array(image) -> np.ndarray:
    """A SimpleITK image as a numpy array indexed (i, j, k) like nibabel's."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def max_rel(a: np.ndarray, b: np.ndarray, mask: np.ndarray, scale: float) -> float:
    return float(np.abs(a - b)[mask].max() / scale)


def inside(voxels: np.ndarray, shape, margin: float = 1.0) -> np.ndarray:
    """Where voxel coordinates ``(ndim, *grid)`` lie ``margin`` voxels inside a grid of ``shape``."""
    upper = np.asarray(shape, dtype=np.float64).reshape(-1, *[1] * (voxels.ndim - 1)) - 1 - margin
    return ((voxels >= margin) & (voxels <= upper)).all(0)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """Files shared by the tests: fixed and moving grids, images, a voxreg lps-mm warp on the
    fixed grid, voxreg .mat affines (the map and its inverse)."""
    folder = tmp_path_factory.mktemp("xfm")
    disp = smooth_disp()
    matrix = world_matrix()
    moving = pattern(world_points(MOVING_SHAPE, MOVING_AFFINE))
    on_fixed = pattern(world_points(FIXED_SHAPE, FIXED_AFFINE))
    labels = np.digitize(moving, [-1.0, -0.3, 0.3, 1.0]).astype(np.int16)
    paths = {
        "fixed": save_nifti(folder / "fixed.nii.gz", on_fixed, FIXED_AFFINE),
        "moving": save_nifti(folder / "moving.nii.gz", moving, MOVING_AFFINE),
        "on_fixed": save_nifti(folder / "moving_on_fixed.nii.gz", on_fixed, FIXED_AFFINE),
        "labels": save_nifti(folder / "labels.nii.gz", labels, MOVING_AFFINE),
        "warp": tf.save_displacement(folder / "warp.nii.gz", disp, FIXED_AFFINE, "lps-mm"),
        "affine": tf.save_affine(folder / "affine.mat", matrix, center=(1.0, -2.0, 3.0)),
        "affine_inv": tf.save_affine(folder / "affine_inv.mat", np.linalg.inv(matrix)),
    }
    return {"folder": folder, "disp": disp, "matrix": matrix, "moving_data": moving,
            "on_fixed_data": on_fixed, "labels_data": labels, **paths}


REG_SHAPE = (16, 16, 16)
REG_AFFINE = oblique_grid(REG_SHAPE, (1.1, 0.9, 1.3), (0.2, -0.1, 0.3), (1.0, -2.0, 3.0))


@pytest.fixture(scope="module")
def registered(case) -> dict:
    """``voxreg register --warp reg_warp.nii.gz`` of a synthetic pair sharing an oblique grid,
    with a tiny untrained model that deforms visibly (``--normalize none``: ``--moved`` is in the
    moving image's units)."""
    folder = case["folder"]
    points = world_points(REG_SHAPE, REG_AFFINE)
    moving = pattern(points)
    fixed = pattern(points + np.array([0.8, -0.5, 0.4]).reshape(3, 1, 1, 1))
    torch.manual_seed(0)
    model = voxreg.nn.networks.VxmDense(REG_SHAPE, nb_features=[[4, 4], [4, 4, 4]], int_steps=3)
    with torch.no_grad():
        model.flow.weight.normal_(0, 0.05)
        model.flow.bias.copy_(torch.tensor([0.6, -0.4, 0.3]))
    paths = {"reg_moving": save_nifti(folder / "reg_moving.nii.gz", moving, REG_AFFINE),
             "reg_fixed": save_nifti(folder / "reg_fixed.nii.gz", fixed, REG_AFFINE),
             "reg_model": voxreg.save_model(model, folder / "reg_model.safetensors"),
             "reg_warp": folder / "reg_warp.nii.gz", "reg_moved": folder / "reg_moved.nii.gz"}
    result = run("register", paths["reg_moving"], paths["reg_fixed"], "-m", paths["reg_model"],
                 "--moved", paths["reg_moved"], "--warp", paths["reg_warp"], "--normalize", "none",
                 "--pipeline", "direct", "--device", "cpu")
    assert_ok(result)
    assert "lps-mm" in result.output
    return {"moving_data": moving, "output": result.output, **paths}


def chain_mask(case: dict) -> np.ndarray:
    """Fixed voxels whose chain [warp, affine] lands one voxel inside the moving grid."""
    disp = tf.compose_to_displacement([case["warp"], case["affine"]],
                                      (FIXED_SHAPE, FIXED_AFFINE), (MOVING_SHAPE, MOVING_AFFINE))
    mask = inside(disp + np.indices(FIXED_SHAPE), MOVING_SHAPE)
    assert mask.mean() > 0.25
    return mask


# --------------------------------------------------------------------------------------------
# ANTsPy, in its own environment
# --------------------------------------------------------------------------------------------


def ants_python() -> Path | None:
    override = os.environ.get("VOXREG_ANTS_PYTHON")
    if override:
        return Path(override) if Path(override).exists() else None
    repo = Path(__file__).resolve().parents[2]
    candidates = [repo / ".venv-ants" / "bin" / "python"]
    dot_git = repo / ".git"
    if dot_git.is_file():  # a linked git worktree: the environments live in the main checkout
        gitdir = (repo / dot_git.read_text().partition("gitdir:")[2].strip()).resolve()
        candidates.append(gitdir.parents[2] / ".venv-ants" / "bin" / "python")
    return next((c for c in candidates if c.exists()), None)


ANTS_SCRIPT = r"""
import shutil, sys
import numpy as np
try:
    import ants
except ImportError:
    sys.exit(3)
d = sys.argv[1] + "/"
fixed, moving = ants.image_read(d + "fixed.nii.gz"), ants.image_read(d + "moving.nii.gz")

def run(image, names, invert, interp="linear"):
    out = ants.apply_transforms(fixed, image, transformlist=[d + n for n in names],
                                whichtoinvert=invert, interpolator=interp)
    return out.numpy()

np.save(d + "ants_warp_only.npy",
        run(ants.image_read(d + "moving_on_fixed.nii.gz"), ["warp.nii.gz"], [False]))
np.save(d + "ants_chain.npy", run(moving, ["warp.nii.gz", "affine.mat"], [False, False]))
np.save(d + "ants_chain_inv.npy", run(moving, ["warp.nii.gz", "affine_inv.mat"], [False, True]))
labels = ants.image_read(d + "labels.nii.gz")
np.save(d + "ants_label.npy", run(labels, ["warp.nii.gz", "affine.mat"], [False, False], "genericLabel"))
np.save(d + "ants_nearest.npy",
        run(labels, ["warp.nii.gz", "affine.mat"], [False, False], "nearestNeighbor"))
tx = ants.read_transform(d + "affine.mat")
np.save(d + "ants_points.npy", np.array([tx.apply_to_point(tuple(p)) for p in np.load(d + "points_lps.npy")]))
spec = np.load(d + "ants_affine_spec.npy")
made = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                  parameters=spec[:12], fixed_parameters=spec[12:])
ants.write_transform(made, d + "ants_affine.mat")
composed = ants.apply_transforms(fixed, moving, transformlist=[d + "warp.nii.gz", d + "affine.mat"],
                                 whichtoinvert=[False, False], compose=d + "ants_")
shutil.copy(composed, d + "ants_composed.nii.gz")
reg_fixed = ants.image_read(d + "reg_fixed.nii.gz")
np.save(d + "ants_registered.npy", ants.apply_transforms(
    reg_fixed, ants.image_read(d + "reg_moving.nii.gz"), transformlist=[d + "reg_warp.nii.gz"],
    interpolator="linear").numpy())
grid = np.load(d + "field_grid.npy")
field = ants.from_numpy(np.load(d + "field_lps.npy"), origin=tuple(grid[0]), spacing=tuple(grid[1]),
                        direction=grid[2:5], has_components=True)
ants.image_write(field, d + "ants_field.nii.gz")
"""


@pytest.fixture(scope="module")
def ants_run(case, registered) -> dict:
    """Run every ANTsPy step once; the tests compare its outputs."""
    python = ants_python()
    if python is None:
        pytest.skip("no ANTsPy environment (<repo>/.venv-ants or VOXREG_ANTS_PYTHON)")
    folder = case["folder"]
    points = np.random.default_rng(1).uniform(-20, 20, size=(8, 3))
    np.save(folder / "points_lps.npy", points)
    spec = np.concatenate([(rotation(0.1, 0.2, -0.1) @ np.diag([1.1, 0.9, 1.05])).reshape(-1),
                           [1.5, -2.0, 0.7], [3.0, -1.0, 2.0]])
    np.save(folder / "ants_affine_spec.npy", spec)
    origin, spacing, direction = to_itk_grid(FIXED_AFFINE)
    np.save(folder / "field_grid.npy", np.vstack([origin, spacing, direction]))
    lps = np.einsum("ij,j...->...i", FLIP @ FIXED_AFFINE[:3, :3], case["disp"].astype(np.float64))
    np.save(folder / "field_lps.npy", lps)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    done = subprocess.run([str(python), "-c", ANTS_SCRIPT, str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode == 3:
        pytest.skip(f"{python} cannot import ants")
    assert done.returncode == 0, done.stderr[-3000:]
    out = {name: np.load(folder / f"ants_{name}.npy") for name in (
        "warp_only", "chain", "chain_inv", "label", "nearest", "points", "registered")}
    return {"points_in": points, "spec": spec, **out}


# --------------------------------------------------------------------------------------------
# lps-mm fields
# --------------------------------------------------------------------------------------------


def voxreg_warp(case: dict) -> tuple[np.ndarray, np.ndarray]:
    """transforms.warp of the image on the fixed grid by the voxel field, and the mask of voxels
    that read one voxel inside the grid."""
    disp = torch.from_numpy(case["disp"].astype(np.float64))
    moved = warp(torch.from_numpy(case["on_fixed_data"].astype(np.float64))[None, None], disp[None])
    mask = inside(case["disp"] + np.indices(FIXED_SHAPE), FIXED_SHAPE)
    return moved[0, 0].numpy(), mask


@needs_sitk
def test_lps_field_matches_simpleitk_resampling(case):
    field = sitk.ReadImage(str(case["warp"]), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    image = sitk.ReadImage(str(case["on_fixed"]), sitk.sitkFloat64)
    resampled = itk_array(sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0))
    expected, mask = voxreg_warp(case)
    assert mask.mean() > 0.3
    assert max_rel(resampled, expected, mask, np.ptp(case["on_fixed_data"])) < 1e-4


def test_lps_field_matches_ants_resampling(case, ants_run):
    expected, mask = voxreg_warp(case)
    assert max_rel(ants_run["warp_only"], expected, mask, np.ptp(case["on_fixed_data"])) < 1e-4


def test_apply_single_field_is_transforms_warp(case):
    """One field on the reference grid: apply_transforms is exactly transforms.warp."""
    moved = tf.apply_transforms(io.load_image(case["on_fixed"]), [case["warp"]], case["fixed"])
    disp, _ = tf.load_displacement(case["warp"])
    direct = warp(torch.from_numpy(case["on_fixed_data"])[None, None], torch.from_numpy(disp)[None])
    np.testing.assert_allclose(moved.data, direct[0, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(moved.affine, FIXED_AFFINE, atol=1e-6)


@needs_sitk
def test_reads_field_written_by_simpleitk(tmp_path):
    disp = smooth_disp()
    lps = np.einsum("ij,j...->...i", FLIP @ FIXED_AFFINE[:3, :3], disp.astype(np.float64))
    image = sitk.GetImageFromArray(lps.transpose(2, 1, 0, 3), isVector=True)
    origin, spacing, direction = to_itk_grid(FIXED_AFFINE)
    image.SetOrigin(origin.tolist())
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.reshape(-1).tolist())
    sitk.WriteImage(image, str(tmp_path / "sitk_field.nii.gz"))
    back, affine = tf.load_displacement(tmp_path / "sitk_field.nii.gz")  # untagged 5D: lps-mm
    assert np.abs(back - disp).max() < 1e-5
    np.testing.assert_allclose(affine, FIXED_AFFINE, atol=1e-5)


def test_reads_fields_written_by_ants(case, ants_run):
    back, affine = tf.load_displacement(case["folder"] / "ants_field.nii.gz")
    assert np.abs(back - case["disp"]).max() < 1e-5
    np.testing.assert_allclose(affine, FIXED_AFFINE, atol=1e-5)
    # the field ANTs composes from [warp, affine] is voxreg's composition of the same chain
    composed, _ = tf.load_displacement(case["folder"] / "ants_composed.nii.gz")
    ours = tf.compose_to_displacement([case["warp"], case["affine"]], case["fixed"])
    assert np.abs(composed - ours).max() < 1e-4


def earlier_io_warp(path: Path, disp: np.ndarray, affine: np.ndarray, tag: str) -> Path:
    """A field as ``io.save_warp`` of earlier voxreg versions wrote it: 5D ``(X, Y, Z, 1, 3)``
    float32, intent ``vector`` named ``voxreg:vox`` (voxels), ``voxreg:mm`` (RAS mm) or
    ``ants:lps-mm`` (LPS mm)."""
    values = disp.astype(np.float64)
    if tag != "voxreg:vox":
        values = np.einsum("ij,j...->i...", affine[:3, :3], values)
    if tag == "ants:lps-mm":
        values = np.einsum("ij,j...->i...", FLIP, values)
    image = nib.Nifti1Image(np.moveaxis(values, 0, -1)[:, :, :, None].astype(np.float32), affine)
    image.header.set_intent("vector", (), name=tag)
    image.set_sform(affine, code=2)
    image.set_qform(affine, code=2)
    image.to_filename(str(path))
    return path


def test_reads_earlier_io_save_warp_files(tmp_path):
    disp = smooth_disp()
    for tag in ("ants:lps-mm", "voxreg:mm", "voxreg:vox"):
        path = earlier_io_warp(tmp_path / f"{tag.replace(':', '_')}.nii.gz", disp, FIXED_AFFINE, tag)
        back, _ = tf.load_displacement(path)
        assert np.abs(back - disp).max() < 1e-5, tag


def test_lps_field_2d_round_trip(tmp_path):
    affine = np.eye(4)
    affine[:2, :2] = rotation(0, 0, 0.4)[:2, :2] @ np.diag([1.5, 0.8])
    disp = smooth_disp((9, 11, 3))[:2, :, :, 1]
    path = tf.save_displacement(tmp_path / "w2.nii.gz", disp, affine)
    assert nib.load(str(path)).shape == (9, 11, 1, 1, 2)
    back, _ = tf.load_displacement(path)
    assert back.shape == (2, 9, 11) and np.abs(back - disp).max() < 1e-5


# --------------------------------------------------------------------------------------------
# ras-mm and voxel fields
# --------------------------------------------------------------------------------------------


def test_ras_field_round_trip_and_hand_computed(tmp_path):
    disp = smooth_disp()
    # by hand: moving point minus fixed point, both through the affine (RAS mm)
    index = np.indices(FIXED_SHAPE).reshape(3, -1)
    ones = np.ones((1, index.shape[1]))
    fixed_points = FIXED_AFFINE @ np.vstack([index, ones])
    moving_points = FIXED_AFFINE @ np.vstack([index + disp.reshape(3, -1), ones])
    by_hand = (moving_points - fixed_points)[:3].T.reshape(*FIXED_SHAPE, 3)
    for name, convention in (("w.nii.gz", None), ("w.mgz", "ras-mm")):
        path = tf.save_displacement(tmp_path / name, disp, FIXED_AFFINE, "ras-mm")
        stored = nib.load(str(path))
        assert stored.shape == (*FIXED_SHAPE, 3)
        np.testing.assert_allclose(np.asarray(stored.dataobj), by_hand, atol=1e-5)
        back, affine = tf.load_displacement(path, convention)
        assert np.abs(back - disp).max() < 1e-5
        np.testing.assert_allclose(affine, FIXED_AFFINE, atol=1e-5)


def test_ras_tag_prevents_mirroring(tmp_path):
    disp = smooth_disp()
    path = tf.save_displacement(tmp_path / "ras.nii.gz", disp, FIXED_AFFINE, "ras-mm")
    with pytest.raises(ValueError, match="ras-mm"):
        tf.load_displacement(path, convention="lps-mm")
    # the same data without the tag, misread as LPS: x and y of the world vector flip sign
    image = nib.load(str(path))
    header = image.header.copy()
    header["intent_name"] = b""
    header["descrip"] = b""
    bare = tmp_path / "bare.nii.gz"
    nib.Nifti1Image(np.asarray(image.dataobj), image.affine, header).to_filename(str(bare))
    misread, _ = tf.load_displacement(bare, convention="lps-mm")
    world = np.einsum("ij,j...->i...", FIXED_AFFINE[:3, :3], misread.astype(np.float64))
    truth = np.einsum("ij,j...->i...", FIXED_AFFINE[:3, :3], disp.astype(np.float64))
    np.testing.assert_allclose(world, np.einsum("ij,j...->i...", FLIP, truth), atol=1e-4)
    assert np.abs(misread - disp).max() > 0.5


def test_voxel_field_is_npz_only(tmp_path):
    disp = smooth_disp()
    path = tf.save_displacement(tmp_path / "v.npz", torch.from_numpy(disp)[None], FIXED_AFFINE,
                                "voxel")
    with np.load(path) as archive:
        assert sorted(archive.keys()) == ["affine", "convention", "disp"]
    back, affine = tf.load_displacement(path)
    np.testing.assert_array_equal(back, disp)
    np.testing.assert_array_equal(affine, FIXED_AFFINE)
    for name in ("v.nii.gz", "v.mgz"):
        with pytest.raises(ValueError, match=r"\.npz"):
            tf.save_displacement(tmp_path / name, disp, FIXED_AFFINE, "voxel")
    with pytest.raises(ValueError, match="5D NIfTI"):
        tf.save_displacement(tmp_path / "w.mgz", disp, FIXED_AFFINE, "lps-mm")
    with pytest.raises(ValueError, match="voxel"):
        tf.load_displacement(path, convention="ras-mm")


# --------------------------------------------------------------------------------------------
# affines
# --------------------------------------------------------------------------------------------


def itk_points(matrix: np.ndarray, points_lps: np.ndarray) -> np.ndarray:
    """What a fixed-RAS -> moving-RAS world matrix does to LPS points."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix @ np.diag([-1.0, -1.0, 1.0, 1.0])
    return points_lps @ lps[:3, :3].T + lps[:3, 3]


@needs_sitk
def test_mat_written_by_voxreg_read_by_simpleitk(case):
    points = np.random.default_rng(2).uniform(-20, 20, size=(8, 3))
    for name, matrix in (("affine", case["matrix"]), ("affine_inv", np.linalg.inv(case["matrix"]))):
        transform = sitk.ReadTransform(str(case[name]))
        mapped = np.array([transform.TransformPoint(p.tolist()) for p in points])
        np.testing.assert_allclose(mapped, itk_points(matrix, points), atol=1e-9)


def test_mat_written_by_voxreg_read_by_ants(case, ants_run):
    expected = itk_points(case["matrix"], ants_run["points_in"])
    np.testing.assert_allclose(ants_run["points"], expected, atol=1e-4)  # ANTsPy maps in float


def expected_world(linear: np.ndarray, translation, center) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = np.asarray(translation) + center - linear @ np.asarray(center)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


@needs_sitk
def test_mat_written_by_simpleitk_read_by_voxreg(tmp_path):
    linear = rotation(0.2, -0.1, 0.3) @ np.diag([1.1, 0.95, 1.2])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(linear.reshape(-1).tolist())
    transform.SetTranslation((1.5, -2.5, 0.5))
    transform.SetCenter((4.0, 5.0, -6.0))
    sitk.WriteTransform(transform, str(tmp_path / "sitk.mat"))
    np.testing.assert_allclose(tf.load_affine(tmp_path / "sitk.mat"),
                               expected_world(linear, (1.5, -2.5, 0.5), (4.0, 5.0, -6.0)), atol=1e-12)
    # 2D: AffineTransform_double_2_2, both ways
    flat = sitk.AffineTransform(2)
    flat.SetMatrix([1.1, 0.2, -0.1, 0.9])
    flat.SetTranslation((2.0, -1.0))
    flat.SetCenter((3.0, 4.0))
    sitk.WriteTransform(flat, str(tmp_path / "sitk2d.mat"))
    world = tf.load_affine(tmp_path / "sitk2d.mat")
    assert world.shape == (3, 3)
    point = np.array([5.0, -7.0])
    expected = np.array(flat.TransformPoint((-point).tolist()))  # RAS -> LPS is -x, -y in 2D
    np.testing.assert_allclose(world[:2, :2] @ point + world[:2, 2], -expected, atol=1e-12)
    tf.save_affine(tmp_path / "voxreg2d.mat", world)
    again = sitk.ReadTransform(str(tmp_path / "voxreg2d.mat"))
    np.testing.assert_allclose(again.TransformPoint((-point).tolist()), expected, atol=1e-12)


def test_mat_written_by_ants_read_by_voxreg(case, ants_run):
    spec = ants_run["spec"]
    content = scipy.io.loadmat(str(case["folder"] / "ants_affine.mat"))
    assert {"AffineTransform_double_3_3", "fixed"} <= set(content)
    world = tf.load_affine(case["folder"] / "ants_affine.mat")
    np.testing.assert_allclose(world, expected_world(spec[:9].reshape(3, 3), spec[9:12], spec[12:]),
                               atol=1e-5)


def test_affine_formats_agree(tmp_path):
    matrix = world_matrix()
    for name in ("a.mat", "a.txt", "a.tfm"):
        tf.save_affine(tmp_path / name, matrix, center=(10.0, 0.0, -5.0))
        np.testing.assert_allclose(tf.load_affine(tmp_path / name), matrix, atol=1e-12)
    # a float .mat (AffineTransform_float_3_3) and MatrixOffsetTransformBase read the same way
    params = np.concatenate([matrix[:3, :3].reshape(-1), matrix[:3, 3]])
    params[[2, 5, 6, 7]] *= -1  # RAS -> LPS: conjugate by diag(-1, -1, 1)
    params[9:11] *= -1
    for key, dtype in (("AffineTransform_float_3_3", np.float32),
                       ("MatrixOffsetTransformBase_double_3_3", np.float64)):
        scipy.io.savemat(tmp_path / "b.mat", {key: params.astype(dtype)[:, None],
                                              "fixed": np.zeros((3, 1), dtype)}, format="4")
        world = tf.load_affine(tmp_path / "b.mat")
        np.testing.assert_allclose(world, matrix, atol=1e-5)
        if sitk is not None:  # SimpleITK reads the same map from the same file
            point = np.array([3.0, -4.0, 5.0])
            mapped = sitk.ReadTransform(str(tmp_path / "b.mat")).TransformPoint(point.tolist())
            np.testing.assert_allclose(mapped, itk_points(world, point[None])[0], atol=1e-9)


# --------------------------------------------------------------------------------------------
# chains
# --------------------------------------------------------------------------------------------


def test_chain_matches_ants(case, ants_run):
    mask = chain_mask(case)
    scale = np.ptp(case["moving_data"])
    moving = io.load_image(case["moving"])
    ours = tf.apply_transforms(moving, [case["warp"], case["affine"]], case["fixed"])
    assert max_rel(ours.data, ants_run["chain"], mask, scale) < 1e-4
    for inverted in (f"[{case['affine_inv']},1]", (case["affine_inv"], True)):
        ours_inv = tf.apply_transforms(moving, [case["warp"], inverted], case["fixed"])
        assert max_rel(ours_inv.data, ants_run["chain_inv"], mask, scale) < 1e-4
    # the other order is a different map: the order is tested, not assumed
    swapped = tf.apply_transforms(moving, [case["affine"], case["warp"]], case["fixed"])
    assert max_rel(swapped.data, ants_run["chain"], mask, scale) > 1e-2


def test_chain_labels_match_ants(case, ants_run):
    mask = chain_mask(case)
    labels = io.load_labels(case["labels"])
    for interp, theirs in (("label", ants_run["label"]), ("nearest", ants_run["nearest"])):
        ours = tf.apply_transforms(labels, [case["warp"], case["affine"]], case["fixed"], interp=interp)
        assert ours.data.dtype == labels.data.dtype
        assert set(np.unique(ours.data)) <= set(np.unique(case["labels_data"])) | {0}
        agreement = (ours.data == np.rint(theirs))[mask].mean()
        assert agreement > 0.97, (interp, agreement)


def test_register_warp_is_what_ants_applies(registered, ants_run):
    """``voxreg register --warp w.nii.gz`` writes an lps-mm field: ``antsApplyTransforms -i
    moving -r fixed -t w.nii.gz`` gives ``--moved``."""
    stored = nib.load(str(registered["reg_warp"]))
    assert stored.shape == (*REG_SHAPE, 1, 3)
    assert stored.header.get_intent()[2] == "voxreg:lps-mm"
    disp, _ = tf.load_displacement(registered["reg_warp"])
    assert np.abs(disp).max() > 0.3  # a visible deformation
    moved = io.load_image(registered["reg_moved"]).data
    mask = inside(disp + np.indices(REG_SHAPE), REG_SHAPE)
    assert mask.mean() > 0.3
    assert max_rel(ants_run["registered"], moved, mask, np.ptp(registered["moving_data"])) < 1e-4


def test_warp_command_matches_ants(case, ants_run, tmp_path):
    """``voxreg warp IMAGE -t warp -t [affine,1] -r fixed`` is ``ants.apply_transforms`` with the
    same list; a label map keeps its dtype."""
    mask = chain_mask(case)
    out = tmp_path / "moved.nii.gz"
    assert_ok(run("warp", case["moving"], "-t", case["warp"], "-t", f"[{case['affine_inv']},1]",
                  "-r", case["fixed"], "-o", out))
    moved = io.load_image(out)
    assert moved.shape == FIXED_SHAPE and moved.data.dtype == np.float32
    np.testing.assert_allclose(moved.affine, FIXED_AFFINE, atol=1e-5)
    assert max_rel(moved.data, ants_run["chain_inv"], mask, np.ptp(case["moving_data"])) < 1e-4
    labels = tmp_path / "labels.nii.gz"
    assert_ok(run("warp", case["labels"], "-t", case["warp"], "-t", case["affine"], "-r",
                  case["fixed"], "-o", labels, "--interp", "label"))
    ours = io.load_image(labels).data
    assert ours.dtype == case["labels_data"].dtype == np.int16
    assert (ours == np.rint(ants_run["label"]))[mask].mean() > 0.97


@needs_sitk
def test_chain_matches_simpleitk_composite(case):
    mask = chain_mask(case)
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(case["warp"]), sitk.sitkVectorFloat64))
    affine = sitk.ReadTransform(str(case["affine"]))
    # ANTs [warp, affine] = ITK CompositeTransform([affine, warp]) (ITK applies its last first)
    composite = sitk.CompositeTransform([affine, field])
    moving = sitk.ReadImage(str(case["moving"]), sitk.sitkFloat64)
    fixed = sitk.ReadImage(str(case["fixed"]), sitk.sitkFloat64)
    theirs = itk_array(sitk.Resample(moving, fixed, composite, sitk.sitkLinear, 0.0))
    ours = tf.apply_transforms(case["moving"], [case["warp"], case["affine"]], case["fixed"])
    assert max_rel(ours.data, theirs, mask, np.ptp(case["moving_data"])) < 1e-4


def test_chain_is_one_interpolation(case):
    mask = chain_mask(case)
    scale = np.ptp(case["moving_data"])
    chain = [case["warp"], case["affine"]]
    ours = tf.apply_transforms(case["moving"], chain, case["fixed"]).data
    # the direct formula: y -> M (A_f y + L_f d(y)), then one linear interpolation of the moving
    # samples (the field is known at the grid points, so no interpolation of the field)
    fixed_points = world_points(FIXED_SHAPE, FIXED_AFFINE)
    warped = fixed_points + np.einsum("ij,j...->i...", FIXED_AFFINE[:3, :3], case["disp"])
    matrix = case["matrix"]
    moved = np.einsum("ij,j...->i...", matrix[:3, :3], warped) + matrix[:3, 3].reshape(3, 1, 1, 1)
    back = np.linalg.inv(MOVING_AFFINE)
    voxels = np.einsum("ij,j...->i...", back[:3, :3], moved) + back[:3, 3].reshape(3, 1, 1, 1)
    direct = ndimage.map_coordinates(case["moving_data"].astype(np.float64), voxels, order=1)
    assert max_rel(ours, direct, mask, scale) < 1e-5
    # two successive resamplings (affine onto the fixed grid, then the warp) blur the detail
    first = tf.apply_transforms(case["moving"], [case["affine"]], case["fixed"])
    second = tf.apply_transforms(first, [case["warp"]], case["fixed"]).data
    assert max_rel(second, direct, mask, scale) > 1e-2


def test_chain_2d_is_one_interpolation(tmp_path):
    """2D grids use the first two world axes: field + affine, through files, against the direct
    formula."""
    def grid2d(shape, spacing, angle, shift):
        affine = np.eye(4)
        affine[:2, :2] = rotation(0, 0, angle)[:2, :2] @ np.diag(spacing)
        affine[:2, 3] = shift
        return affine

    fixed_shape, moving_shape = (15, 13), (18, 17)
    fixed_affine = grid2d(fixed_shape, (1.1, 0.9), 0.3, (-8.0, -5.0))
    moving_affine = grid2d(moving_shape, (1.0, 1.2), -0.2, (-9.0, -6.0))
    disp = smooth_disp((*fixed_shape, 3))[:2, :, :, 1]
    matrix = np.eye(3)
    matrix[:2, :2] = rotation(0, 0, 0.05)[:2, :2] * 1.02
    matrix[:2, 2] = (0.4, -0.3)
    index = np.indices(moving_shape).reshape(2, -1)
    world = moving_affine[:2, :2] @ index + moving_affine[:2, 3:]
    moving = pattern(np.vstack([world, np.zeros((1, world.shape[1]))])).reshape(moving_shape)
    warp_path = tf.save_displacement(tmp_path / "w2.nii.gz", disp, fixed_affine)
    affine_path = tf.save_affine(tmp_path / "a2.mat", matrix)
    ours = tf.apply_transforms(io.Image(moving, moving_affine), [warp_path, affine_path],
                               (fixed_shape, fixed_affine)).data
    fixed_index = np.indices(fixed_shape).reshape(2, -1).astype(np.float64)
    points = fixed_affine[:2, :2] @ (fixed_index + disp.reshape(2, -1)) + fixed_affine[:2, 3:]
    points = matrix[:2, :2] @ points + matrix[:2, 2:]
    back = np.linalg.inv(moving_affine[np.ix_([0, 1, 3], [0, 1, 3])])
    voxels = (back[:2, :2] @ points + back[:2, 2:]).reshape(2, *fixed_shape)
    direct = ndimage.map_coordinates(moving.astype(np.float64), voxels, order=1)
    mask = inside(voxels, moving_shape)
    assert mask.mean() > 0.3
    assert max_rel(ours, direct, mask, np.ptp(moving)) < 1e-5


def test_chain_points_and_composed_field(case, tmp_path):
    matrix = case["matrix"]
    points = tf.chain_points([case["affine"]], FIXED_SHAPE, FIXED_AFFINE)
    grid = world_points(FIXED_SHAPE, FIXED_AFFINE)
    expected = np.einsum("ij,j...->i...", matrix[:3, :3], grid) + matrix[:3, 3].reshape(3, 1, 1, 1)
    np.testing.assert_allclose(points, expected, atol=1e-9)
    # a field alone composes to itself; the composed chain saved as one warp applies the same
    fieldmap = tf.FieldMap(case["disp"], FIXED_AFFINE, "disp")
    alone = tf.compose_to_displacement([fieldmap], (FIXED_SHAPE, FIXED_AFFINE))
    np.testing.assert_allclose(alone, case["disp"], atol=1e-5)
    chain = tf.TransformChain([fieldmap, tf.AffineMap(matrix)])
    single = tf.save_displacement(tmp_path / "chain.nii.gz",
                                  chain.to_displacement(case["fixed"]), FIXED_AFFINE)
    mask = chain_mask(case)
    one = tf.apply_transforms(case["moving"], [single], case["fixed"]).data
    both = chain.apply(case["moving"], case["fixed"]).data
    assert max_rel(one, both, mask, np.ptp(case["moving_data"])) < 1e-4


def test_inverted_field_entry(case):
    """``[warp,1]`` is solved on the warp's grid: followed by the warp it gives the identity, and
    it is the field SimpleITK's InvertDisplacementField finds."""
    chain = tf.TransformChain([f"[{case['warp']},1]", case["warp"]])
    points = chain.points(FIXED_SHAPE, FIXED_AFFINE)
    interior = (slice(None),) + (slice(2, -2),) * 3
    assert np.abs(points - world_points(FIXED_SHAPE, FIXED_AFFINE))[interior].max() < 1e-3  # mm
    if sitk is not None:
        field = sitk.ReadImage(str(case["warp"]), sitk.sitkVectorFloat64)
        theirs = sitk.InvertDisplacementField(field, 200, 1e-6, 1e-7, False)
        sitk.WriteImage(theirs, str(case["folder"] / "sitk_inverse.nii.gz"))
        theirs, _ = tf.load_displacement(case["folder"] / "sitk_inverse.nii.gz")
        assert np.abs(chain.transforms[0].disp - theirs)[interior].max() < 1e-4  # voxels


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_untagged_fields_need_a_convention(tmp_path):
    disp = np.moveaxis(smooth_disp(), 0, -1)
    path = save_nifti(tmp_path / "untagged.nii.gz", disp, FIXED_AFFINE)
    with pytest.raises(ValueError, match=r"untagged\.nii\.gz.*convention="):
        tf.load_displacement(path)
    with pytest.raises(ValueError, match=r"untagged\.nii\.gz.*--warp-convention"):
        tf.TransformChain([path])
    back, _ = tf.load_displacement(path, convention="voxel")
    np.testing.assert_allclose(back, smooth_disp())
    mgz = tf.save_displacement(tmp_path / "w.mgz", smooth_disp(), FIXED_AFFINE, "ras-mm")
    with pytest.raises(ValueError, match=r"w\.mgz.*convention="):
        tf.load_displacement(mgz)
    npz = tmp_path / "plain.npz"
    np.savez(npz, disp=smooth_disp())
    with pytest.raises(ValueError, match=r"plain\.npz.*convention="):
        tf.load_displacement(npz)


def test_contradicting_convention_raises(tmp_path):
    path = tf.save_displacement(tmp_path / "lps.nii.gz", smooth_disp(), FIXED_AFFINE, "lps-mm")
    with pytest.raises(ValueError, match=r"lps\.nii\.gz.*'lps-mm'.*convention='ras-mm'"):
        tf.load_displacement(path, convention="ras-mm")
    with pytest.raises(ValueError, match="convention must be"):
        tf.load_displacement(path, convention="LPS")


def test_non_affine_mat_raises(tmp_path):
    path = tmp_path / "euler.mat"
    scipy.io.savemat(path, {"Euler3DTransform_double_3_3": np.zeros((6, 1)),
                            "fixed": np.zeros((3, 1))}, format="4")
    with pytest.raises(ValueError, match=r"euler\.mat.*Euler3DTransform"):
        tf.load_affine(path)
    fsl = tmp_path / "fsl.mat"
    fsl.write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    with pytest.raises(ValueError, match=r"fsl\.mat.*not an ITK/ANTs"):
        tf.load_affine(fsl)
    with pytest.raises(ValueError, match="unsupported"):
        tf.load_transform(tmp_path / "composite.h5")
    with pytest.raises(ValueError, match="parse"):
        tf.parse_entry("[affine.mat,2")
    assert tf.parse_entry("[ a.mat , 1 ]") == (Path("a.mat"), True)
    assert tf.parse_entry(("a.mat", False)) == (Path("a.mat"), False)
