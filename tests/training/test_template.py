"""Template construction: a learned template is sharper than the mean and stays centred, the
conditional template follows its attribute, exact resume, labels, and the CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from cli_helpers import assert_ok, assert_user_error, run
from scipy import ndimage

from voxreg import io
from voxreg import transforms as T
from voxreg.checkpoint import load_template_model
from voxreg.data import read_attributes
from voxreg.evaluation import (
    mean_displacement,
    propagate_labels,
    register_to_template,
    sharpness,
    template_dice,
    templates_at,
)
from voxreg.nn.networks import VxmDense
from voxreg.nn.template import ConditionalTemplate, TemplateCreation
from voxreg.training import TemplateTrainer, train_template

S = 32
FEATURES = [[8, 16, 16], [16, 16, 16, 8]]


def _discs(n, seed, shift=4.0, radii=None):
    """Soft discs (edge width ~1 voxel) at random shifts whose mean is exactly zero, so the
    population's centred template is the disc at the grid centre."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    shifts = rng.uniform(-shift, shift, (n, 2)) if shift else np.zeros((n, 2))
    shifts -= shifts.mean(0)
    radius = np.full(n, 7.0) if radii is None else np.asarray(radii, dtype=float)
    centre = (S - 1) / 2 + shifts
    dist = np.sqrt((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2)
    return (1 / (1 + np.exp((dist - radius[:, None, None]) / 0.7))).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    """An unconditional template trained briefly on 16 shifted discs (about 2 s on 1 core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images = _discs(16, 0)
    model, history = train_template(images, nb_features=FEATURES, int_steps=5, epochs=8,
                                    steps_per_epoch=15, batch_size=4, lr=3e-3, device="cpu",
                                    progress=False, verbose=False)
    torch.set_num_threads(threads)
    return images, model, history


def test_learned_template_is_sharper_than_the_mean_and_centred(trained, one_thread):
    images, model, history = trained
    mean = images.mean(0)
    truth = _discs(1, 0, shift=0)[0]
    template = model.template_image()
    # the measure: RMS of the gradient magnitude (voxels); the blurred mean has less
    assert sharpness(template) > 1.08 * sharpness(mean), (sharpness(template), sharpness(mean))
    assert history[-1]["sharpness"] == pytest.approx(sharpness(template))
    # closer to the true (centred) disc than the voxel-wise mean
    assert ((template - truth) ** 2).mean() < 0.8 * ((mean - truth) ** 2).mean()
    # the registration learned: the image terms fell
    assert history[-1]["transformer_loss"] < 0.5 * history[0]["transformer_loss"]
    assert history[-1]["neg_transformer_loss"] < 0.5 * history[0]["neg_transformer_loss"]
    # centred: the subjects' mean displacement is small next to their own displacements
    centred = mean_displacement(model, images)
    assert centred["disp_rms"] > 1.0  # the shifts of up to 4 voxels were found
    assert centred["ratio"] < 0.35, centred


def test_outputs_and_inverse_field(one_thread):
    torch.manual_seed(0)
    model = TemplateCreation((S, S), template_init=_discs(1, 0, shift=0)[0], nb_features=FEATURES,
                             int_steps=5)
    with torch.no_grad():  # a visible smooth deformation from an untrained network
        model.registration.flow.bias.copy_(torch.tensor([1.5, -1.0]))
    subjects = torch.from_numpy(_discs(3, 1))[:, None]
    out = model(subjects)
    assert out.moved_template.shape == (3, 1, S, S) and out.moved_subject.shape == (3, 1, S, S)
    assert out.disp.shape == (3, 2, S, S) and out.velocity.shape == (3, 2, S // 2, S // 2)
    assert out.template.shape == (3, 1, S, S)
    # the moved template is the template pulled back by disp
    expected = T.warp(out.template, out.disp)
    torch.testing.assert_close(out.moved_template, expected, atol=1e-5, rtol=0)
    res = register_to_template(model, subjects.numpy())
    torch.testing.assert_close(torch.from_numpy(res["moved_subject"]), out.moved_subject.detach(),
                               atol=1e-5, rtol=0)
    # the inverse undoes disp: inverse then disp is about the identity
    roundtrip = T.compose(torch.from_numpy(res["inverse"]), torch.from_numpy(res["disp"]))
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert float(torch.from_numpy(res["disp"]).abs().max()) > 1.0
    assert float(roundtrip[inner].abs().max()) < 0.05
    with pytest.raises(ValueError, match="subject must have shape"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="no attributes"):
        model(subjects, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="int_steps"):
        TemplateCreation((S, S), int_steps=0)


def test_mean_stream_is_the_running_mean(one_thread):
    model = TemplateCreation((8, 8), nb_features=[[4], [4, 4]], int_steps=2, mean_cap=100)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 2, 4, 4, generator=gen) for b in (2, 3, 1)]
    model.train()
    for k, batch in enumerate(batches):
        mean = model.mean_stream(batch)
        seen = torch.cat(batches[:k + 1])
        torch.testing.assert_close(mean, seen.mean(0, keepdim=True))
    assert int(model.mean_count) == 6
    # capped: the past counts as mean_cap subjects; the gradient flows through the batch only
    model = TemplateCreation((8, 8), nb_features=[[4], [4, 4]], int_steps=2, mean_cap=2)
    model.train()
    model.mean_stream(batches[0])
    model.mean_stream(batches[1])
    past = model.mean_velocity.clone()
    batch = batches[2].clone().requires_grad_(True)
    mean = model.mean_stream(batch)
    torch.testing.assert_close(mean, (2 * past + batch) / 3)
    mean.sum().backward()
    torch.testing.assert_close(batch.grad, torch.full_like(batch, 1 / 3))
    # eval mode leaves the running mean alone
    model.eval()
    before = model.mean_velocity.clone()
    model.mean_stream(torch.ones(1, 2, 4, 4))
    torch.testing.assert_close(model.mean_velocity, before)


def test_sharpness_measure():
    image = _discs(1, 0, shift=0)[0].astype(np.float64)
    blurred = ndimage.gaussian_filter(image, 1.5)
    assert sharpness(blurred) < 0.8 * sharpness(image)
    # a straight edge's gradient magnitude (central differences) by hand
    ramp = np.tile(np.arange(6.0), (5, 1)) * 0.5
    assert sharpness(ramp) == pytest.approx(0.5)
    assert sharpness(ramp, measure="mean") == pytest.approx(0.5)
    mask = np.zeros_like(image, dtype=bool)
    mask[10:20, 10:20] = True
    assert sharpness(image, mask) == pytest.approx(
        np.sqrt((sum(g**2 for g in np.gradient(image)))[mask].mean()))
    assert sharpness(torch.from_numpy(image)[None, None]) == pytest.approx(sharpness(image))
    with pytest.raises(ValueError, match="measure"):
        sharpness(image, measure="entropy")
    with pytest.raises(ValueError, match="mask is empty"):
        sharpness(image, np.zeros_like(mask))


def test_resume_continues_exactly(tmp_path, one_thread):
    images = _discs(8, 2)
    common = dict(nb_features=[[4, 8], [8, 8, 4]], int_steps=3, steps_per_epoch=3,
                  batch_size=2, lr=3e-3, device="cpu", progress=False, verbose=False)
    full, full_history = train_template(images, epochs=3, out_dir=tmp_path / "full",
                                        snapshot_every=2, **common)
    part, _ = train_template(images, epochs=1, out_dir=tmp_path / "part", **common)
    assert load_template_model(tmp_path / "part" / "checkpoint.safetensors").template is not None
    resumed, history = train_template(images, epochs=3, out_dir=tmp_path / "part", resume=True,
                                      **common)
    assert [row["step"] for row in history] == [3, 6, 9]
    torch.testing.assert_close(resumed.template, full.template, atol=0, rtol=0)
    for a, b in zip(resumed.state_dict().values(), full.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert [r["loss"] for r in history] == [r["loss"] for r in full_history]
    # files: history, loss curve, checkpoint, final model, snapshots (epoch 2 and the end)
    run = tmp_path / "full"
    for name in ("history.csv", "loss.png", "checkpoint.safetensors", "model.safetensors"):
        assert (run / name).is_file(), name
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == ["template_epoch0002.nii.gz", "template_epoch0002.png",
                     "template_epoch0003.nii.gz", "template_epoch0003.png"]
    np.testing.assert_allclose(io.load_image(run / "snapshots" / "template_epoch0003.nii.gz").data,
                               full.template_image(), atol=1e-6)
    with open(run / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {"mean_loss", "flow_loss", "mean_disp_rms", "sharpness"} <= set(rows[0])
    loaded = load_template_model(run / "model.safetensors")
    assert loaded.metadata["training"]["batch_size"] == 2
    torch.testing.assert_close(loaded.template, full.template.detach())
    with pytest.raises(ValueError, match="shape"):
        train_template(_discs(4, 0)[:, :16, :16], epochs=1, out_dir=run, resume=True, **common)


def test_registration_warm_start(one_thread):
    images = _discs(4, 2)
    common = dict(nb_features=[[4, 8], [8, 8, 4]], int_steps=3, epochs=1, steps_per_epoch=1,
                  batch_size=2, lr=1e-7, device="cpu", progress=False, verbose=False)
    torch.manual_seed(123)
    source = VxmDense(images.shape[1:], nb_features=[[4, 8], [8, 8, 4]], int_steps=3,
                      bidir=True)
    warm, _ = train_template(images, init_registration=source, **common)
    cold, _ = train_template(images, **common)
    mine, theirs = warm.registration.state_dict(), source.state_dict()
    for name, value in theirs.items():  # one Adam step of lr 1e-7 away from the source's
        torch.testing.assert_close(mine[name], value, atol=2e-7, rtol=0)
    weights = [k for k in theirs if k.endswith("weight")]
    assert any(not torch.allclose(cold.registration.state_dict()[k], theirs[k], atol=1e-3)
               for k in weights)
    with pytest.raises(ValueError, match="no weight"):
        train_template(images, init_registration=torch.nn.Linear(2, 2), **common)


def test_conditional_template_follows_the_attribute(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    score = rng.uniform(0, 1, 16)
    images = _discs(16, 3, shift=1.5, radii=4.5 + 5 * score)
    age = 20 + 50 * score
    model, history = train_template(
        images, age, attribute_names=["age"], nb_features=FEATURES, decoder_features=[8, 8, 8],
        int_steps=5, epochs=8, steps_per_epoch=15, batch_size=4, lr=3e-3, device="cpu",
        progress=False, verbose=False, out_dir=tmp_path, snapshot_every=8)
    assert isinstance(model, ConditionalTemplate)
    assert history[-1]["transformer_loss"] < 0.5 * history[0]["transformer_loss"]
    templates = templates_at(model, [20, 45, 70])
    assert templates.shape == (3, S, S)
    area = templates.sum((1, 2))
    true_area = np.pi * np.array([4.5, 7.0, 9.5]) ** 2
    # bigger discs at higher ages, by at least half the true difference
    assert area[0] < area[1] < area[2], area
    assert area[2] - area[0] > 0.5 * (true_area[2] - true_area[0]), (area, true_area)
    # a fresh model (zero decoder head) gives the mean image at every age
    fresh = ConditionalTemplate((S, S), mean_image=images.mean(0), attribute_center=[45.0],
                                attribute_scale=[15.0], decoder_features=[8, 8, 8],
                                nb_features=FEATURES, int_steps=5)
    np.testing.assert_allclose(templates_at(fresh, [20, 70]), np.stack([images.mean(0)] * 2),
                               atol=1e-6)
    # snapshots at the 10th/50th/90th percentile ages, and a loadable model
    assert len(list((tmp_path / "snapshots").glob("template_epoch0008_age*.nii.gz"))) == 3
    loaded = load_template_model(tmp_path / "model.safetensors")
    np.testing.assert_allclose(templates_at(loaded, [20, 70]), templates[[0, 2]], atol=1e-5)
    with pytest.raises(ValueError, match="needs attributes"):
        model(torch.from_numpy(images[:2, None]))
    with pytest.raises(ValueError, match="attributes must have shape"):
        TemplateTrainer(model, images, attributes=np.zeros(3))


def test_labels_propagate_and_dice_rises(trained, one_thread):
    images, model, _ = trained
    labels = (images > 0.5).astype(np.int32) + (images > 0.95)
    # an untrained network has a zero field: the vote is the plain voxel-wise majority
    torch.manual_seed(0)
    still = TemplateCreation((S, S), template_init=images.mean(0), nb_features=FEATURES,
                             int_steps=5)
    voted = propagate_labels(still, images, labels)
    counts = np.stack([(labels == v).sum(0) for v in (0, 1, 2)])
    np.testing.assert_array_equal(voted, counts.argmax(0))
    # the learned template's labels fit new subjects better after registration
    val_images = _discs(6, 9)
    val_labels = (val_images > 0.5).astype(np.int32) + (val_images > 0.95)
    template_labels = propagate_labels(model, images, labels)
    scores = template_dice(model, template_labels, val_images, val_labels)
    assert scores["dice_after"] > scores["dice_before"] + 0.2, scores
    assert scores["dice_after"] > 0.65, scores
    assert scores["folding_pct"] < 1.0
    with pytest.raises(ValueError, match="integer"):
        propagate_labels(model, images, labels.astype(float))


def test_read_attributes(tmp_path):
    images = [tmp_path / "a.nii.gz", tmp_path / "sub" / "b.npy"]
    table = tmp_path / "subjects.csv"
    table.write_text("id,age,sex\nb,61.5,F\na,30,M\nc,,F\n")
    np.testing.assert_array_equal(read_attributes(table, "age", images), [[30.0], [61.5]])
    by_path = tmp_path / "paths.csv"
    by_path.write_text("path,age,weight\nsub/b.npy,61.5,70\na.nii.gz,30,80\n")
    np.testing.assert_array_equal(read_attributes(by_path, ["age", "weight"], images),
                                  [[30, 80], [61.5, 70]])
    with pytest.raises(ValueError, match="no column 'height'"):
        read_attributes(table, "height", images)
    with pytest.raises(ValueError, match="has no row"):
        read_attributes(table, "age", images + [tmp_path / "d.nii.gz"])
    with pytest.raises(ValueError, match="not a number"):
        read_attributes(table, "age", [tmp_path / "c.nii.gz"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_attributes(tmp_path / "none.csv", "age", images)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

AFFINE = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -30], [0, 0, 2.0, 0], [0, 0, 0, 1]])
TINY = ["--enc", "4,4", "--dec", "4,4,4", "--int-steps", "3", "--steps-per-epoch", "2",
        "--batch-size", "2", "--device", "cpu", "--no-progress"]





@pytest.fixture
def image_files(tmp_path):
    images = (_discs(4, 5) * 200).astype(np.uint8)
    return [io.save_image(tmp_path / f"s{i}.nii.gz", image, AFFINE) for i, image in
            enumerate(images)]


def test_cli_template_and_resume(image_files, tmp_path, one_thread):
    out = tmp_path / "template.nii.gz"
    result = run("template", *image_files, "--out", out, "--epochs", "1", "--snapshot-every", "1",
                 *TINY)
    assert_ok(result)
    assert "sharpness" in result.output and "template:" in result.output
    written = io.load_image(out)
    assert written.shape == (S, S)
    np.testing.assert_allclose(written.affine, AFFINE)
    run_dir = tmp_path / "template-run"
    model = load_template_model(run_dir / "checkpoint.safetensors")
    np.testing.assert_allclose(written.data, model.template_image(), atol=1e-6)
    assert (run_dir / "snapshots" / "template_epoch0001.png").is_file()
    assert model.metadata["normalize"] == "percentile"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in image_files))
    result = run("template", "--list", listing, "--out", out, "--epochs", "2", "--resume", *TINY)
    assert_ok(result)
    assert "resuming" in result.output
    assert load_template_model(run_dir / "checkpoint.safetensors").metadata["training"]
    from voxreg.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir / "checkpoint.safetensors",
                           model=load_template_model(run_dir / "checkpoint.safetensors"))
    assert ckpt.epoch == 2 and ckpt.step == 4


def test_cli_conditional(image_files, tmp_path, one_thread):
    table = tmp_path / "subjects.csv"
    table.write_text("id,age\n" + "".join(f"s{i},{30 + 10 * i}\n" for i in range(4)))
    out = tmp_path / "cond.nii.gz"
    result = run("template", *image_files, "--out", out, "--epochs", "1", "--attributes", table,
                 "--attribute", "age", "--at", "30,70", "--run", tmp_path / "r", *TINY)
    assert_ok(result)
    for name in ("cond.nii.gz", "cond_age30.nii.gz", "cond_age70.nii.gz"):
        image = io.load_image(tmp_path / name)
        assert image.shape == (S, S) and np.allclose(image.affine, AFFINE)
    model = load_template_model(tmp_path / "r" / "model.safetensors")
    assert isinstance(model, ConditionalTemplate) and model.attribute_names == ["age"]
    assert model.attribute_center == [45.0]


def test_cli_errors(image_files, tmp_path):
    out = tmp_path / "t.nii.gz"
    other = io.save_image(tmp_path / "other.nii.gz", np.zeros((S, S), np.uint8), AFFINE * 2)
    assert_user_error(run("template", image_files[0], other, "--out", out, *TINY), "one grid",
                      "different affine")
    small = io.save_image(tmp_path / "small.nii.gz", np.zeros((16, 16), np.uint8), AFFINE)
    assert_user_error(run("template", image_files[0], small, "--out", out, *TINY), "one grid")
    assert_user_error(run("template", image_files[0], "--out", out, *TINY), "at least 2")
    assert_user_error(run("template", *image_files, "--out", image_files[0], *TINY),
                      "never overwrites")
    assert_user_error(run("template", *image_files, "--out", tmp_path / "t.png", *TINY),
                      "unsupported")
    assert_user_error(run("template", *image_files, "--out", out, "--attribute", "age", *TINY),
                      "--attributes")
    assert_user_error(run("template", *image_files, "--out", out, "--at", "30", *TINY), "--at")
    table = tmp_path / "subjects.csv"
    table.write_text("id,age\ns0,30\ns1,40\n")
    assert_user_error(run("template", *image_files, "--out", out, "--attributes", table,
                          "--attribute", "age", *TINY), "s2.nii.gz", "has no row")
    assert_user_error(run("template", *image_files, "--out", out, "--lambda", "-1", *TINY),
                      "--lambda")
    assert_user_error(run("template", tmp_path / "missing.nii.gz", *image_files, "--out", out,
                          *TINY), "missing.nii.gz")
    assert not out.exists()
    help_text = run("template", "--help").output
    for option in ("--mean-weight", "--snapshot-every", "--attributes", "--int-downsize",
                   "--resume", "--run"):
        assert option in help_text


def test_cli_slices_stored_as_3d_files(tmp_path, one_thread):
    images = (_discs(3, 6) * 200).astype(np.uint8)[..., None]  # (S, S, 1): 2D slices in 3D files
    files = [io.save_image(tmp_path / f"f{i}.nii.gz", image, AFFINE) for i, image in
             enumerate(images)]
    out = tmp_path / "flat_template.nii.gz"
    assert_ok(run("template", *files, "--out", out, "--epochs", "1", *TINY))
    written = io.load_image(out)
    assert written.shape == (S, S, 1)
    model = load_template_model(tmp_path / "flat_template-run" / "model.safetensors")
    assert model.inshape == (S, S)


def test_shipped_template2d():
    from voxreg.apps.brain2d import load_ixi2d
    from voxreg.checkpoint import MODELS_DIR

    path = MODELS_DIR / "template2d.safetensors"
    if not path.is_file():
        pytest.skip("no shipped template2d model")
    assert path.stat().st_size < 2e6
    model = load_template_model("template2d")
    assert isinstance(model, TemplateCreation) and model.inshape == (96, 112)
    import voxreg

    assert isinstance(voxreg.load_model("template2d"), TemplateCreation)  # by name, too
    assert "IXI" in model.metadata["data"] and "CC BY-SA 3.0" in model.metadata["data"]
    template = model.template_image()
    try:
        train = load_ixi2d()["train_images"]
    except FileNotFoundError:
        pytest.skip("no ixi2d data to compare with")
    assert sharpness(template) > 1.05 * sharpness(train.mean(0))


def test_shipped_template3d(one_thread):
    from voxreg.apps.brain3d import load_ixi, subject_ids
    from voxreg.checkpoint import MODELS_DIR

    path = MODELS_DIR / "template3d.safetensors"
    if not path.is_file():
        pytest.skip("no shipped template3d model")
    assert path.stat().st_size < 8e6
    model = load_template_model("template3d")
    assert isinstance(model, TemplateCreation) and model.inshape == (96, 112, 96)
    meta = model.metadata
    assert "IXI" in meta["data"] and "CC BY-SA 3.0" in meta["data"]
    template = model.template_image()
    # the stored measures describe this template: sharper than the voxel-wise mean, and
    # registering validation subjects to it raised the Dice against its propagated labels
    assert sharpness(template) == pytest.approx(meta["sharpness_rms_grad"]["template"], rel=1e-4)
    assert sharpness(template) > 1.1 * meta["sharpness_rms_grad"]["voxelwise_mean"]
    assert meta["val_dice_after"] > meta["val_dice_before"] + 0.05
    try:
        ids = subject_ids("val")[:2]
        val = load_ixi("val", ids=ids, labels=False)["images"]
    except FileNotFoundError:
        pytest.skip("no ixi data")
    # the template warped onto each validation subject matches it better than the template does
    out = register_to_template(model, val, outputs=["moved_template"])
    before = np.mean((template[None] - val) ** 2, axis=(1, 2, 3))
    after = np.mean((out["moved_template"][:, 0] - val) ** 2, axis=(1, 2, 3))
    assert np.all(after < 0.8 * before), (before, after)
