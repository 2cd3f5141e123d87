"""The file-level API (voxreg.apps): each function does what its command does, on tiny NIfTI files
with a tiny untrained model; inputs may be paths, nibabel images or voxreg.io.Images."""

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_helpers import assert_ok, run

import voxreg
from voxreg import io
from voxreg.apps.affine import affine_files
from voxreg.apps.evaluate import evaluate_pairs
from voxreg.apps.models import list_model_info
from voxreg.apps.register import RegisterResult, register_files
from voxreg.apps.warp import warp_file

SHAPE = (16, 16, 16)
AFFINE = np.array([[2.0, 0, 0, -16], [0, 2.0, 0, -16], [0, 0, 2.0, -16], [0, 0, 0, 1]])


def _blob(center, seed):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    dist = np.sqrt(((grid - np.array(center)[:, None, None, None]) ** 2).sum(0))
    noise = np.random.default_rng(seed).random(SHAPE) * 10
    image = np.clip(200 - 25 * dist + noise, 0, 255).astype(np.uint8)
    labels = (dist < 3).astype(np.uint8) + (dist < 5).astype(np.uint8) * 2
    return image, labels


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("apps")
    out = {"root": root}
    for i, center in enumerate([(7, 8, 8), (9, 7, 8)]):
        image, labels = _blob(center, i)
        out[f"img{i}"] = io.save_image(root / f"img{i}.nii.gz", image, AFFINE)
        out[f"lab{i}"] = io.save_image(root / f"lab{i}.nii.gz", labels, AFFINE)
    torch.manual_seed(0)
    model = voxreg.nn.networks.VxmDense(SHAPE, nb_features=[[4, 4], [4, 4, 4]], int_steps=3)
    with torch.no_grad():  # a visible deformation from an untrained model
        model.flow.weight.normal_(0, 0.1)
        model.flow.bias.copy_(torch.tensor([0.6, -0.4, 0.3]))
    out["model"] = voxreg.save_model(model, root / "tiny.safetensors", metadata={"normalize": "minmax"})
    return out


@pytest.fixture(scope="module")
def by_cli(files, tmp_path_factory):
    """``voxreg register`` with a warp and an inverse warp, the reference of the API."""
    folder = tmp_path_factory.mktemp("by_cli")
    paths = {k: folder / f"{k}.nii.gz" for k in ("moved", "warp", "inverse")}
    assert_ok(run("register", files["img0"], files["img1"], "-m", files["model"], "--moved",
                  paths["moved"], "--warp", paths["warp"], "--inverse-warp", paths["inverse"],
                  "--device", "cpu"))
    return paths


def _same_as_cli(result: RegisterResult, by_cli) -> None:
    np.testing.assert_allclose(result.moved.data, io.load_image(by_cli["moved"]).data, atol=1e-5)
    np.testing.assert_allclose(result.disp[0].numpy(), io.load_warp(by_cli["warp"])[0], atol=1e-5)
    np.testing.assert_allclose(result.inverse_disp[0].numpy(), io.load_warp(by_cli["inverse"])[0],
                               atol=1e-5)
    np.testing.assert_allclose(result.moved.affine, AFFINE)


def test_register_files_is_the_register_command(files, by_cli, tmp_path, one_thread):
    out = {k: tmp_path / f"{k}.nii.gz" for k in ("moved", "warp", "inverse")}
    result = register_files(files["img0"], files["img1"], files["model"], moved=out["moved"],
                            warp=out["warp"], inverse_warp=out["inverse"], device="cpu")
    _same_as_cli(result, by_cli)
    assert result.disp.shape == (1, 3, *SHAPE) and result.disp.dtype == torch.float32
    assert result.moved.shape == SHAPE and result.inverse_exact is True
    assert result.seconds > 0 and result.device == torch.device("cpu") and result.affine is None
    # the same files, with the same contents
    assert result.written == {"--warp": out["warp"], "--inverse-warp": out["inverse"],
                              "--moved": out["moved"]}
    assert result.moved.path == out["moved"]
    for key in out:
        written, reference = nib.load(out[key]), nib.load(by_cli[key])
        assert written.shape == reference.shape and written.get_data_dtype() == reference.get_data_dtype()
        np.testing.assert_allclose(written.affine, reference.affine)
        np.testing.assert_allclose(np.asarray(written.dataobj), np.asarray(reference.dataobj), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in out.values())


def test_register_files_takes_nibabel_images_images_and_modules(files, by_cli, tmp_path, one_thread):
    model = voxreg.load_model(files["model"], device="cpu")
    moving = nib.load(files["img0"])
    fixed = io.load_image(files["img1"])
    before = fixed.data.copy()
    result = register_files(moving, fixed, model, inverse_warp=tmp_path / "inv.nii.gz",
                            device="cpu")
    _same_as_cli(result, by_cli)
    np.testing.assert_array_equal(fixed.data, before)  # the caller's image is left alone
    assert fixed.data.dtype == np.uint8
    assert result.moved.path is None and list(result.written) == ["--inverse-warp"]
    # all in memory: nothing written
    in_memory = io.Image(io.load_image(files["img0"]).data, AFFINE)
    result = register_files(in_memory, nib.Nifti1Image(before, AFFINE), model, device="cpu")
    np.testing.assert_allclose(result.moved.data, io.load_image(by_cli["moved"]).data, atol=1e-5)
    assert result.written == {} and result.inverse_disp is None


def test_register_files_warp_conventions(files, by_cli, tmp_path, one_thread):
    out = {k: tmp_path / name for k, name in (("warp", "w.mgz"), ("inverse", "i.npz"))}
    result = register_files(files["img0"], files["img1"], files["model"], warp=out["warp"],
                            inverse_warp=out["inverse"], device="cpu")
    assert result.warp_conventions == {"--warp": "ras-mm", "--inverse-warp": "voxel"}
    np.testing.assert_allclose(io.load_displacement(out["warp"], "ras-mm")[0],
                               io.load_displacement(by_cli["warp"])[0], atol=1e-5)
    with pytest.warns(FutureWarning, match="--warp-format ants.*--warp-convention lps-mm"):
        result = register_files(files["img0"], files["img1"], files["model"], device="cpu",
                                warp=tmp_path / "a.nii.gz", warp_format="ants")
    assert result.warp_conventions == {"--warp": "lps-mm"}
    with pytest.raises(ValueError, match="--warp: cannot write a 'lps-mm' field"):
        register_files(files["img0"], files["img1"], files["model"], warp=tmp_path / "x.mgz",
                       warp_convention="lps-mm")
    assert not (tmp_path / "x.mgz").exists()


def test_register_files_errors_name_the_argument(files, tmp_path):
    moved = tmp_path / "m.nii.gz"
    with pytest.raises(TypeError, match="moving"):
        register_files(42, files["img1"], files["model"])
    with pytest.raises(TypeError, match="model"):
        register_files(files["img0"], files["img1"], 3.5)
    with pytest.raises(FileNotFoundError, match="fixed image"):
        register_files(files["img0"], tmp_path / "none.nii.gz", files["model"])
    with pytest.raises(ValueError, match="--inverse-warp"):
        register_files(files["img0"], files["img1"], files["model"], moved=moved, affine=True,
                       inverse_warp=tmp_path / "i.nii.gz")
    with pytest.raises(ValueError, match="never overwrites"):
        register_files(files["img0"], files["img1"], files["model"], moved=files["img0"])
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    other = nib.Nifti1Image(io.load_image(files["img0"]).data, shifted)
    with pytest.raises(ValueError, match="different grids.*--resample"):
        register_files(other, files["img1"], files["model"], moved=moved)
    assert not any(tmp_path.iterdir())


def test_warp_file_is_the_warp_command(files, by_cli, tmp_path, one_thread):
    for source, interp, normalize in ((files["img0"], "linear", "minmax"),
                                      (files["lab0"], "label", "none")):
        cli_out, api_out = tmp_path / f"cli_{interp}.nii.gz", tmp_path / f"api_{interp}.nii.gz"
        assert_ok(run("warp", source, "--warp", by_cli["warp"], "--out", cli_out, "--interp",
                      interp, "--normalize", normalize))
        result = warp_file(source, by_cli["warp"], api_out, interp=interp, normalize=normalize)
        reference = io.load_image(cli_out)
        np.testing.assert_allclose(io.load_image(api_out).data, reference.data, atol=1e-5)
        np.testing.assert_allclose(result.data, reference.data, atol=1e-5)
        assert result.path == api_out and result.data.dtype == reference.data.dtype
        np.testing.assert_allclose(result.affine, AFFINE)
        # a nibabel image, not written
        again = warp_file(nib.load(source), by_cli["warp"], interp=interp, normalize=normalize)
        np.testing.assert_allclose(again.data, reference.data, atol=1e-5)
    # the moving image warped with the saved field is the moved image
    moved = warp_file(files["img0"], by_cli["warp"], normalize="minmax")
    np.testing.assert_allclose(moved.data, io.load_image(by_cli["moved"]).data, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="warp"):
        warp_file(files["img0"], tmp_path / "none.nii.gz")
    with pytest.raises(TypeError, match="image"):
        warp_file([1, 2], by_cli["warp"])


def test_evaluate_pairs_table_or_rows(files, tmp_path, one_thread):
    row = {"moving": str(files["img0"]), "fixed": str(files["img1"]),
           "moving_labels": str(files["lab0"]), "fixed_labels": str(files["lab1"])}
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    seen = []
    result = evaluate_pairs(files["model"], table, out=tmp_path / "res.csv", device="cpu",
                            on_pair=seen.append)
    assert seen == result.pairs and len(result.pairs) == 1
    assert {s["label"] for s in result.structures} == {2, 3}
    assert result.out.exists() and result.structures_out.name == "res_structures.csv"
    assert "±" in result.summary["mean_dice"]
    again = evaluate_pairs(files["model"], [row], labels=[3], no_hd95=True, device="cpu")
    assert again.out is None and [s["label"] for s in again.structures] == [3]
    assert again.structures[0]["dice"] == pytest.approx(
        next(s["dice"] for s in result.structures if s["label"] == 3))
    with pytest.raises(ValueError, match="fixed_labels"):
        evaluate_pairs(files["model"], [{"moving": row["moving"], "fixed": row["fixed"]}])


def test_affine_files_is_the_affine_command(files, tmp_path, one_thread):
    cli = {k: tmp_path / f"cli_{k}.nii.gz" for k in ("moved", "labels")}
    assert_ok(run("affine", files["img0"], files["img1"], "--moved", cli["moved"], "--labels",
                  files["lab0"], "--moved-labels", cli["labels"], "--loss", "ncc", "--levels", "2,1"))
    moved, transform = tmp_path / "moved.nii.gz", tmp_path / "affine.txt"
    out = affine_files(files["img0"], nib.load(files["img1"]), moved=moved, transform=transform,
                       labels=io.load_labels(files["lab0"]), loss="ncc", levels=[2, 1])
    np.testing.assert_allclose(io.load_image(moved).data, io.load_image(cli["moved"]).data, atol=1e-4)
    np.testing.assert_array_equal(out.moved_labels.data, io.load_image(cli["labels"]).data)
    assert list(out.written) == ["--transform", "--moved"] and out.moved_labels.path is None
    assert transform.read_text().startswith("#Insight") and out.result.seconds > 0
    with pytest.raises(ValueError, match="--labels and --moved-labels"):
        affine_files(files["img0"], files["img1"], moved_labels=tmp_path / "l.nii.gz")


def test_list_model_info_is_the_models_command():
    names = [info.name for info in list_model_info()]
    assert names == run("models", "--names").output.split()
    listing = run("models").output
    assert all(f"{name}: " in listing for name in names) and "domain: 3D 96x112x96" in listing
    assert all(info.path.is_file() and info.size_bytes > 0 for info in list_model_info())
