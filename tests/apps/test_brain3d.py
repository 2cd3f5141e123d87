"""The 3D brain model (voxreg.apps.brain3d, examples/brain3d.py): training resumes, the shipped model
registers IXI validation volumes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import voxreg
from voxreg import metrics
from voxreg.apps import brain3d
from voxreg.checkpoint import MODELS_DIR, load_checkpoint

HAVE_IXI = (brain3d.data_dir() / "splits.json").is_file()
needs_ixi = pytest.mark.skipif(not HAVE_IXI, reason="IXI 3D data (ixi/) not available")
SHIPPED = MODELS_DIR / "brain3d.safetensors"
needs_shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped brain3d model")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# half of the mean Dice gain measured for the shipped model on 10 validation pairs (see the
# model's metadata: dice_after - dice_before_affine); read from the file so that a retrained
# model keeps the test honest
TINY = [[4, 4, 4, 4], [4, 4, 4, 4, 4, 4, 4]]


def _evaluate_val_pairs(model, count):
    """:func:`brain3d.evaluate_brain3d` on the first ``count`` validation pairs, loading only
    the volumes they use."""
    ids = brain3d.subject_ids("val")
    pairs = brain3d.val_pairs(len(ids), count, seed=0)
    used = sorted(set(pairs.ravel().tolist()))
    val = brain3d.load_ixi("val", ids=[ids[k] for k in used])
    index = {k: n for n, k in enumerate(used)}
    local = np.array([[index[i], index[j]] for i, j in pairs])
    torch.set_num_threads(2)
    return brain3d.evaluate_brain3d(model, local, images=val["images"], labels=val["labels"])


def _tiny_images(n=3, shape=(16, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, *shape), dtype=np.float32)


def test_train_runs_and_resumes_at_the_saved_step(tmp_path):
    images = _tiny_images()
    kw = dict(steps_per_epoch=2, lr=1e-3, lambda_=0.01, seed=0, images=images, nb_features=TINY,
              threads=None, verbose=False)
    _, history = brain3d.train_brain3d(tmp_path, epochs=1, resume=True, **kw)
    assert [r["step"] for r in history] == [2]
    ckpt = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ckpt.step == 2 and ckpt.epoch == 1 and ckpt.optimizer_state is not None
    assert ckpt.metadata["lambda"] == 0.01 and "IXI" in ckpt.metadata["data"]
    assert (tmp_path / "history.csv").is_file() and (tmp_path / "loss.png").is_file()
    with pytest.raises(FileExistsError):
        brain3d.train_brain3d(tmp_path, epochs=2, resume=False, **kw)
    model, history = brain3d.train_brain3d(tmp_path, epochs=2, resume=True, **kw)
    assert [r["step"] for r in history] == [2, 4]
    assert load_checkpoint(tmp_path / "checkpoint.safetensors").step == 4
    # an uninterrupted run of 2 epochs ends with the same weights
    ref, _ = brain3d.train_brain3d(tmp_path / "ref", epochs=2, resume=True, **kw)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_time_budget_stops_between_epochs(tmp_path):
    _, history = brain3d.train_brain3d(
        tmp_path, epochs=5, steps_per_epoch=1, images=_tiny_images(), nb_features=TINY,
        threads=None, verbose=False, time_budget=0.0)
    assert len(history) == 1  # at least one epoch, then the budget stops it


def test_diffeomorphic_bidirectional_run_starts_from_the_plain_model(tmp_path):
    images = _tiny_images()
    kw = dict(steps_per_epoch=2, lr=1e-3, lambda_=0.01, seed=0, images=images, nb_features=TINY,
              threads=None, verbose=False)
    plain, _ = brain3d.train_brain3d(tmp_path / "plain", epochs=1, **kw)
    diff, history = brain3d.train_brain3d(
        tmp_path / "diff", epochs=1, int_steps=5, int_downsize=2, bidir=True,
        init_from=tmp_path / "plain" / "checkpoint.safetensors", **kw)
    assert diff.int_steps == 5 and diff.bidir
    assert {"transformer_loss", "neg_transformer_loss", "flow_loss"} <= set(history[-1])
    ckpt = load_checkpoint(tmp_path / "diff" / "checkpoint.safetensors")
    assert ckpt.metadata["training"]["reg_on"] == "velocity"
    assert ckpt.metadata["init_from"].endswith("checkpoint.safetensors")
    # the warm start copied every weight (same layers), so before training they were equal
    fresh = brain3d.make_model(TINY, (16, 16, 16), int_steps=5, bidir=True)
    assert brain3d.warm_start(fresh, plain) == len(plain.state_dict())
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value)
    with pytest.raises(ValueError, match="no weight"):
        brain3d.warm_start(fresh, torch.nn.Linear(2, 2))
    segs = np.random.default_rng(2).integers(0, 4, (3, 16, 16, 16)).astype(np.uint8)
    r = brain3d.evaluate_brain3d(diff, 2, images=images, labels=segs)
    assert len(r["inverse_residual_per_pair"]) == 2 and 0 <= r["inverse_residual"] < 0.5


def test_pair_dice_matches_metrics_and_evaluate_reports_all_numbers():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, (16, 16, 16))
    b = rng.integers(0, 4, (16, 16, 16))
    labels = np.intersect1d(np.unique(a), np.unique(b))
    labels = labels[labels != 0]
    assert brain3d.pair_dice(a, b) == pytest.approx(metrics.mean_dice(a, b, labels))
    images = _tiny_images(3)
    segs = rng.integers(0, 4, (3, 16, 16, 16)).astype(np.uint8)
    torch.manual_seed(0)
    model = brain3d.make_model(TINY, (16, 16, 16))
    r = brain3d.evaluate_brain3d(model, 2, images=images, labels=segs)
    assert len(r["pairs"]) == 2 and len(r["dice_after_per_pair"]) == 2
    for key in ("dice_before", "dice_after", "folding_pct", "seconds_per_pair", "max_disp"):
        assert np.isfinite(r[key])
    i, j = r["pairs"][0]
    assert r["dice_before_per_pair"][0] == pytest.approx(brain3d.pair_dice(segs[j], segs[i]))
    assert "| **mean** |" in brain3d.summary_table(r)


def test_example_parses_its_subcommands():
    spec = importlib.util.spec_from_file_location("brain3d_example", EXAMPLES / "brain3d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(["train", "--resume", "--stop-at", "13:05"])
    assert args.resume and args.steps_per_epoch == 25 and args.lr == 1e-3
    assert module.parse_stop_at("12345") == 12345.0
    args = module.build_parser().parse_args(["evaluate", "--pairs", "3", "--ship", "--name", "x"])
    assert args.pairs == 3 and args.ship and args.name == "x"
    args = module.build_parser().parse_args(["train", "--int-steps", "7", "--bidir",
                                             "--init-from", "brain3d"])
    assert args.int_steps == 7 and args.bidir and args.init_from == "brain3d"


@needs_ixi
@needs_shipped
def test_shipped_model_raises_dice_without_folding():
    model = voxreg.load_model("brain3d", device="cpu")
    meta = model.metadata
    assert model.config["inshape"] == [96, 112, 96] and model.config["int_steps"] == 0
    assert "IXI" in meta["data"] and "DLMUSE" in meta["data"]
    assert meta["dice_after"] > meta["dice_before_affine"]
    assert SHIPPED.stat().st_size < 2e6
    margin = (meta["dice_after"] - meta["dice_before_affine"]) / 2
    r = _evaluate_val_pairs(model, 3)
    assert r["dice_after"] > r["dice_before"] + margin
    assert r["folding_pct"] < 1.0


SHIPPED_DIFF = MODELS_DIR / "brain3d-diff.safetensors"


@needs_ixi
@pytest.mark.skipif(not SHIPPED_DIFF.is_file(), reason="no shipped brain3d-diff model")
def test_shipped_diffeomorphic_model_does_not_fold_and_inverts():
    model = voxreg.load_model("brain3d-diff", device="cpu")
    meta = model.metadata
    assert model.config["int_steps"] == 7 and model.config["bidir"]
    assert "IXI" in meta["data"] and SHIPPED_DIFF.stat().st_size < 2e6
    margin = (meta["dice_after"] - meta["dice_before_affine"]) / 2
    r = _evaluate_val_pairs(model, 2)
    assert r["dice_after"] > r["dice_before"] + margin
    assert r["folding_pct"] < 0.01  # % of voxels: the bound for a diffeomorphic model
    assert r["inverse_residual"] < 0.1  # voxels, mean of |disp o inverse|
