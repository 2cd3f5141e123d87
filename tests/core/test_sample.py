"""transforms.sample (cross-grid pull-back sampling) against scipy.ndimage.map_coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from voxreg import transforms as T


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("interp,order", [("linear", 1), ("nearest", 0)])
def test_sample_matches_scipy_on_another_grid(ndim, interp, order):
    rng = np.random.default_rng(ndim)
    in_shape = (9, 11, 7)[:ndim]
    out_shape = (5, 6, 4)[:ndim]
    image = rng.random(in_shape)
    # coordinates spread over the image and a little past its edges
    coords = np.stack([rng.uniform(-1.5, s + 0.5, out_shape) for s in in_shape])
    if order == 0:  # avoid ties exactly half-way between voxel centres
        coords = np.round(coords * 4) / 4 + 0.01
    expected = ndi.map_coordinates(image, coords, order=order, mode="constant", cval=0.0)
    inside = np.all([(c >= 0) & (c <= s - 1) for c, s in zip(coords, in_shape)], axis=0)
    far = np.any([(c < -1) | (c > s) for c, s in zip(coords, in_shape)], axis=0)
    got = T.sample(torch.from_numpy(image)[None, None], torch.from_numpy(coords)[None], interp)
    got = got[0, 0].numpy()
    np.testing.assert_allclose(got[inside], expected[inside], atol=1e-12)
    assert far.any() and np.all(got[far] == 0)  # a whole voxel past the edge reads the fill


def test_sample_equals_warp_on_the_same_grid():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 2, 8, 9, 7)))
    disp = torch.from_numpy(rng.normal(0, 1.5, (1, 3, 8, 9, 7)))
    coords = T.identity_grid((8, 9, 7), dtype=disp.dtype)[None] + disp
    for interp in ("linear", "nearest"):
        torch.testing.assert_close(T.sample(image, coords, interp), T.warp(image, disp, interp))
    labels = torch.from_numpy(rng.integers(0, 5, (1, 1, 8, 9, 7)))
    out = T.sample(labels, coords, "label")
    assert out.dtype == labels.dtype
    torch.testing.assert_close(out, T.warp(labels, disp, "label"))


def test_sample_errors_name_the_argument():
    with pytest.raises(ValueError, match="coords must be"):
        T.sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="coords"):
        T.sample(torch.zeros(1, 1, 4, 4), torch.full((1, 2, 2, 2), float("nan")))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int16, np.int32])
def test_label_interpolation_keeps_any_integer_dtype(dtype):
    """FreeSurfer aseg maps come as uint16: every integer dtype is carried, values exact."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 60, (1, 1, 6, 7, 5)).astype(dtype)
    coords = T.identity_grid((6, 7, 5), dtype=torch.float64)[None] + 0.3
    out = T.sample(torch.from_numpy(labels), coords, "label")
    reference = T.sample(torch.from_numpy(labels.astype(np.int64)), coords, "label")
    assert out.numpy().dtype == dtype
    np.testing.assert_array_equal(out.numpy().astype(np.int64), reference.numpy())
