"""The voxreg command line on tiny NIfTI volumes with a tiny untrained model."""

import csv
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_helpers import assert_ok, assert_user_error, run

import voxreg
from voxreg import io
from voxreg.apps import tutorial

SHAPE = (16, 16, 16)
AFFINE = np.array([[2.0, 0, 0, -16], [0, 2.0, 0, -16], [0, 0, 2.0, -16], [0, 0, 0, 1]])


def _blob(center, seed):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    dist = np.sqrt(((grid - np.array(center)[:, None, None, None]) ** 2).sum(0))
    noise = np.random.default_rng(seed).random(SHAPE) * 10
    image = np.clip(200 - 25 * dist + noise, 0, 255).astype(np.uint8)
    labels = (dist < 3).astype(np.uint8) + (dist < 5).astype(np.uint8) * 2 + (dist < 1.5)
    return image, labels.astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for i, center in enumerate([(7, 8, 8), (8, 7, 8), (8, 8, 7), (9, 8, 8)]):
        image, labels = _blob(center, i)
        out[f"img{i}"] = io.save_image(root / f"img{i}.nii.gz", image, AFFINE)
        out[f"lab{i}"] = io.save_image(root / f"lab{i}.nii.gz", labels, AFFINE)
    torch.manual_seed(0)
    model = voxreg.nn.networks.VxmDense(SHAPE, nb_features=[[4, 4], [4, 4, 4]], int_steps=3)
    with torch.no_grad():  # a visible (smooth enough) deformation from an untrained model
        model.flow.weight.normal_(0, 0.1)
        model.flow.bias.copy_(torch.tensor([0.6, -0.4, 0.3]))
    out["model"] = voxreg.save_model(model, root / "tiny.safetensors", metadata={"normalize": "minmax"})
    out["root"] = root
    return out





def test_help_lists_commands():
    result = run("--help")
    assert_ok(result)
    for name in ("train", "register", "warp", "eval", "demo", "models"):
        assert name in result.output
    assert "percentile" in run("register", "--help").output


def test_register_then_warp(files, tmp_path):
    moved, warp_path = tmp_path / "moved.nii.gz", tmp_path / "warp.nii.gz"
    result = run("register", files["img0"], files["img1"], "--model", files["model"], "--moved", moved,
                 "--warp", warp_path, "--device", "cpu")
    assert_ok(result)
    assert "seconds per pair" in result.output
    assert f"warp: {warp_path} (lps-mm" in result.output  # the default for a NIfTI: ANTs' own
    moved_img, warp_img = nib.load(moved), nib.load(warp_path)
    np.testing.assert_allclose(moved_img.affine, AFFINE)
    np.testing.assert_allclose(warp_img.affine, AFFINE)
    assert moved_img.shape == SHAPE and warp_img.shape == SHAPE + (1, 3)
    disp, _ = io.load_warp(warp_path)
    assert np.abs(disp).max() > 0.05  # a real deformation, so the warp checks below mean something

    # applying the saved warp to the (equally normalised) moving image gives the moved image
    again = tmp_path / "again.nii.gz"
    assert_ok(run("warp", files["img0"], "--warp", warp_path, "--out", again, "--normalize", "minmax"))
    np.testing.assert_allclose(io.load_image(again).data, io.load_image(moved).data, atol=1e-4)
    # ... also from a warp saved in mm (the deprecated --warp-units mm: a 4D ras-mm NIfTI)
    mm = tmp_path / "warp_mm.nii.gz"
    result = run("register", files["img0"], files["img1"], "-m", files["model"], "--moved",
                 tmp_path / "m2.nii.gz", "--warp", mm, "--warp-units", "mm")
    assert_ok(result)
    assert "warning: --warp-units mm is deprecated" in result.stderr and "ras-mm" in result.output
    np.testing.assert_allclose(io.load_warp(mm)[0], disp, atol=1e-4)
    np.testing.assert_allclose(np.asarray(nib.load(mm).dataobj).max(), 2 * disp.max(), rtol=1e-4)

    # nearest warping of a label map only produces its labels, with its dtype
    labels_out = tmp_path / "labels.nii.gz"
    assert_ok(run("warp", files["lab0"], "--warp", warp_path, "--out", labels_out, "--interp", "nearest"))
    warped = io.load_image(labels_out).data
    assert warped.dtype == np.uint8
    assert set(np.unique(warped)) <= set(np.unique(io.load_image(files["lab0"]).data))
    assert not np.array_equal(warped, io.load_image(files["lab0"]).data)
    # label interpolation (genericLabel-style): its labels and dtype too, as voxreg.warp does it
    label_out = tmp_path / "labels_label.nii.gz"
    assert_ok(run("warp", files["lab0"], "--warp", warp_path, "--out", label_out, "--interp", "label"))
    by_label = io.load_image(label_out).data
    assert by_label.dtype == np.uint8
    source = torch.from_numpy(io.load_image(files["lab0"]).data)[None, None]
    expected = voxreg.warp(source, torch.from_numpy(disp)[None], interp="label")[0, 0].numpy()
    np.testing.assert_array_equal(by_label, expected)


def test_register_ants_warp(files, tmp_path):
    warp_path = tmp_path / "ants.nii.gz"
    result = run("register", files["img0"], files["img1"], "-m", files["model"], "--moved",
                 tmp_path / "m.nii.gz", "--warp", warp_path, "--warp-format", "ants")
    assert_ok(result)
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "--warp-convention lps-mm" in warning[0]
    ants = np.moveaxis(np.asarray(nib.load(warp_path).dataobj)[..., 0, :], -1, 0)
    disp, _ = io.load_warp(warp_path)
    np.testing.assert_allclose(ants, disp * np.array([-2.0, -2.0, 2.0])[:, None, None, None], atol=1e-4)


def test_register_warp_conventions(files, tmp_path):
    base = ("register", files["img0"], files["img1"], "-m", files["model"], "--moved",
            tmp_path / "m.nii.gz")
    # by extension: MGZ -> ras-mm (FreeSurfer), .npz -> voxel (voxreg only); the lines say which
    result = run(*base, "--warp", tmp_path / "w.mgz", "--inverse-warp", tmp_path / "i.npz")
    assert_ok(result)
    assert f"warp: {tmp_path / 'w.mgz'} (ras-mm" in result.output
    assert f"inverse warp: {tmp_path / 'i.npz'} (voxel" in result.output
    disp, affine = io.load_displacement(tmp_path / "w.mgz", "ras-mm")
    np.testing.assert_allclose(affine, AFFINE)
    np.testing.assert_allclose(np.asarray(nib.load(tmp_path / "w.mgz").dataobj),
                               2 * np.moveaxis(disp, 0, -1), atol=1e-4)
    with np.load(tmp_path / "i.npz") as archive:
        assert str(archive["convention"]) == "voxel" and archive["disp"].shape == (3, *SHAPE)
    # explicit: a 4D RAS NIfTI for mri_synthmorph
    result = run(*base, "--warp", tmp_path / "r.nii.gz", "--warp-convention", "ras-mm")
    assert_ok(result)
    assert nib.load(tmp_path / "r.nii.gz").shape == (*SHAPE, 3) and "ras-mm" in result.output
    np.testing.assert_allclose(io.load_displacement(tmp_path / "r.nii.gz")[0], disp, atol=1e-5)
    # the deprecated --warp-units voxel still writes voxels, to an .npz
    result = run(*base, "--warp", tmp_path / "v.npz", "--warp-units", "voxel")
    assert_ok(result)
    assert "warning: --warp-units voxel is deprecated" in result.stderr
    np.testing.assert_allclose(io.load_displacement(tmp_path / "v.npz")[0], disp, atol=1e-5)
    # a convention the file cannot hold: one line naming the option and what to use
    errors = tmp_path / "errors"
    errors.mkdir()
    base = (*base[:-1], errors / "m.nii.gz")
    assert_user_error(run(*base, "--warp", errors / "w.nii.gz", "--warp-convention", "voxel"),
                      "--warp", "'voxel'", ".npz")
    assert_user_error(run(*base, "--warp", errors / "w.nii.gz", "--warp-units", "voxel"),
                      "--warp", ".npz", "--warp-units voxel means --warp-convention voxel")
    assert_user_error(run(*base, "--inverse-warp", errors / "i.mgz", "--warp-convention", "lps-mm"),
                      "--inverse-warp", "5D NIfTI")
    assert_user_error(run(*base, "--warp", errors / "w.nii.gz", "--warp-convention", "lps-mm",
                          "--warp-format", "ants"), "--warp-convention only")
    assert not any(errors.iterdir())
    assert "--warp-units" not in run("register", "--help").output  # hidden, only accepted


def test_warp_transforms_onto_a_reference(files, tmp_path):
    """``voxreg warp IMAGE -t ... -r REFERENCE``: IMAGE on any grid, one interpolation onto the
    reference grid; label maps keep their dtype; ``--warp`` is the one-field case."""
    warp_path = tmp_path / "w.nii.gz"
    assert_ok(run("register", files["img0"], files["img1"], "-m", files["model"], "--moved",
                  tmp_path / "m.nii.gz", "--warp", warp_path))
    by_warp = tmp_path / "by_warp.nii.gz"
    assert_ok(run("warp", files["lab0"], "--warp", warp_path, "-o", by_warp, "--interp", "nearest"))
    # the same labels on another grid (origin 2 voxels further along i, same world content)
    labels = io.load_image(files["lab0"]).data
    shifted = AFFINE.copy()
    shifted[0, 3] += 4.0
    other = io.save_image(tmp_path / "other.nii.gz", np.roll(labels, -2, axis=0), shifted)
    out = tmp_path / "out.nii.gz"
    assert_ok(run("warp", other, "-t", warp_path, "-r", files["img1"], "-o", out, "--interp",
                  "nearest"))
    result, expected = io.load_image(out), io.load_image(by_warp).data
    assert result.data.dtype == np.uint8 and expected.dtype == np.uint8
    np.testing.assert_allclose(result.affine, AFFINE)
    assert (result.data == expected).mean() > 0.999
    assert not np.array_equal(expected, labels)  # the warp moved them
    # --warp with an image on another grid: --resample, else one clear line
    assert_user_error(run("warp", other, "--warp", warp_path, "-o", tmp_path / "x.nii.gz"),
                      "different grids", "--resample")
    resampled = tmp_path / "resampled.nii.gz"
    assert_ok(run("warp", other, "--warp", warp_path, "-o", resampled, "--interp", "nearest",
                  "--resample"))
    np.testing.assert_array_equal(io.load_image(resampled).data, result.data)
    assert_user_error(run("warp", other, "-t", warp_path, "-o", tmp_path / "x.nii.gz"), "-r")
    assert_user_error(run("warp", other, "--warp", warp_path, "-t", warp_path, "-r", files["img1"],
                          "-o", tmp_path / "x.nii.gz"), "--warp", "-t")
    assert_user_error(run("warp", other, "-o", tmp_path / "x.nii.gz"), "--warp", "-t")
    assert not (tmp_path / "x.nii.gz").exists()


def test_warp_asks_for_what_a_file_does_not_say(files, tmp_path):
    warp_path = tmp_path / "w.nii.gz"
    assert_ok(run("register", files["img0"], files["img1"], "-m", files["model"], "--moved",
                  tmp_path / "m.nii.gz", "--warp", warp_path))
    reference = tmp_path / "ref.nii.gz"
    assert_ok(run("warp", files["img0"], "-t", warp_path, "-r", files["img1"], "-o", reference))
    # an untagged 4D field (as mri_synthmorph writes): RAS or LPS? mm or voxels? never guessed
    disp, _ = io.load_displacement(warp_path)
    untagged = tmp_path / "untagged.nii.gz"
    nib.Nifti1Image(2 * np.moveaxis(disp, 0, -1), AFFINE).to_filename(str(untagged))
    out = tmp_path / "out.nii.gz"
    assert_user_error(run("warp", files["img0"], "-t", untagged, "-r", files["img1"], "-o", out),
                      "untagged.nii.gz", "--warp-convention")
    assert_user_error(run("warp", files["img0"], "--warp", untagged, "-o", out),
                      "untagged.nii.gz", "--warp-convention")
    assert not out.exists()
    assert_ok(run("warp", files["img0"], "-t", untagged, "-r", files["img1"], "-o", out,
                  "--warp-convention", "ras-mm"))
    np.testing.assert_allclose(io.load_image(out).data, io.load_image(reference).data, atol=1e-4)
    # an .npz holding an image and its labels: which one?
    both = tmp_path / "both.npz"
    np.savez(both, vol=io.load_image(files["img0"]).data, seg=io.load_image(files["lab0"]).data)
    assert_user_error(run("warp", both, "-t", warp_path, "-r", files["img1"], "-o", out),
                      "both.npz", "vol, seg", "--key")
    labels_out = tmp_path / "labels.nii.gz"
    assert_ok(run("warp", both, "-t", warp_path, "-r", files["img1"], "-o", labels_out, "--key",
                  "seg", "--interp", "label"))
    assert io.load_image(labels_out).data.dtype == np.uint8


def test_register_resample(files, tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    other = io.save_image(tmp_path / "other.nii.gz", io.load_image(files["img0"]).data, shifted)
    result = run("register", other, files["img1"], "-m", files["model"], "--moved", tmp_path / "m.nii.gz")
    assert_user_error(result, "different grids", "--resample")
    assert not (tmp_path / "m.nii.gz").exists()
    assert_ok(run("register", other, files["img1"], "-m", files["model"], "--moved",
                  tmp_path / "m.nii.gz", "--resample"))
    np.testing.assert_allclose(nib.load(tmp_path / "m.nii.gz").affine, AFFINE)


def test_eval_writes_csvs(files, tmp_path):
    pairs = files["root"] / "pairs.csv"
    pairs.write_text("moving,fixed,moving_labels,fixed_labels\n"
                     "img0.nii.gz,img1.nii.gz,lab0.nii.gz,lab1.nii.gz\n"
                     f"{files['img2']},img3.nii.gz,{files['lab2']},lab3.nii.gz\n")
    out = tmp_path / "res.csv"
    result = run("eval", "--model", files["model"], "--pairs", pairs, "--out", out)
    assert_ok(result)
    assert "mean_dice" in result.output and "±" in result.output
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for column in ("moving", "fixed", "mean_dice", "mean_dice_before", "mean_hd95_mm",
                   "folding_percent", "sd_log_jac", "seconds_per_pair"):
        assert column in rows[0]
    assert 0 <= float(rows[0]["mean_dice"]) <= 1 and float(rows[0]["mean_hd95_mm"]) >= 0
    with open(tmp_path / "res_structures.csv") as handle:
        structures = list(csv.DictReader(handle))
    assert {r["label"] for r in structures} == {"2", "3", "4"} and len(structures) == 6
    assert {"pair", "label", "dice", "dice_before", "hd95_mm"} <= set(structures[0])
    # --labels restricts the structures
    assert_ok(run("eval", "-m", files["model"], "--pairs", pairs, "--out", out, "--labels", "2"))
    with open(tmp_path / "res_structures.csv") as handle:
        assert {r["label"] for r in csv.DictReader(handle)} == {"2"}


def test_train_and_resume(files, tmp_path):
    out = tmp_path / "run"
    images = [files[f"img{i}"] for i in range(4)]
    common = ["--enc", "4,4", "--dec", "4,4,4", "--int-steps", "2", "--steps-per-epoch", "2",
              "--device", "cpu", "--no-progress", "--out", out, "--normalize", "minmax"]
    assert_ok(run("train", *images, "--epochs", "1", *common))
    for name in ("checkpoint.safetensors", "model.safetensors", "history.csv", "loss.png"):
        assert (out / name).exists(), name
    assert voxreg.load_checkpoint(out / "checkpoint.safetensors").epoch == 1
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in images) + "\n")
    result = run("train", "--list", listing, "--epochs", "2", "--resume", *common)
    assert_ok(result)
    assert "resuming" in result.output
    checkpoint = voxreg.load_checkpoint(out / "checkpoint.safetensors")
    assert checkpoint.epoch == 2 and checkpoint.step == 4
    assert checkpoint.metadata["normalize"] == "minmax"
    with open(out / "history.csv") as handle:
        assert [r["epoch"] for r in csv.DictReader(handle)] == ["1", "2"]
    # the trained model registers
    assert_ok(run("register", images[0], images[1], "-m", out / "model.safetensors", "--moved",
                  tmp_path / "m.nii.gz"))


def test_train_errors(files, tmp_path):
    small = io.save_image(tmp_path / "small.nii.gz", np.zeros((8, 8, 8), np.uint8), AFFINE)
    assert_user_error(run("train", files["img0"], small, "--out", tmp_path / "r"), "one grid")
    assert_user_error(run("train", files["img0"], "--out", tmp_path / "r"), "at least 2")
    assert_user_error(run("train", "--glob", str(tmp_path / "*.xyz"), "--out", tmp_path / "r"),
                      "matches no file")


def test_error_paths(files, tmp_path):
    model, img0, img1 = files["model"], files["img0"], files["img1"]
    moved = tmp_path / "moved.nii.gz"
    assert_user_error(run("register", tmp_path / "nope.nii.gz", img1, "-m", model, "--moved", moved),
                      "nope.nii.gz")
    assert_user_error(run("register", img0, img1, "-m", "no_such_model", "--moved", moved),
                      "no_such_model")
    before = io.load_image(img0).data.copy()
    assert_user_error(run("register", img0, img1, "-m", model, "--moved", img0), "never overwrites")
    np.testing.assert_array_equal(io.load_image(img0).data, before)
    assert_user_error(run("register", img0, img1, "-m", model, "--moved", tmp_path / "nodir" / "m.nii.gz"),
                      "does not exist")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(run("register", img0, img1, "-m", model, "--moved", blocker / "m.nii.gz"),
                      "not a folder")
    assert_user_error(run("register", img0, img1, "-m", model, "--moved", tmp_path / "m.png"),
                      "unsupported")
    bad_model = tmp_path / "bad.safetensors"
    bad_model.write_bytes(b"garbage!garbage!")
    assert_user_error(run("register", img0, img1, "-m", bad_model, "--moved", moved))
    img2d = io.save_image(tmp_path / "flat.nii.gz", np.zeros((16, 16), np.float32), AFFINE)
    assert_user_error(run("register", img2d, img2d, "-m", model, "--moved", moved))
    assert_user_error(run("warp", img0, "--warp", img1, "--out", moved), "not a displacement")
    assert_user_error(run("eval", "-m", model, "--pairs", tmp_path / "none.csv"), "none.csv")
    assert_user_error(run("register", img0, img1, "-m", model, "--moved", moved, "--bogus"), "--bogus")
    assert not moved.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "file", "flat.nii.gz"]


def test_models_and_demo(tmp_path, monkeypatch):
    result = run("models")
    assert_ok(result)
    assert result.output.strip()
    # the tutorial missing (an incomplete installation): one clear line
    monkeypatch.delattr(tutorial, "mnist_tutorial")
    assert_user_error(run("demo", "--out", tmp_path / "demo", "--quick"), "voxreg.apps.tutorial")
    # present: it is called with the folder and a short schedule for --quick
    calls = []

    def fake_tutorial(out_dir, epochs=25, steps_per_epoch=40, seed=0):
        calls.append((out_dir, epochs, steps_per_epoch))
        return {"dice": 0.5}

    monkeypatch.setattr(tutorial, "mnist_tutorial", fake_tutorial, raising=False)
    result = run("demo", "--out", tmp_path / "demo", "--quick")
    assert_ok(result)
    assert calls == [(tmp_path / "demo", 2, 10)] and "dice: 0.5" in result.output


def test_entry_point_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from voxreg.cli import main; main()", "register",
         str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "-m", "x", "--moved",
         str(tmp_path / "c.nii.gz")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_register_affine_then_model_writes_one_composed_warp(files, tmp_path):
    moved, warp_file, transform = tmp_path / "m.nii.gz", tmp_path / "w.nii.gz", tmp_path / "t.txt"
    result = run("register", files["img1"], files["img0"], "--model", files["model"], "--affine",
                 "--moved", moved, "--warp", warp_file, "--transform", transform, "--no-progress")
    assert_ok(result)
    assert "affine:" in result.output and transform.read_text().startswith("#Insight")
    # the composed warp applied by 'voxreg warp' reproduces the moved image
    again = tmp_path / "again.nii.gz"
    assert_ok(run("warp", files["img1"], "--warp", warp_file, "--out", again,
                  "--normalize", "minmax"))
    np.testing.assert_allclose(io.load_image(again).data, io.load_image(moved).data, atol=1e-4)
    # a moving image on another grid (same world content, origin moved by 3 voxels) needs no
    # --resample: the affine step starts from the headers
    image = io.load_image(files["img1"]).data
    shifted = AFFINE.copy()
    shifted[0, 3] += 6.0
    other = io.save_image(tmp_path / "other.nii.gz", np.roll(image, -3, axis=0), shifted)
    out = tmp_path / "m2.nii.gz"
    assert_ok(run("register", other, files["img0"], "--model", files["model"], "--affine",
                  "--moved", out, "--no-progress"))
    written = io.load_image(out)
    assert written.shape == SHAPE and np.allclose(written.affine, AFFINE)


def test_register_affine_errors(files, tmp_path):
    base = ("register", files["img1"], files["img0"], "--model", files["model"],
            "--moved", tmp_path / "m.nii.gz")
    assert_user_error(run(*base, "--transform", tmp_path / "t.txt"), "--transform needs --affine")
    assert_user_error(run(*base, "--affine", "--inverse-warp", tmp_path / "i.nii.gz"),
                      "not available with --affine")
