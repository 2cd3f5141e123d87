"""SynthMorph-style synthesis, label-only (SynthMorph) training, semi-supervised training and
the ``voxreg train --synth`` / ``--seg-weight`` command line, on tiny shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage
from torch.utils.data import default_collate

import voxreg
from voxreg import io, losses, metrics
from voxreg import transforms as T
from voxreg.cli import cli
from voxreg.data import ScanToScanDataset
from voxreg.data import synthesis as S
from voxreg.evaluation import synthetic_dice
from voxreg.nn.networks import VxmDense
from voxreg.training import Trainer, train

SHAPE = (32, 32)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mean_dice(fixed: torch.Tensor, moved: torch.Tensor) -> float:
    """Mean Dice over the labels present in both maps, averaged over the batch."""
    scores = []
    for f, m in zip(fixed.numpy(), moved.numpy()):
        scores.append(metrics.mean_dice_present(f[0], m[0]))
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------
# random fields and label maps
# --------------------------------------------------------------------------------------------


def test_smooth_noise_seeded_and_smooth():
    a = S.smooth_noise(SHAPE, channels=3, batch=2, spacing=8, generator=_gen(0))
    b = S.smooth_noise(SHAPE, channels=3, batch=2, spacing=8, generator=_gen(0))
    c = S.smooth_noise(SHAPE, channels=3, batch=2, spacing=8, generator=_gen(1))
    assert a.shape == (2, 3, *SHAPE)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # linear interpolation of nodes 31/4 voxels apart: neighbours differ far less than the nodes
    step = (a[..., 1:] - a[..., :-1]).abs().max()
    assert step < 0.5 * a.abs().max()
    assert S.smooth_noise((8, 9, 10), generator=_gen(0)).shape == (1, 1, 8, 9, 10)
    with pytest.raises(ValueError, match="spacing"):
        S.smooth_noise(SHAPE, spacing=0)
    with pytest.raises(ValueError, match="shape"):
        S.smooth_noise((32,))


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_random_deformation_is_smooth_and_invertible(shape):
    velocity = S.random_velocity(shape, batch=3, max_std=3.0, spacing=8, generator=_gen(2))
    disp = T.integrate_velocity(velocity, 5)
    assert torch.equal(disp, S.random_deformation(shape, 3, 3.0, 8, 5, generator=_gen(2)))
    assert disp.abs().max() > 2  # it does deform
    assert float(T.folding_fraction(disp).max()) == 0.0
    assert float(T.jacobian_determinant(disp).min()) > 0.05
    # exp(-v) inverts exp(v): composing the two gives the identity up to the discretisation
    # (displacements reach ~5 voxels; the residual stays a few hundredths of a voxel)
    inverse = T.integrate_velocity(-velocity, 5)
    residual = T.compose(disp, inverse).norm(dim=1)
    inner = (slice(None),) + tuple(slice(3, s - 3) for s in shape)  # away from the border clamp
    assert float(residual[inner].mean()) < 0.04, float(residual[inner].mean())
    assert float(residual[inner].max()) < 0.25, float(residual[inner].max())


def test_warp_labels_matches_scipy_nearest_with_border():
    labels = torch.randint(0, 5, (2, 1, *SHAPE), generator=_gen(3))
    disp = 6 * S.smooth_noise(SHAPE, 2, 2, spacing=6, generator=_gen(4))  # reaches off the grid
    warped = S.warp_labels(labels, disp)
    assert warped.dtype == labels.dtype
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    for b in range(2):
        coords = grid + disp[b].numpy()
        expected = ndimage.map_coordinates(labels[b, 0].numpy(), coords, order=0, mode="nearest")
        np.testing.assert_array_equal(warped[b, 0].numpy(), expected)
    # only input labels come out, even where the field points outside
    assert set(torch.unique(warped).tolist()) <= set(torch.unique(labels).tolist())


@pytest.mark.parametrize("shape,num_labels", [((32, 32), 6), ((16, 16, 16), 4)])
def test_label_maps_hold_the_requested_classes(shape, num_labels):
    opts = S.LabelSynthesis(num_labels=num_labels, label_spacing=4)
    maps = S.synth_label_maps(shape, batch=3, options=opts, generator=_gen(5))
    assert maps.shape == (3, 1, *shape) and maps.dtype == torch.int64
    for m in maps:
        assert torch.unique(m).tolist() == list(range(1, num_labels + 1))
    again = S.synth_label_maps(shape, batch=3, options=opts, generator=_gen(5))
    other = S.synth_label_maps(shape, batch=3, options=opts, generator=_gen(6))
    assert torch.equal(maps, again) and not torch.equal(maps, other)
    # blobs, not salt and pepper: most voxels share the label of their neighbour (independent
    # labels would agree 1 / num_labels of the time)
    same = (maps[..., 1:] == maps[..., :-1]).float().mean()
    assert same > 0.6


def test_label_options_are_validated():
    with pytest.raises(ValueError, match="num_labels"):
        S.LabelSynthesis(num_labels=1)
    with pytest.raises(ValueError, match="warp_std"):
        S.LabelSynthesis(warp_std=-1)
    with pytest.raises(ValueError, match="mean_range"):
        S.ImageSynthesis(mean_range=(1.0, 0.5))
    with pytest.raises(ValueError, match="unknown option"):
        S.synth_label_maps(SHAPE, options={"colour": 3})


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def test_gaussian_blur_matches_scipy():
    image = torch.rand(2, 1, 20, 24, generator=_gen(7), dtype=torch.float64)
    sigma = torch.tensor([1.5, 0.8], dtype=torch.float64)
    out = S._gaussian_blur(image, sigma)
    radius = 5  # ceil(3 * 1.5), shared by the batch
    for b in range(2):
        expected = ndimage.gaussian_filter(image[b, 0].numpy(), float(sigma[b]), mode="nearest",
                                           truncate=radius / float(sigma[b]))
        np.testing.assert_allclose(out[b, 0].numpy(), expected, atol=1e-10)
    volume = torch.rand(1, 1, 9, 10, 11, generator=_gen(8), dtype=torch.float64)
    expected = ndimage.gaussian_filter(volume[0, 0].numpy(), 1.0, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(S._gaussian_blur(volume, torch.tensor([1.0]))[0, 0].numpy(),
                               expected, atol=1e-10)


def test_images_piecewise_constant_without_corruption():
    """With every corruption off, the image is the per-label mean, min-max scaled."""
    labels = S.synth_label_maps(SHAPE, 2, {"num_labels": 5, "label_spacing": 4}, _gen(9))
    plain = S.ImageSynthesis(noise_std=0, blur_sigma=0, bias_std=0, additive_noise=0, gamma_std=0)
    image = S.synth_images(labels, plain, _gen(10))
    for b in range(2):
        values = [torch.unique(image[b][labels[b] == v]) for v in range(1, 6)]
        assert all(len(v) == 1 for v in values)  # constant within each label
        flat = torch.cat(values)
        assert float(flat.min()) == 0.0 and float(flat.max()) == 1.0
        assert len(torch.unique(flat)) == 5  # and distinct between labels


def test_images_in_range_seeded_and_contrast_randomised():
    labels = S.synth_label_maps((24, 28), 4, {"num_labels": 6, "label_spacing": 4}, _gen(11))
    image = S.synth_images(labels, generator=_gen(12))
    assert image.shape == labels.shape and image.is_floating_point()
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    flat = image.flatten(1)
    assert torch.allclose(flat.min(1).values, torch.zeros(4))
    assert torch.allclose(flat.max(1).values, torch.ones(4))
    assert torch.equal(image, S.synth_images(labels, generator=_gen(12)))
    # same labels, another draw: the labels' mean intensities change (contrast randomisation)
    other = S.synth_images(labels, generator=_gen(13))
    means = [torch.stack([img[0, 0][labels[0, 0] == v].mean() for v in range(1, 7)])
             for img in (image, other)]
    assert float((means[0] - means[1]).abs().max()) > 0.2
    with pytest.raises(ValueError, match="integer label map"):
        S.synth_images(labels.float())
    with pytest.raises(ValueError, match="label_values"):
        S.synth_images(labels, label_values=[1, 2])


def test_pair_contrasts_independent_or_shared():
    base = S.synth_label_maps(SHAPE, 3, {"num_labels": 4, "label_spacing": 6}, _gen(20))
    plain = dict(noise_std=0, blur_sigma=0, bias_std=0, additive_noise=0, gamma_std=0)

    def label_means(pair, side):
        image, seg = pair[side], pair[f"{side}_seg"]
        return torch.stack([torch.stack([image[b][seg[b] == v].mean() for v in range(1, 5)])
                            for b in range(3)])

    independent = S.synth_pair(base, None, plain, _gen(21), label_values=[1, 2, 3, 4])
    shared = S.synth_pair(base, None, {**plain, "same_contrast": 1.0}, _gen(21),
                          label_values=[1, 2, 3, 4])
    assert torch.allclose(label_means(shared, "moving"), label_means(shared, "fixed"), atol=1e-6)
    assert not torch.allclose(label_means(independent, "moving"), label_means(independent, "fixed"),
                              atol=0.05)
    with pytest.raises(ValueError, match="same_contrast"):
        S.ImageSynthesis(same_contrast=1.5)


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------


def test_dataset_deterministic_per_index_seed_and_epoch():
    ds = S.SynthPairDataset(SHAPE, pairs_per_epoch=6, seed=3, label_options={"num_labels": 5})
    item = ds[2]
    assert sorted(item) == ["fixed", "fixed_seg", "moving", "moving_seg"]
    assert item["moving"].shape == (1, *SHAPE) and item["moving"].dtype == torch.float32
    assert item["moving_seg"].dtype == torch.int64
    assert ds.labels == [1, 2, 3, 4, 5] and ds.inshape == SHAPE
    same = S.SynthPairDataset(SHAPE, pairs_per_epoch=6, seed=3, label_options={"num_labels": 5})[2]
    assert all(torch.equal(item[k], same[k]) for k in item)
    assert not torch.equal(item["moving"], ds[3]["moving"])
    # the two sides are two deformations of one map, with two contrasts
    assert not torch.equal(item["moving_seg"], item["fixed_seg"])
    assert (item["moving_seg"] == item["fixed_seg"]).float().mean() > 0.5
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["moving"], item["moving"])
    ds.set_epoch(0)
    assert torch.equal(ds[2]["moving"], item["moving"])
    with pytest.raises(IndexError):
        ds[6]
    batch = default_collate([ds[i] for i in range(3)])
    assert batch["fixed"].shape == (3, 1, *SHAPE)


def test_dataset_from_real_label_maps():
    maps = S.synth_label_maps(SHAPE, 3, {"num_labels": 4, "label_spacing": 4}, _gen(14))[:, 0]
    maps = (maps * 10).numpy().astype(np.uint8)  # labels 10, 20, 30, 40
    maps[:, :4] = 0  # a background
    ds = S.SynthPairDataset(pairs_per_epoch=4, seed=0, label_maps=maps)
    assert ds.inshape == SHAPE and ds.labels == [0, 10, 20, 30, 40]
    item = ds[1]
    assert set(torch.unique(item["moving_seg"]).tolist()) <= {0, 10, 20, 30, 40}
    different = S.SynthPairDataset(pairs_per_epoch=4, seed=0, label_maps=list(maps),
                                   pair_mode="different")[0]
    assert different["fixed_seg"].shape == (1, *SHAPE)
    with pytest.raises(ValueError, match="shape"):
        S.SynthPairDataset(pairs_per_epoch=4)
    with pytest.raises(ValueError, match="non-integer"):
        S.SynthPairDataset(label_maps=maps + 0.5)
    with pytest.raises(ValueError, match="label_maps have shape"):
        S.SynthPairDataset((16, 16), label_maps=maps)
    with pytest.raises(ValueError, match="pair_mode"):
        S.SynthPairDataset(SHAPE, pair_mode="other")


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _tiny_model(seed=0, shape=SHAPE):
    torch.manual_seed(seed)
    return VxmDense(shape, nb_features=[[8, 16, 16], [16, 16, 16, 8]], int_steps=5,
                    int_downsize=1)


def test_synthmorph_training_registers_held_out_synthetic_pairs(one_thread):
    """Dice loss on warped labels only (no image term): held-out synthetic pairs align better."""
    opts = S.LabelSynthesis(num_labels=4, label_spacing=8, warp_std=3.0, warp_spacing=10)
    data = S.SynthPairDataset(SHAPE, pairs_per_epoch=80, seed=0, label_options=opts)
    held_out = S.SynthPairDataset(SHAPE, pairs_per_epoch=16, seed=999, label_options=opts)
    val = default_collate([held_out[i] for i in range(len(held_out))])

    def val_dice(model):
        _, disp = model(val["moving"], val["fixed"], registration=True)
        return _mean_dice(val["fixed_seg"], T.warp(val["moving_seg"], disp, interp="nearest"))

    before = _mean_dice(val["fixed_seg"], val["moving_seg"])
    model = _tiny_model()
    history = train(model, data, losses=[None, "grad", "dice"], loss_weights=[0, 0.05, 1],
                    epochs=12, steps_per_epoch=20, batch_size=4, lr=5e-3, device="cpu",
                    progress=False, verbose=False, reg_on="disp", val_fn=val_dice)
    assert "transformer_loss" not in history[-1]  # the image term is not computed
    after = history[-1]["val"]
    assert after > before + 0.02, (before, [round(r["val"], 4) for r in history])
    assert history[-1]["seg_loss"] < history[0]["seg_loss"]


def test_synthetic_dice_before_and_after(one_thread):
    opts = S.LabelSynthesis(num_labels=4, label_spacing=8, warp_std=3.0, warp_spacing=10)
    pairs = S.SynthPairDataset(SHAPE, pairs_per_epoch=5, seed=3, label_options=opts)
    expected = np.mean([metrics.mean_dice_present(pairs[i]["fixed_seg"][0].numpy(),
                                                  pairs[i]["moving_seg"][0].numpy())
                        for i in range(len(pairs))])
    model = _tiny_model().eval()  # an untrained model: a field of about 1e-5 voxels
    before, after = synthetic_dice(model, pairs, batch_size=2)
    assert before == pytest.approx(expected) and after == pytest.approx(expected, abs=1e-3)
    assert before < 0.95  # the pairs are apart: the check above is not trivial



def test_weight_zero_image_term_is_skipped_and_needs_labels():
    data = S.SynthPairDataset(SHAPE, pairs_per_epoch=4, seed=0, label_options={"num_labels": 3})
    calls = []

    def spy(y_true, y_pred):
        calls.append(1)
        return ((y_true - y_pred) ** 2).mean()

    trainer = Trainer(_tiny_model(), data, losses=[spy, "grad", "dice"], loss_weights=[0, 0.01, 1],
                      device="cpu", progress=False, verbose=False)
    trainer.fit()
    assert not calls and trainer.history[0]["seg_loss"] < 0
    assert trainer.settings()["loss_weights"] == [0.0, 0.01, 1.0]
    # a weighted image term is still computed (existing behaviour)
    Trainer(_tiny_model(), data, losses=[spy, "grad", "dice"], loss_weights=[1, 0.01, 1],
            device="cpu", progress=False, verbose=False).fit()
    assert calls
    with pytest.raises(ValueError, match="nothing but smoothness"):
        Trainer(_tiny_model(), data, losses=[None, "grad"], device="cpu")
    images = ScanToScanDataset(np.random.default_rng(0).random((4, *SHAPE), dtype=np.float32))
    trainer = Trainer(_tiny_model(), images, losses=[None, "grad", "dice"],
                      loss_weights=[0, 0.01, 1], device="cpu", progress=False, verbose=False)
    with pytest.raises(ValueError, match="carries none"):
        trainer.fit()
    with pytest.raises(ValueError, match="seg_downsize"):
        Trainer(_tiny_model(), data, losses=[None, "grad", "dice"], seg_downsize=0)


def test_seg_downsize_matches_pooled_reference():
    """At factor 2 the seg term is the Dice of block-averaged one-hot maps, the moving one warped
    by the block-averaged field (in coarse voxels)."""
    data = S.SynthPairDataset(SHAPE, pairs_per_epoch=2, seed=1, label_options={"num_labels": 3})
    batch = default_collate([data[0], data[1]])
    trainer = Trainer(_tiny_model(), data, losses=["mse", "grad", "dice"], seg_downsize=2,
                      device="cpu")
    disp = 2 * S.smooth_noise(SHAPE, 2, 2, spacing=8, generator=_gen(15))
    value = trainer._seg_term(batch["moving_seg"], batch["fixed_seg"], disp)
    onehot = [torch.cat([(s == v).float() for v in (1, 2, 3)], 1)
              for s in (batch["moving_seg"], batch["fixed_seg"])]
    pooled = [torch.nn.functional.avg_pool2d(x, 2) for x in onehot]
    coarse = torch.nn.functional.avg_pool2d(disp, 2) / 2
    expected = losses.dice(pooled[1], T.warp(pooled[0], coarse))
    assert torch.allclose(value, expected)
    # at full resolution with zero displacement: exact Dice of the label maps
    full = Trainer(_tiny_model(), data, losses=["mse", "grad", "dice"], device="cpu")
    zero = full._seg_term(batch["moving_seg"], batch["fixed_seg"], torch.zeros_like(disp))
    assert torch.allclose(zero, losses.dice(onehot[1], onehot[0]))


def test_semi_supervised_seg_loss_falls(one_thread):
    """Images plus a Dice term on their label maps (semi-supervised VoxelMorph)."""
    gen = _gen(16)
    base = S.synth_label_maps(SHAPE, 1, {"num_labels": 4, "label_spacing": 8}, gen)
    segs = torch.cat([S.warp_labels(base, S.random_deformation(SHAPE, 1, 3.0, 10, 5, gen))
                      for _ in range(8)])
    # one fixed contrast: the images are their labels' intensities, lightly blurred
    levels = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0])
    images = ndimage.gaussian_filter(levels[segs[:, 0]].numpy(), (0, 1, 1)).astype(np.float32)
    data = ScanToScanDataset(images, pairs_per_epoch=32, seed=0, segs=segs[:, 0].numpy())
    assert data.labels == [1, 2, 3, 4]
    history = train(_tiny_model(), data, losses=["mse", "grad", "dice"],
                    loss_weights=[1.0, 0.01, 0.5], epochs=8, batch_size=4, lr=5e-3, device="cpu",
                    progress=False, verbose=False, seg_downsize=2)
    first, last = history[0], history[-1]
    assert "transformer_loss" in last and "seg_loss" in last
    assert last["seg_loss"] < first["seg_loss"] - 0.02, [round(r["seg_loss"], 4) for r in history]


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)


def _user_error(result, fragment):
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.output
    assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_cli")
    maps = S.synth_label_maps((16, 16), 3, {"num_labels": 3, "label_spacing": 5}, _gen(18))
    images = S.synth_images(maps, generator=_gen(19))
    out = {"root": root}
    for i in range(3):
        out[f"img{i}"] = io.save_image(root / f"img{i}.nii.gz", images[i, 0].numpy(), AFFINE)
        out[f"lab{i}"] = io.save_image(root / f"lab{i}.nii.gz",
                                       maps[i, 0].numpy().astype(np.uint8), AFFINE)
    out["small"] = io.save_image(root / "small.nii.gz", np.zeros((8, 8), np.uint8), AFFINE)
    out["float"] = io.save_image(root / "float.nii.gz",
                                 maps[0, 0].numpy().astype(np.float32) + 0.5, AFFINE)
    return out


TINY = ["--enc", "4,4", "--dec", "4,4,4", "--int-steps", "2", "--steps-per-epoch", "2",
        "--device", "cpu", "--no-progress", "--epochs", "1"]


def test_cli_train_synth(files, tmp_path, one_thread):
    out = tmp_path / "synth"
    result = _run("train", "--synth", "--shape", "16,16", "--synth-labels", "5", "--out", out,
                  "--seg-weight", "2", *TINY)
    _ok(result)
    ckpt = voxreg.load_checkpoint(out / "model.safetensors")
    assert ckpt.model.config["inshape"] == [16, 16]
    meta = ckpt.metadata
    assert meta["synth"]["label_options"]["num_labels"] == 5 and meta["seg_weight"] == 2.0
    assert meta["training"]["losses"][0] == "none" and meta["training"]["loss_weights"][-1] == 2.0
    # seeded by real label maps: the grid comes from them
    out2 = tmp_path / "synth_real"
    _ok(_run("train", "--synth", "--seg-glob", str(files["root"] / "lab*.nii.gz"), "--out", out2,
             *TINY))
    meta = voxreg.load_checkpoint(out2 / "model.safetensors").metadata
    assert meta["synth"]["real_label_maps"] == 3
    # the synthetic model registers real images
    _ok(_run("register", files["img0"], files["img1"], "-m", out / "model.safetensors",
             "--moved", tmp_path / "moved.nii.gz"))


def test_cli_train_seg_weight(files, tmp_path, one_thread):
    out = tmp_path / "semi"
    images = [files[f"img{i}"] for i in range(3)]
    segs = sum([["--seg", files[f"lab{i}"]] for i in range(3)], [])
    _ok(_run("train", *images, *segs, "--seg-weight", "0.5", "--seg-labels", "1,2",
             "--seg-downsize", "2", "--out", out, *TINY))
    ckpt = voxreg.load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt.metadata["seg_weight"] == 0.5 and ckpt.metadata["seg_labels"] == [1, 2]
    assert ckpt.metadata["training"]["seg_downsize"] == 2
    assert "seg_loss" in ckpt.history[-1]
    listing = tmp_path / "segs.txt"
    listing.write_text("\n".join(str(files[f"lab{i}"]) for i in range(3)))
    _ok(_run("train", *images, "--seg-list", listing, "--seg-weight", "1", "--out",
             tmp_path / "semi2", *TINY))


def test_cli_train_errors(files, tmp_path):
    images = [files[f"img{i}"] for i in range(3)]
    out = ["--out", tmp_path / "r"]
    _user_error(_run("train", "--synth", *out), "--synth needs the shape")
    _user_error(_run("train", "--synth", "--shape", "16", *out), "--shape must be 2 or 3")
    _user_error(_run("train", "--synth", "--shape", "16,x", *out), "--shape must be comma")
    _user_error(_run("train", "--synth", "--shape", "16,16", "--atlas", images[0], *out),
                "--atlas")
    _user_error(_run("train", "--synth", "--shape", "20,20", images[0], *out), "differs")
    _user_error(_run("train", "--synth", "--shape", "16,16", "--synth-labels", "1", *out),
                "--synth-labels")
    _user_error(_run("train", *images, "--seg-weight", "1", *out), "needs one label map")
    _user_error(_run("train", *images, "--seg", files["lab0"], "--seg-weight", "1", *out),
                "1 label maps for 3 images")
    _user_error(_run("train", *images, *sum([["--seg", files[f"lab{i}"]] for i in range(3)], []),
                     *out), "only with --seg-weight")
    _user_error(_run("train", *images, "--seg", files["lab0"], "--seg", files["lab1"], "--seg",
                     files["small"], "--seg-weight", "1", *out), "not on the grid")
    _user_error(_run("train", *images, "--seg-glob", str(tmp_path / "*.none"), "--seg-weight",
                     "1", *out), "matches no file")
    _user_error(_run("train", *images, "--seg-weight", "-1", *out), "--seg-weight must be")
    _user_error(_run("train", "--synth", "--seg", files["float"], *out), "non-integer")


def test_cli_train_help_mentions_new_options():
    result = _run("train", "--help")
    _ok(result)
    for option in ("--synth", "--shape", "--synth-labels", "--seg-weight", "--seg-glob",
                   "--seg-labels", "--seg-downsize"):
        assert option in result.output


# --------------------------------------------------------------------------------------------
# the shipped 2D SynthMorph model on real slices
# --------------------------------------------------------------------------------------------


def _ixi2d_available() -> bool:
    from voxreg.apps import brain2d

    return brain2d.data_path().is_file()


@pytest.mark.skipif(not _ixi2d_available(), reason="IXI 2D slices (ixi2d.npz) not available")
def test_shipped_synth2d_registers_real_slices_whatever_the_contrast(one_thread):
    """Measured on val_pairs(30, 10, seed=0): Dice 0.508 -> 0.525 (same contrast) and 0.526
    (moving inverted); assert half the gain and a contrast gap within 0.02."""
    from voxreg.apps import brain2d

    model = voxreg.load_model("synth2d", device="cpu")
    assert "synthetic data only" in model.metadata["data"] and "IXI" in model.metadata["data"]
    assert model.metadata["val_dice_after"] > model.metadata["val_dice_before"]
    data = brain2d.load_ixi2d()
    images, labels = data["val_images"], data["val_labels"]
    pairs = brain2d.val_pairs(len(images), 10, seed=0)
    same = brain2d.evaluate_brain2d(model, images, labels, pairs, timing=False)
    inverted = np.where(labels > 0, 1.0 - images, 0.0).astype(np.float32)
    both = np.concatenate([images, inverted])
    inv_pairs = np.stack([pairs[:, 0] + len(images), pairs[:, 1]], axis=1)
    inv = brain2d.evaluate_brain2d(model, both, np.concatenate([labels, labels]), inv_pairs,
                                   timing=False)
    assert same["dice_after"] > same["dice_before"] + 0.008, same["dice_after"]
    assert abs(inv["dice_after"] - same["dice_after"]) < 0.02
    assert same["folding_pct"] < 0.1


def _ixi3d_available() -> bool:
    from voxreg.data.locate import shared_data

    return shared_data("ixi/splits.json") is not None


@pytest.mark.skipif(not _ixi3d_available(), reason="IXI 3D volumes (ixi/) not available")
def test_shipped_synth3d_registers_real_volumes_whatever_the_contrast():
    """Measured on the first 4 of val_pairs(30, 20, seed=0): Dice 0.498 -> 0.537 (same contrast)
    and 0.525 (moving inverted); on all 20 pairs 0.496 -> 0.538 / 0.524, every pair improved.
    Assert half the gain, a contrast gap within 0.02 and no folding."""
    from voxreg.apps import brain3d
    from voxreg.data.synthesis import invert_contrast

    model = voxreg.load_model("synth3d", device="cpu")
    meta = model.metadata
    assert "synthetic data only" in meta["data"] and "IXI" in meta["data"]
    assert meta["val_dice_after"] > meta["val_dice_before"] + 0.03
    ids = brain3d.subject_ids("val")
    pairs = brain3d.val_pairs(len(ids), 20, seed=0)[:4]
    used = sorted(set(pairs.ravel().tolist()))
    val = brain3d.load_ixi("val", ids=[ids[k] for k in used])
    local = np.array([[used.index(i), used.index(j)] for i, j in pairs])
    images, labels = val["images"], val["labels"]
    same = brain3d.evaluate_brain3d(model, local, images, labels)
    n = len(images)
    inverted = np.concatenate([images, invert_contrast(images, labels)])
    inv = brain3d.evaluate_brain3d(model, np.stack([local[:, 0] + n, local[:, 1]], axis=1),
                                   inverted, np.concatenate([labels, labels]))
    assert same["dice_after"] > same["dice_before"] + 0.02, same["dice_after"]
    assert abs(inv["dice_after"] - same["dice_after"]) < 0.02
    assert same["folding_pct"] < 0.01
