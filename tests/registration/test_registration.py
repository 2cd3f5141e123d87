"""register(): numpy/torch, any leading axes, odd sizes, timing, clear errors; inverse and
bidirectional outputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from fields import smooth_random_field as _smooth_field

from voxreg import transforms
from voxreg.nn.networks import VxmDense
from voxreg.registration import InverseApproximationWarning, RegistrationResult, register


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


# --------------------------------------------------------------------------------------------
# inverse and bidirectional outputs
# --------------------------------------------------------------------------------------------



class FieldModel(torch.nn.Module):
    """A stand-in registration model with a known field and VxmDense's interface: a plain
    displacement (``int_steps=0``) or a velocity on a grid ``int_downsize`` times coarser."""

    def __init__(self, field, int_steps=0, int_downsize=1, bidir=False):
        super().__init__()
        self.inshape = tuple(field.shape[2:])
        self.int_steps, self.int_downsize, self.bidir = int_steps, int_downsize, bidir
        coarse = field if int_steps == 0 or int_downsize == 1 else \
            transforms.resize_disp(field, factor=1 / int_downsize)
        self.field = torch.nn.Parameter(coarse.clone())

    def _disp(self, velocity):
        if self.int_steps == 0:
            return velocity
        return transforms.resize_disp(transforms.integrate_velocity(velocity, self.int_steps),
                                      shape=self.inshape)

    def forward(self, moving, fixed, registration=False, return_velocity=False):
        velocity = self.field.expand(moving.shape[0], *self.field.shape[1:])
        disp = self._disp(velocity)
        out = (transforms.warp(moving, disp), disp)
        if self.bidir and not registration:
            out = (out[0], transforms.warp(fixed, self._disp(-velocity)), disp)
        return (*out, velocity) if return_velocity else out


def _mean_norm(field):
    return float(field.norm(dim=1).mean())


@pytest.mark.parametrize("shape", [(32, 32), (20, 24, 16)])
def test_diffeomorphic_inverse_composes_to_identity(shape):
    field = _smooth_field(shape, 3.0, seed=1)
    model = FieldModel(field, int_steps=7, int_downsize=2)
    moving, fixed = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact inverse: no approximation warning
        result = register(model, moving, fixed, inverse=True, moved_fixed=True)
    assert result.inverse_exact is True
    disp = torch.from_numpy(result.disp)[None]
    inverse = torch.from_numpy(result.inverse_disp)[None]
    assert disp.abs().max() > 1.5  # a real deformation (2 to 3 voxels at most)
    # both ways round: disp o inverse and inverse o disp are close to identity
    right = _mean_norm(transforms.compose(disp, inverse))
    left = _mean_norm(transforms.compose(inverse, disp))
    # measured: 2D 0.017 / 0.019, 3D 0.037 / 0.035 voxels (integration at half resolution);
    # the naive inverse -disp: 0.19 and 0.13
    print(f"inverse residual {shape}: right {right:.4f}, left {left:.4f} voxels")
    assert right < 0.05 and left < 0.05, (right, left)
    assert result.inverse_residual == pytest.approx(right, rel=1e-4)
    # the naive inverse -disp is clearly worse: exp(-v) is not a negation of the displacement
    naive = _mean_norm(transforms.compose(disp, -disp))
    print(f"  naive -disp residual {naive:.4f} voxels")
    assert naive > 2 * right
    # an independent inverse: the fixed-point solution of disp o u = id agrees inside the grid
    reference = transforms.invert(disp, iterations=300, tolerance=1e-6)
    inner = (slice(None), slice(None)) + (slice(3, -3),) * len(shape)
    assert (reference - inverse)[inner].abs().mean() < 0.05


def test_vxmdense_constant_velocity_inverse_is_exact():
    """A constant velocity is an exact translation, so the inverse is its exact negation."""
    net = VxmDense((16, 20), nb_features=[[4, 4], [4, 4, 4]], int_steps=5, int_downsize=2)
    with torch.no_grad():
        net.flow.weight.zero_()
        net.flow.bias.copy_(torch.tensor([0.75, -1.25]))
    moving, fixed = _images((16, 20))
    result = register(net, moving, fixed, inverse=True, moved_fixed=True)
    np.testing.assert_allclose(result.disp, np.array([0.75, -1.25])[:, None, None] * np.ones((16, 20)),
                               atol=1e-5)
    np.testing.assert_allclose(result.inverse_disp, -result.disp, atol=1e-5)
    assert result.inverse_residual < 1e-4


def test_bidirectional_model_second_output_is_moved_fixed():
    torch.manual_seed(3)
    plain = VxmDense((24, 24), nb_features=[[4, 4], [4, 4, 4]], int_steps=5, int_downsize=2)
    with torch.no_grad():
        plain.flow.weight.normal_(0, 1.0)  # about a voxel of deformation
    bidir = VxmDense((24, 24), nb_features=[[4, 4], [4, 4, 4]], int_steps=5, int_downsize=2,
                     bidir=True)
    bidir.load_state_dict(plain.state_dict())
    moving, fixed = _images((24, 24), batch=2)
    moving, fixed = torch.from_numpy(moving[:, None]), torch.from_numpy(fixed[:, None])
    result = register(bidir, moving, fixed, inverse=True, moved_fixed=True)
    with torch.no_grad():
        moved, moved_fixed, disp = bidir(moving, fixed)
    assert disp.abs().max() > 0.3
    np.testing.assert_allclose(result.moved_fixed.numpy(), moved_fixed.numpy(), atol=1e-5)
    np.testing.assert_allclose(result.disp.numpy(), disp.numpy(), atol=1e-5)
    # and the plain model gives the same inverse outputs
    again = register(plain, moving, fixed, inverse=True, moved_fixed=True)
    np.testing.assert_allclose(again.inverse_disp.numpy(), result.inverse_disp.numpy(), atol=1e-6)


def test_moved_fixed_is_fixed_warped_by_inverse_and_layouts():
    field = _smooth_field((16, 16), 1.5, seed=2)
    model = FieldModel(field, int_steps=5, int_downsize=1)
    moving, fixed = _images()
    result = register(model, moving, fixed, moved_fixed=True)
    assert result.inverse_disp is None and result.moved_fixed.shape == (16, 16)
    full = register(model, moving, fixed, inverse=True, moved_fixed=True)
    expected = transforms.warp(torch.from_numpy(fixed)[None, None],
                               torch.from_numpy(full.inverse_disp)[None])[0, 0].numpy()
    np.testing.assert_allclose(full.moved_fixed, expected, atol=1e-6)
    np.testing.assert_allclose(result.moved_fixed, expected, atol=1e-6)
    assert full.inverse_disp.shape == (2, 16, 16) and full.inverse_disp.dtype == np.float32
    # layouts follow each input: fixed (C, H, W) -> moved_fixed (C, H, W); a batch of fixed images
    batch_fixed = np.stack([fixed, moving])[:, None]
    out = register(model, moving, batch_fixed, inverse=True, moved_fixed=True)
    assert out.moved_fixed.shape == (2, 1, 16, 16) and out.inverse_disp.shape == (2, 2, 16, 16)
    out = register(model, torch.from_numpy(moving)[None], torch.from_numpy(fixed)[None],
                   moved_fixed=True)
    assert isinstance(out.moved_fixed, torch.Tensor) and out.moved_fixed.shape == (1, 16, 16)
    # backward compatible: still unpacks into three values
    moved, disp, seconds = full
    assert moved.shape == (16, 16) and seconds > 0


def test_plain_model_inverse_is_fixed_point_with_warning():
    field = _smooth_field((24, 24), 2.0, seed=4)
    model = FieldModel(field)  # int_steps=0: a displacement
    moving, fixed = _images((24, 24))
    with pytest.warns(InverseApproximationWarning, match="fixed-point.*residual"):
        result = register(model, moving, fixed, inverse=True)
    assert result.inverse_exact is False
    disp = torch.from_numpy(result.disp)[None]
    inverse = torch.from_numpy(result.inverse_disp)[None]
    np.testing.assert_allclose(result.disp, field[0].numpy(), atol=1e-6)
    right = _mean_norm(transforms.compose(disp, inverse))
    assert right < 1e-3 and result.inverse_residual == pytest.approx(right, rel=1e-3, abs=1e-7)
    assert _mean_norm(transforms.compose(inverse, disp)) < 0.05
    # a constant displacement: the inverse is its exact negation
    shift = torch.ones(1, 2, 16, 16) * torch.tensor([1.5, -0.5]).view(1, 2, 1, 1)
    with pytest.warns(InverseApproximationWarning):
        const = register(FieldModel(shift), *_images(), inverse=True)
    np.testing.assert_allclose(const.inverse_disp, -shift[0].numpy(), atol=1e-5)


def test_inverse_options_are_checked(model):
    moving, fixed = _images()
    with pytest.raises(ValueError, match="inverse_iterations"):
        register(model, moving, fixed, inverse=True, inverse_iterations=0)
    with pytest.raises(ValueError, match="inverse_tolerance"):
        register(model, moving, fixed, inverse=True, inverse_tolerance=-1.0)
