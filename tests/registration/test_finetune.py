"""Instance-specific optimisation (registration.finetune) and the register CLI's --finetune,
--inverse-warp and --moved-fixed options, on tiny 2D/3D problems with known deformations."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_helpers import assert_ok, assert_user_error, run
from fields import smooth_random_field as _smooth_field

import voxreg
from voxreg import io, losses, transforms
from voxreg.nn.networks import VxmDense
from voxreg.registration import (
    DEFAULT_FINETUNE_STEPS,
    FinetuneResult,
    finetune,
    loss_settings,
    register,
)
from voxreg.registration.finetuning import Adam, converged

FEATURES = [[4, 4], [4, 4, 4]]

pytestmark = pytest.mark.usefixtures("one_thread")



def _pair(shape, amplitude=2.0, seed=0):
    """A textured blob ``fixed`` and ``moving = fixed`` warped by a smooth field, ``(*shape)``."""
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    radius = torch.sqrt(sum(g**2 for g in grids))
    texture = _smooth_field(shape, 0.3, seed=seed + 10, coarse=6)[0, 0]
    fixed = (torch.clamp(1.2 - 1.5 * radius, 0, 1) + texture).clamp(0, 1)
    moving = transforms.warp(fixed[None, None], _smooth_field(shape, amplitude, seed=seed))[0, 0]
    return moving.numpy(), fixed.numpy()


def _model(shape, **kwargs):
    torch.manual_seed(0)
    return VxmDense(shape, nb_features=FEATURES, **kwargs).eval()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _mse(a, b):
    return float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))


# --------------------------------------------------------------------------------------------
# library
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_field_finetune_lowers_loss_and_keeps_model(shape):
    moving, fixed = _pair(shape)
    model = _model(shape, int_steps=0)
    before = _state(model)
    result = finetune(model, moving, fixed, steps=60, tol=None, progress=False, lambda_=0.01)
    _assert_unchanged(model, before)
    assert not model.training
    assert isinstance(result, FinetuneResult) and result.optimized == "field"
    assert result.steps == 60 and not result.stopped_early and len(result.loss_history) == 61
    # the untrained network predicts almost nothing; 60 steps recover much of the deformation
    predicted, _ = register(model, moving, fixed)
    assert result.initial_loss == pytest.approx(_mse(fixed, predicted), rel=1e-3)
    assert result.final_loss < 0.5 * result.initial_loss, result.loss_history[::10]
    assert result.final_loss == min(result.loss_history)
    assert _mse(fixed, result.moved) < 0.5 * _mse(fixed, predicted)
    # the returned pair is consistent: moved is moving warped by disp
    moved, disp, seconds = result
    warped = transforms.warp(torch.from_numpy(moving)[None, None], torch.from_numpy(disp)[None])
    np.testing.assert_allclose(moved, warped[0, 0].numpy(), atol=1e-5)
    assert disp.shape == (len(shape), *shape) and seconds > 0


def test_velocity_finetune_stays_diffeomorphic_with_exact_inverse():
    shape = (32, 32)
    moving, fixed = _pair(shape, amplitude=2.5, seed=1)
    model = _model(shape, int_steps=5, int_downsize=2)
    before = _state(model)
    result = finetune(model, moving, fixed, steps=80, tol=None, progress=False,
                      inverse=True, moved_fixed=True)
    _assert_unchanged(model, before)
    assert result.final_loss < 0.6 * result.initial_loss
    disp = torch.from_numpy(result.disp)[None]
    inverse = torch.from_numpy(result.inverse_disp)[None]
    assert disp.abs().max() > 0.5
    assert float(transforms.folding_fraction(disp)) == 0.0
    assert result.inverse_exact and result.inverse_residual < 0.05
    assert float(transforms.compose(inverse, disp).norm(dim=1).mean()) < 0.05
    expected = transforms.warp(torch.from_numpy(fixed)[None, None], inverse)[0, 0].numpy()
    np.testing.assert_allclose(result.moved_fixed, expected, atol=1e-5)


def test_weights_finetune_works_on_a_copy():
    shape = (32, 32)
    moving, fixed = _pair(shape, seed=2)
    model = _model(shape, int_steps=0)
    before = _state(model)
    result = finetune(model, moving, fixed, steps=25, optimize="weights", lr=1e-3, tol=None,
                      progress=False)
    _assert_unchanged(model, before)
    assert result.optimized == "weights" and result.steps == 25
    assert result.final_loss < 0.8 * result.initial_loss, result.loss_history[::5]


def test_initial_loss_is_the_training_loss():
    """loss_history[0] equals VoxelMorph's training loss of the prediction, computed directly."""
    shape = (24, 24)
    moving, fixed = _pair(shape, seed=3)
    m, f = torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None]
    for bidir in (False, True):
        model = _model(shape, int_steps=4, int_downsize=2, bidir=bidir)
        with torch.no_grad():
            model.flow.weight.normal_(0, 0.5)
            out = model(m, f, return_velocity=True)
        velocity = out[-1]
        if bidir:
            image = 0.5 * losses.mse(f, out[0]) + 0.5 * losses.mse(m, out[1])
        else:
            image = losses.mse(f, out[0])
        expected = image + 0.05 * losses.grad(velocity, "l2", loss_mult=2)
        result = finetune(model, moving, fixed, steps=0, lambda_=0.05, progress=False)
        assert result.loss_history == pytest.approx([float(expected)], rel=1e-5)
        assert result.steps == 0 and result.initial_loss == result.final_loss
        moved, disp = register(model, moving, fixed)
        np.testing.assert_allclose(result.disp, disp, atol=1e-5)
        np.testing.assert_allclose(result.moved, moved, atol=1e-5)


def test_early_stop_on_a_converged_pair():
    shape = (24, 24)
    model = _model(shape, int_steps=0)
    with torch.no_grad():
        model.flow.weight.zero_()  # the identity: already optimal for identical images
    image = _pair(shape)[1]
    result = finetune(model, image, image, steps=200, window=10, tol=1e-3, progress=False)
    assert result.stopped_early and result.steps == 10
    # Adam's steps do not shrink with the gradient, so the loss wanders up from about 0; the
    # best field seen (the prediction) is the one returned
    assert result.initial_loss < 1e-12 and result.final_loss == result.initial_loss
    np.testing.assert_allclose(result.disp, 0.0, atol=1e-6)
    # a real pair: the loss plateaus and the loop stops well before its step budget
    moving, fixed = _pair(shape, seed=4)
    result = finetune(model, moving, fixed, steps=1000, window=10, tol=1e-3, progress=False)
    assert result.stopped_early and 20 < result.steps < 400, result.steps
    assert result.final_loss < 0.5 * result.initial_loss
    # tol=None never stops early
    assert finetune(model, image, image, steps=15, tol=None, progress=False).steps == 15


def test_converged_rule():
    falling = [0.5**k for k in range(40)]
    assert not any(converged(falling[:n], 10, 1e-3) for n in range(1, 41))
    flat = [1.0] * 10 + [0.9995] * 10
    assert converged(flat, 10, 1e-3) and not converged(flat, 10, 1e-4)
    negative = [-0.5] * 11  # NCC/MI losses are negative
    assert converged(negative, 10, 1e-3)
    assert not converged([-0.5] * 10 + [-0.6], 10, 1e-3)
    assert not converged(flat, 10, None)


@pytest.mark.parametrize("image_loss", ["ncc", "mi"])
def test_other_image_losses(image_loss):
    shape = (24, 24)
    moving, fixed = _pair(shape, seed=5)
    model = _model(shape, int_steps=0)
    result = finetune(model, moving, fixed, steps=30, image_loss=image_loss, tol=None,
                      progress=False)
    assert result.image_loss == image_loss
    assert result.final_loss < result.initial_loss - 0.01, result.loss_history[::5]


def test_progress_bar_and_batches(capsys):
    shape = (16, 16)
    moving, fixed = _pair(shape, seed=6)
    model = _model(shape, int_steps=0)
    result = finetune(model, np.stack([moving, fixed])[:, None], np.stack([fixed, moving])[:, None],
                      steps=5, tol=None, progress=True)
    assert result.moved.shape == (2, 1, 16, 16) and result.disp.shape == (2, 2, 16, 16)
    assert "finetune" in capsys.readouterr().err
    tensor_result = finetune(model, torch.from_numpy(moving), torch.from_numpy(fixed), steps=2,
                             progress=False)
    assert isinstance(tensor_result.moved, torch.Tensor) and not tensor_result.moved.requires_grad


def test_loss_settings_from_metadata():
    model = _model((16, 16))
    assert loss_settings(model) == ("mse", 0.01)
    model.metadata = {"image_loss": "ncc", "lambda": 0.5}  # voxreg train
    assert loss_settings(model) == ("ncc", 0.5)
    model.metadata = {"losses": ["mse", "grad l2"], "lambda": 0.02}  # brain3d
    assert loss_settings(model) == ("mse", 0.02)
    model.metadata = {"training_summary": {"losses": ["mse", "grad l2"], "loss_weights": [1.0, 0.0]}}
    assert loss_settings(model) == ("mse", 0.0)  # brain2d-nosmooth
    model.metadata = {"training": {"losses": ["MutualInformation", "Grad"], "loss_weights": [1, 0.3]}}
    assert loss_settings(model) == ("mi", 0.3)  # the trainer's own record
    shipped = voxreg.load_model("brain2d-smooth")
    assert loss_settings(shipped) == ("mse", 0.01)


def test_bad_arguments():
    shape = (16, 16)
    moving, fixed = _pair(shape)
    model = _model(shape)
    for kwargs, match in [({"steps": -1}, "steps"), ({"steps": 2.5}, "steps"),
                          ({"lr": 0.0}, "lr"), ({"lambda_": -1.0}, "lambda_"),
                          ({"tol": -0.1}, "tol"), ({"window": 0}, "window"),
                          ({"optimize": "network"}, "optimize"),
                          ({"image_loss": "l2"}, "image_loss")]:
        with pytest.raises(ValueError, match=match):
            finetune(model, moving, fixed, progress=False, **kwargs)
    with pytest.raises(ValueError, match="spatial shape"):
        finetune(model, moving, fixed[:8], progress=False)
    with pytest.raises(TypeError, match="model"):
        finetune("model", moving, fixed)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

SHAPE = (16, 16, 16)
AFFINE = np.array([[2.0, 0, 0, -16], [0, 2.0, 0, -16], [0, 0, 2.0, -16], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_cli")
    moving, fixed = _pair(SHAPE, amplitude=1.5, seed=7)
    out = {
        "moving": io.save_image(root / "moving.nii.gz", (moving * 255).astype(np.uint8), AFFINE),
        "fixed": io.save_image(root / "fixed.nii.gz", (fixed * 255).astype(np.uint8), AFFINE),
        "root": root,
    }
    diff = _model(SHAPE, int_steps=4, int_downsize=2)
    with torch.no_grad():  # a visible deformation from an untrained model
        diff.flow.weight.normal_(0, 0.1)
        diff.flow.bias.copy_(torch.tensor([0.6, -0.4, 0.3]))
    out["diff"] = voxreg.save_model(diff, root / "diff.safetensors", metadata={"normalize": "minmax"})
    plain = _model(SHAPE, int_steps=0)
    with torch.no_grad():
        plain.flow.weight.normal_(0, 0.02)
    out["plain"] = voxreg.save_model(plain, root / "plain.safetensors",
                                     metadata={"normalize": "minmax", "image_loss": "mse"})
    return out





def test_cli_inverse_warp_and_moved_fixed(files, tmp_path):
    paths = {k: tmp_path / f"{k}.nii.gz" for k in ("moved", "warp", "inverse", "moved_fixed")}
    result = run("register", files["moving"], files["fixed"], "-m", files["diff"], "--moved",
                 paths["moved"], "--warp", paths["warp"], "--inverse-warp", paths["inverse"],
                 "--moved-fixed", paths["moved_fixed"])
    assert_ok(result)
    assert "inverse warp" in result.output and "exact" in result.output
    assert "warning" not in result.stderr
    disp, affine = io.load_warp(paths["warp"])
    inverse, inverse_affine = io.load_warp(paths["inverse"])
    np.testing.assert_allclose(inverse_affine, AFFINE)
    assert np.abs(disp).max() > 0.3
    residual = transforms.compose(torch.from_numpy(disp)[None], torch.from_numpy(inverse)[None])
    assert float(residual.norm(dim=1).mean()) < 0.05
    # --moved-fixed is the fixed image (normalised as register does) warped by the inverse warp
    again = tmp_path / "again.nii.gz"
    assert_ok(run("warp", files["fixed"], "--warp", paths["inverse"], "--out", again,
                  "--normalize", "minmax"))
    np.testing.assert_allclose(io.load_image(paths["moved_fixed"]).data,
                               io.load_image(again).data, atol=1e-4)
    np.testing.assert_allclose(nib.load(paths["moved_fixed"]).affine, AFFINE)
    # the inverse warp follows --warp-convention (and the deprecated --warp-units/--warp-format:
    # --warp-units mm is ras-mm, a 4D NIfTI)
    mm, ants = tmp_path / "inv_mm.nii.gz", tmp_path / "inv_ants.nii.gz"
    assert_ok(run("register", files["moving"], files["fixed"], "-m", files["diff"], "--moved",
                  tmp_path / "m2.nii.gz", "--inverse-warp", mm, "--warp-units", "mm"))
    np.testing.assert_allclose(np.asarray(nib.load(mm).dataobj),
                               2 * np.moveaxis(inverse, 0, -1), atol=1e-4)
    ras = tmp_path / "inv_ras.nii.gz"
    assert_ok(run("register", files["moving"], files["fixed"], "-m", files["diff"], "--moved",
                  tmp_path / "m4.nii.gz", "--inverse-warp", ras, "--warp-convention", "ras-mm"))
    np.testing.assert_allclose(np.asarray(nib.load(ras).dataobj), np.asarray(nib.load(mm).dataobj))
    assert_ok(run("register", files["moving"], files["fixed"], "-m", files["diff"], "--moved",
                  tmp_path / "m3.nii.gz", "--inverse-warp", ants, "--warp-format", "ants"))
    np.testing.assert_allclose(np.asarray(nib.load(ants).dataobj)[..., 0, :],
                               np.moveaxis(inverse, 0, -1) * np.array([-2.0, -2.0, 2.0]), atol=1e-4)


def test_cli_plain_model_inverse_warns(files, tmp_path):
    inverse = tmp_path / "inverse.npz"
    result = run("register", files["moving"], files["fixed"], "-m", files["plain"], "--moved",
                 tmp_path / "moved.nii.gz", "--inverse-warp", inverse)
    assert_ok(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "fixed-point" in warnings[0]
    assert "fixed-point approximation" in result.output
    with np.load(inverse) as npz:  # a voxel field, with its grid and convention
        assert npz["disp"].shape == (3, *SHAPE) and str(npz["convention"]) == "voxel"


def test_cli_finetune(files, tmp_path):
    plain_moved, tuned_moved = tmp_path / "plain.nii.gz", tmp_path / "tuned.nii.gz"
    assert_ok(run("register", files["moving"], files["fixed"], "-m", files["plain"], "--moved",
                  plain_moved))
    result = run("register", files["moving"], files["fixed"], "-m", files["plain"], "--moved",
                 tuned_moved, "--finetune", "40", "--no-progress", "--finetune-lr", "0.2")
    assert_ok(result)
    assert "finetune: " in result.output and "mse + 0.01 * grad" in result.output
    fixed = io.normalize(io.load_image(files["fixed"]).data, "minmax")
    before = _mse(fixed, io.load_image(plain_moved).data)
    after = _mse(fixed, io.load_image(tuned_moved).data)
    assert after < 0.7 * before, (before, after)
    # '--finetune' without a number: the default number of steps (or fewer, stopping early)
    result = run("register", files["moving"], files["fixed"], "-m", files["diff"], "--moved",
                 tmp_path / "d.nii.gz", "--image-loss", "ncc", "--inverse-warp",
                 tmp_path / "dinv.nii.gz", "--finetune")
    assert_ok(result)
    assert "finetune" in result.stderr  # the progress bar
    line = next(x for x in result.stdout.splitlines() if x.startswith("finetune:"))
    steps = int(line.split()[1])
    assert 0 < steps <= DEFAULT_FINETUNE_STEPS and "ncc" in line
    assert "exact" in result.output


def test_cli_errors(files, tmp_path):
    base = ["register", files["moving"], files["fixed"], "-m", files["diff"], "--moved",
            tmp_path / "moved.nii.gz"]
    # N is optional, so click reads '-3' as an option (also after '='): still one clear line
    assert_user_error(run(*base, "--finetune", "-3"), "-3", "must not be negative")
    assert_user_error(run(*base, "--finetune=-3"), "-3", "must not be negative")
    assert_user_error(run(*base, "--finetune", "many"), "--finetune")
    assert_user_error(run(*base, "--finetune", "5", "--finetune-lr", "0"), "--finetune-lr")
    assert_user_error(run(*base, "--finetune", "5", "--image-loss", "l1"), "--image-loss")
    assert_user_error(run(*base, "--inverse-warp", files["fixed"]), "never overwrites")
    assert_user_error(run(*base, "--moved-fixed", files["moving"]), "never overwrites")
    assert_user_error(run(*base, "--inverse-warp", files["diff"]))  # the model is never written
    assert_user_error(run(*base, "--inverse-warp", tmp_path / "moved.nii.gz"),
                      "--moved and --inverse-warp must be different")
    assert_user_error(run(*base, "--warp", tmp_path / "w.nii.gz", "--moved-fixed",
                          tmp_path / "w.nii.gz"), "--warp and --moved-fixed must be different")
    assert_user_error(run(*base, "--inverse-warp", tmp_path / "inv.npz", "--warp-units", "mm"),
                      "--inverse-warp", ".nii")
    assert_user_error(run(*base, "--inverse-warp", tmp_path / "nodir" / "inv.nii.gz"),
                      "does not exist")
    assert not any(tmp_path.iterdir())  # nothing was written by a failed call


def test_adam_matches_torch():
    gen = torch.Generator().manual_seed(0)
    ours = torch.randn(3, 5, generator=gen).requires_grad_(True)
    theirs = ours.detach().clone().requires_grad_(True)
    target = torch.randn(3, 5, generator=gen)
    mine, reference = Adam([ours], lr=0.05), torch.optim.Adam([theirs], lr=0.05)
    for _ in range(20):
        for p, opt in ((ours, mine), (theirs, reference)):
            opt.zero_grad()
            ((p - target) ** 3).abs().sum().backward()
            opt.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
