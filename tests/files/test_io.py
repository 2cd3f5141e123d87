"""Reading/writing images and warps, normalisation and grid resampling."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from voxreg import io
from voxreg.data.locate import shared_data

AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -12], [0, 0, 2.0, -8], [0, 0, 0, 1]])
IXI = shared_data("ixi") or Path("shared/data/ixi")


def _volume(shape=(6, 7, 5), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mgz"])
def test_nibabel_round_trip_keeps_data_and_affine(tmp_path, ext):
    data = _volume()
    path = io.save_image(tmp_path / f"img{ext}", data, AFFINE)
    image = io.load_image(path)
    assert image.data.dtype == np.float32
    np.testing.assert_array_equal(image.data, data)
    np.testing.assert_allclose(image.affine, AFFINE)
    assert image.shape == data.shape and image.spacing == (2.0, 2.0, 2.0)
    labels = np.random.default_rng(1).integers(0, 40, (6, 7, 5)).astype(np.int64)
    io.save_image(tmp_path / f"lab{ext}", labels, AFFINE)
    back = io.load_labels(tmp_path / f"lab{ext}")
    assert np.issubdtype(back.data.dtype, np.integer)
    np.testing.assert_array_equal(back.data, labels)


def test_numpy_formats(tmp_path):
    data = _volume()
    io.save_image(tmp_path / "a.npy", data)
    np.testing.assert_array_equal(io.load_image(tmp_path / "a.npy").data, data)
    np.testing.assert_array_equal(io.load_image(tmp_path / "a.npy").affine, np.eye(4))
    seg = (data > 0.5).astype(np.uint16)
    np.savez(tmp_path / "b.npz", vol=data, seg=seg)
    np.testing.assert_array_equal(io.load_image(tmp_path / "b.npz").data, data)
    np.testing.assert_array_equal(io.load_labels(tmp_path / "b.npz").data, seg)
    np.testing.assert_array_equal(io.load_image(tmp_path / "b.npz", key="seg").data, seg)
    np.savez(tmp_path / "c.npz", other=data)
    np.testing.assert_array_equal(io.load_image(tmp_path / "c.npz").data, data)
    np.savez(tmp_path / "d.npz", x=data, y=data)
    with pytest.raises(ValueError, match="key="):
        io.load_image(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="no array 'zz'"):
        io.load_image(tmp_path / "b.npz", key="zz")


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        io.load_image(tmp_path / "missing.nii.gz")
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(ValueError, match=r"\.nii\.gz.*\.npy"):
        io.load_image(tmp_path / "x.png")
    (tmp_path / "bad.nii.gz").write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="cannot read"):
        io.load_image(tmp_path / "bad.nii.gz")
    io.save_image(tmp_path / "ok.nii.gz", _volume(), AFFINE)
    blob = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        io.load_image(tmp_path / "cut.nii.gz")
    with pytest.raises(ValueError, match="non-integer"):
        io.load_labels(tmp_path / "ok.nii.gz")


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.nii.gz"
    io.save_image(path, np.zeros((4, 4, 4), np.float32), AFFINE)
    new = _volume((8, 9, 10))
    io.save_image(path, new, AFFINE)
    np.testing.assert_array_equal(io.load_image(path).data, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    # a failing write leaves the old file and no temporary file behind
    with pytest.raises(ValueError):
        io.save_image(path, np.full((2, 2, 2), 2**40, np.int64), AFFINE)
    np.testing.assert_array_equal(io.load_image(path).data, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)


def test_header_of_input_is_reused_but_dtype_follows_data(tmp_path):
    labels = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    io.save_image(tmp_path / "l.nii.gz", labels, AFFINE)
    like = io.load_image(tmp_path / "l.nii.gz")
    io.save_image(tmp_path / "f.nii.gz", labels / 7.0, like=like)
    back = io.load_image(tmp_path / "f.nii.gz")
    assert back.data.dtype == np.float32
    np.testing.assert_allclose(back.data, labels / 7.0, rtol=1e-6)
    np.testing.assert_allclose(back.affine, AFFINE)


def test_normalize():
    data = np.array([0, 51, 255], np.uint8)
    np.testing.assert_allclose(io.normalize(data, "minmax"), data / 255.0, rtol=1e-6)
    bright = np.concatenate([np.linspace(0, 1, 1000), [1000.0]])
    out = io.normalize(bright, "percentile", (0.0, 99.0))
    assert out.dtype == np.float32 and out.max() == 1.0 and out.min() == 0.0
    assert out[500] > 0.4  # the outlier did not squash the rest
    assert io.normalize(bright, "minmax")[500] < 0.01
    np.testing.assert_array_equal(io.normalize(data, "none"), data.astype(np.float32))
    assert not io.normalize(np.full(5, 3.0)).any()
    with pytest.raises(ValueError):
        io.normalize(data, "zscore")


def test_same_grid():
    a = io.Image(np.zeros((4, 5, 6)), AFFINE)
    assert io.same_grid(a, io.Image(np.ones((4, 5, 6)), AFFINE + 1e-5))
    assert not io.same_grid(a, io.Image(np.zeros((4, 5, 7)), AFFINE))
    shifted = AFFINE.copy()
    shifted[0, 3] += 1
    assert not io.same_grid(a, io.Image(np.zeros((4, 5, 6)), shifted))


def test_resample_to_shift_and_flip_matches_scipy():
    moving_data = _volume((9, 8, 7), seed=3)
    moving_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    moving_affine[:3, 3] = (-5, 3, 1)
    # fixed grid: flipped along axis 0, shifted by 1.5 mm along y, other shape
    fixed_affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    fixed_affine[:3, 3] = (-5 + 2 * 8, 3 + 1.5, 1 - 2)
    fixed = io.Image(np.zeros((10, 6, 9), np.float32), fixed_affine)
    moved = io.resample_to(io.Image(moving_data, moving_affine), fixed)
    matrix = np.linalg.inv(moving_affine) @ fixed_affine
    expected = ndimage.affine_transform(moving_data.astype(np.float64), matrix, order=1,
                                        output_shape=(10, 6, 9), mode="constant", cval=0.0)
    assert moved.shape == (10, 6, 9)
    np.testing.assert_allclose(moved.data, expected, atol=1e-5)
    np.testing.assert_array_equal(moved.affine, fixed_affine)
    # labels: nearest, values and dtype kept
    labels = (moving_data * 5).astype(np.int16)
    moved_labels = io.resample_to(io.Image(labels, moving_affine), fixed)
    assert moved_labels.data.dtype == np.int16
    assert set(np.unique(moved_labels.data)) <= set(np.unique(labels))
    expected = ndimage.affine_transform(labels, matrix, order=0, output_shape=(10, 6, 9))
    np.testing.assert_array_equal(moved_labels.data, expected)


def test_resample_to_integer_shift_is_exact():
    data = _volume((6, 6, 6), seed=4)
    fixed_affine = np.eye(4)
    fixed_affine[0, 3] = 1.0  # fixed voxel i sits at moving voxel i + 1
    moved = io.resample_to(io.Image(data, np.eye(4)), io.Image(np.zeros((6, 6, 6)), fixed_affine))
    np.testing.assert_allclose(moved.data[:5], data[1:], atol=1e-6)
    assert not moved.data[5].any()


def test_save_displacement_lps_signs(tmp_path):
    disp = np.zeros((3, 4, 5, 6), np.float32)
    disp[0] = 1.0  # +1 voxel along i
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    path = io.save_displacement(tmp_path / "ants.nii.gz", disp, affine, convention="lps-mm")
    img = nib.load(path)
    assert img.shape == (4, 5, 6, 1, 3)
    assert img.header.get_intent()[0] == "vector"
    assert img.get_data_dtype() == np.float32
    vec = np.asarray(img.dataobj)[1, 2, 3, 0]
    np.testing.assert_allclose(vec, [-2.0, 0.0, 0.0])  # RAS +2 mm in x -> LPS -2 mm
    disp2 = np.zeros_like(disp)
    disp2[1] = 0.5
    disp2[2] = 1.0
    io.save_displacement(tmp_path / "ants2.nii.gz", disp2, affine, convention="lps-mm")
    np.testing.assert_allclose(np.asarray(nib.load(tmp_path / "ants2.nii.gz").dataobj)[0, 0, 0, 0],
                               [0.0, -1.0, 2.0])
    for name, d in (("ants.nii.gz", disp), ("ants2.nii.gz", disp2)):
        back, back_affine = io.load_displacement(tmp_path / name)
        np.testing.assert_allclose(back, d, atol=1e-6)
        np.testing.assert_allclose(back_affine, affine)


OBLIQUE = np.array([[0, 0, 2.0, 3], [-1.5, 0, 0, 2], [0, 3.0, 0, 1], [0, 0, 0, 1]])
OBLIQUE_2D = np.array([[0, 1.2, 0, 3], [-1.5, 0, 0, 2], [0, 0, 1.0, 0], [0, 0, 0, 1]])
LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("convention, name, layout", [
    ("lps-mm", "w.nii.gz", (1, 3)), ("lps-mm", "w.nii", (1, 3)), ("ras-mm", "w.nii.gz", (3,)),
    ("ras-mm", "w.mgz", (3,)), ("voxel", "w.npz", None)])
def test_displacement_round_trip_each_convention(tmp_path, convention, name, layout):
    rng = np.random.default_rng(5)
    disp = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    path = io.save_displacement(tmp_path / name, disp, OBLIQUE, convention)
    # the default for the extension: lps-mm for NIfTI, ras-mm for MGZ, voxel for .npz
    default = convention != "ras-mm" or name.endswith(".mgz")
    assert (io.resolve_convention(path) == convention) == default
    if layout is None:  # voxels, with the grid and the convention, in an .npz
        with np.load(path) as archive:
            np.testing.assert_array_equal(archive["disp"], disp)
            np.testing.assert_array_equal(archive["affine"], OBLIQUE)
            assert str(archive["convention"]) == "voxel"
    else:
        stored = nib.load(path)
        assert stored.shape == (4, 5, 6) + layout
        world = np.einsum("ij,j...->i...", OBLIQUE[:3, :3], disp.astype(np.float64))
        expected = np.einsum("ij,j...->i...", LPS, world) if convention == "lps-mm" else world
        values = np.asarray(stored.dataobj).reshape(4, 5, 6, 3)
        np.testing.assert_allclose(np.moveaxis(values, -1, 0), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stored.affine, OBLIQUE, atol=1e-6)
    given = "ras-mm" if name.endswith(".mgz") else None  # an MGZ carries no tag
    back, affine = io.load_displacement(path, given)
    np.testing.assert_allclose(back, disp, rtol=1e-5, atol=1e-5)
    assert back.dtype == np.float32
    np.testing.assert_allclose(affine, OBLIQUE, atol=1e-6)
    # 2D: (X, Y, 1, 1, 2), (X, Y, 1, 2) or an (2, X, Y) array
    disp2d = rng.normal(size=(2, 5, 6)).astype(np.float32)
    path2d = io.save_displacement(tmp_path / f"2d_{name}", disp2d, OBLIQUE_2D, convention)
    if layout is not None:
        assert nib.load(path2d).shape == (5, 6, 1) + layout[:-1] + (2,)
    np.testing.assert_allclose(io.load_displacement(path2d, given)[0], disp2d, atol=1e-5)
    with pytest.raises(ValueError, match="singular"):  # OBLIQUE's first two axes are not a grid
        io.save_displacement(tmp_path / f"bad_{name}", disp2d, OBLIQUE, convention)


def _earlier_warp(path, disp, affine, tag):
    """What ``io.save_warp`` of earlier versions wrote: 5D, intent ``vector`` named ``tag``."""
    values = disp.astype(np.float64)
    if tag != "voxreg:vox":
        values = np.einsum("ij,j...->i...", affine[:3, :3], values)
    if tag == "ants:lps-mm":
        values = np.einsum("ij,j...->i...", LPS, values)
    image = nib.Nifti1Image(np.moveaxis(values, 0, -1)[..., None, :].astype(np.float32), affine)
    image.header.set_intent("vector", (), name=tag)
    image.to_filename(str(path))
    return path


def test_reads_warps_of_earlier_versions(tmp_path):
    disp = np.random.default_rng(7).normal(size=(3, 4, 5, 6)).astype(np.float32)
    for tag in ("voxreg:vox", "voxreg:mm", "ants:lps-mm"):
        path = _earlier_warp(tmp_path / f"{tag[-3:]}.nii.gz", disp, OBLIQUE, tag)
        np.testing.assert_allclose(io.load_displacement(path)[0], disp, atol=1e-5, err_msg=tag)
    # their .npz held only 'disp' (voxels, no grid): read with convention='voxel'
    np.savez(tmp_path / "old.npz", disp=disp)
    with pytest.raises(ValueError, match=r"old\.npz.*--warp-convention"):
        io.load_displacement(tmp_path / "old.npz")
    np.testing.assert_array_equal(io.load_displacement(tmp_path / "old.npz", "voxel")[0], disp)
    # the earlier names are the same functions, the earlier conventions say what they became
    assert io.save_warp is io.save_displacement and io.load_warp is io.load_displacement
    with pytest.raises(ValueError, match="lps-mm"):
        io.save_warp(tmp_path / "w.nii.gz", disp, OBLIQUE, convention="ants")


def test_check_output_path(tmp_path):
    src = tmp_path / "in.nii.gz"
    io.save_image(src, _volume(), AFFINE)
    with pytest.raises(ValueError, match="never overwrites"):
        io.check_output_path(tmp_path / "." / "in.nii.gz", (str(src),))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.check_output_path(tmp_path / "nope" / "out.nii.gz")
    with pytest.raises(NotADirectoryError):
        io.check_output_path(src / "out.nii.gz")
    assert io.check_output_path(tmp_path / "out.nii.gz", (str(src),)) == tmp_path / "out.nii.gz"


@pytest.mark.skipif(not (IXI / "splits.json").exists(), reason="IXI data not available")
def test_real_ixi_image_and_labels():
    subject = json.loads((IXI / "splits.json").read_text())["train"][0]
    image = io.load_image(IXI / "images" / f"{subject}.nii.gz", normalize="minmax")
    labels = io.load_labels(IXI / "labels" / f"{subject}.nii.gz")
    expected = np.array([[2, 0, 0, -94], [0, 2, 0, -128], [0, 0, 2, -90], [0, 0, 0, 1]], float)
    assert image.shape == labels.shape == (96, 112, 96)
    np.testing.assert_allclose(image.affine, expected)
    assert io.same_grid(image, labels)
    assert image.data.dtype == np.float32 and 0.0 <= image.data.min() and image.data.max() == 1.0
    assert labels.data.dtype == np.uint8 and len(np.unique(labels.data)) > 100
    assert io.read_grid(IXI / "images" / f"{subject}.nii.gz")[0] == (96, 112, 96)


def test_numpy_warp_round_trip_2d_and_3d(tmp_path):
    rng = np.random.default_rng(6)
    for shape in ((3, 4, 5, 6), (2, 5, 7)):
        disp = rng.normal(size=shape).astype(np.float32)
        path = io.save_displacement(tmp_path / f"w{len(shape)}.npz", disp, np.eye(4))
        back, affine = io.load_displacement(path)
        np.testing.assert_array_equal(back, disp)
        np.testing.assert_array_equal(affine, np.eye(4))
        # a field in voxels is never written where another tool would take it for mm
        for name in (f"w{len(shape)}.npy", f"w{len(shape)}.nii.gz", f"w{len(shape)}.mgz"):
            with pytest.raises(ValueError, match=r"\.npz"):
                io.save_displacement(tmp_path / name, disp, np.eye(4), "voxel")
        np.save(tmp_path / f"w{len(shape)}.npy", disp)  # a bare array: its convention is asked
        with pytest.raises(ValueError, match="convention"):
            io.load_displacement(tmp_path / f"w{len(shape)}.npy")
        back, _ = io.load_displacement(tmp_path / f"w{len(shape)}.npy", "voxel")
        np.testing.assert_array_equal(back, disp)
