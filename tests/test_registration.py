"""register(): numpy/torch, any leading axes, odd sizes, timing, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxreg.networks import VxmDense
from voxreg.registration import RegistrationResult, register


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = VxmDense((16, 16), nb_features=[[4, 4], [4, 4, 4]], int_steps=3)
    with torch.no_grad():
        net.flow.weight.normal_(0, 0.05)  # a visible, non-zero deformation
    return net.eval()


def _images(shape=(16, 16), batch=None, seed=0):
    rng = np.random.default_rng(seed)
    size = shape if batch is None else (batch, *shape)
    return rng.random(size, dtype=np.float32), rng.random(size, dtype=np.float32)


def _direct(model, moving, fixed):
    with torch.no_grad():
        return model(torch.as_tensor(moving), torch.as_tensor(fixed))


def test_numpy_without_batch_or_channel(model):
    moving, fixed = _images()
    moved, disp = register(model, moving, fixed)
    assert isinstance(moved, np.ndarray) and moved.shape == (16, 16) and moved.dtype == np.float32
    assert isinstance(disp, np.ndarray) and disp.shape == (2, 16, 16)
    ref_moved, ref_disp = _direct(model, moving[None, None], fixed[None, None])
    np.testing.assert_allclose(moved, ref_moved[0, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(disp, ref_disp[0].numpy(), atol=1e-6)
    assert np.abs(disp).max() > 1e-3


def test_leading_axes_and_torch(model):
    moving, fixed = _images(batch=3)
    moved_c, disp_c = register(model, moving[0][None], fixed[0][None])  # (C, H, W)
    assert moved_c.shape == (1, 16, 16) and disp_c.shape == (2, 16, 16)
    moved_b, disp_b = register(model, torch.from_numpy(moving[:, None]),
                               torch.from_numpy(fixed[:, None]))  # (B, C, H, W)
    assert isinstance(moved_b, torch.Tensor) and moved_b.shape == (3, 1, 16, 16)
    assert disp_b.shape == (3, 2, 16, 16) and not moved_b.requires_grad
    np.testing.assert_allclose(moved_b[0].numpy(), moved_c, atol=1e-6)
    np.testing.assert_allclose(disp_b[0].numpy(), disp_c, atol=1e-6)
    # a single moving image against a batch of fixed images
    moved_bc, disp_bc = register(model, moving[0], fixed[:, None])
    assert moved_bc.shape == (3, 1, 16, 16) and disp_bc.shape == (3, 2, 16, 16)
    np.testing.assert_allclose(disp_bc[0], disp_c, atol=1e-6)


def test_odd_size_comes_back_at_its_size(model):
    moving, fixed = _images((29, 31))
    moved, disp = register(model, moving, fixed)
    assert moved.shape == (29, 31) and disp.shape == (2, 29, 31)
    assert np.isfinite(disp).all()
    tmoved, tdisp = register(model, torch.from_numpy(moving)[None, None].double(),
                             torch.from_numpy(fixed)[None, None].double())
    assert tmoved.shape == (1, 1, 29, 31) and tdisp.shape == (1, 2, 29, 31)


def test_timing_result_and_mode_restored(model):
    moving, fixed = _images(batch=2)
    model.train()
    try:
        result = register(model, moving[:, None], fixed[:, None], return_time=True)
        assert model.training
    finally:
        model.eval()
    assert isinstance(result, RegistrationResult)
    moved, disp, seconds = result
    assert moved.shape == (2, 1, 16, 16) and seconds > 0 and result.seconds_per_pair == seconds


def test_integer_inputs_are_converted(model):
    moving, fixed = _images()
    moved, disp = register(model, (moving * 255).astype(np.uint8), (fixed * 255).astype(np.uint8))
    assert moved.dtype == np.float32 and disp.shape == (2, 16, 16)


def test_bad_inputs_raise_value_errors(model):
    moving, fixed = _images()
    with pytest.raises(ValueError, match="spatial shape"):
        register(model, moving, fixed[:15])
    with pytest.raises(ValueError, match="moving.*channel"):
        register(model, np.stack([moving, moving]), fixed[None])
    with pytest.raises(ValueError, match="moving"):
        register(model, moving[None, None, None], fixed)
    bad = fixed.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="fixed contains NaN"):
        register(model, moving, bad)
    with pytest.raises(ValueError, match="batch"):
        b2, _ = _images(batch=2)
        b3, _ = _images(batch=3)
        register(model, b2[:, None], b3[:, None])
    with pytest.raises(ValueError, match="fixed must not be empty"):
        register(model, moving, np.zeros((1, 0, 16)))
    with pytest.raises(TypeError, match="moving"):
        register(model, "image.png", fixed)
    with pytest.raises(ValueError, match="inshape"):
        register(torch.nn.Identity(), moving, fixed)
