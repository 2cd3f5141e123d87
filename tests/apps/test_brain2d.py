"""The shipped 2D brain models register IXI validation slices (voxreg.apps.brain2d, examples/brain2d.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import voxreg
from voxreg.apps import brain2d

pytestmark = pytest.mark.skipif(
    not brain2d.data_path().is_file(), reason="IXI 2D slices (ixi2d.npz) not available"
)

# measured on val_pairs(30, 10, seed=0) with the shipped models: mean Dice 0.508 before,
# 0.609 after (smooth; 0.579 no smooth) -> gain 0.101; assert at least half of it
SMOOTH_DICE_MARGIN = 0.05
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def data():
    return brain2d.load_ixi2d()


@pytest.fixture(scope="module")
def scores(data):
    pairs = brain2d.val_pairs(len(data["val_images"]), 10, seed=0)
    out = {}
    for name in ("brain2d-smooth", "brain2d-nosmooth"):
        model = voxreg.load_model(name, device="cpu")
        out[name] = brain2d.evaluate_brain2d(model, data["val_images"], data["val_labels"], pairs,
                                             timing=False)
    return out


def test_shipped_models_load_with_their_credit():
    for name, lam in (("brain2d-smooth", 0.01), ("brain2d-nosmooth", 0.0)):
        model = voxreg.load_model(name, device="cpu")
        assert model.config["inshape"] == [96, 112] and model.config["int_steps"] == 0
        assert model.metadata["smooth_lambda"] == lam
        assert "IXI" in model.metadata["data"] and "DLMUSE" in model.metadata["data"]
        assert model.metadata["val_dice_after"] > model.metadata["val_dice_before"]
        assert voxreg.checkpoint.MODELS_DIR.joinpath(f"{name}.safetensors").stat().st_size < 2e6


def test_smooth_model_raises_dice_without_folding(scores):
    r = scores["brain2d-smooth"]
    assert r["dice_after"] > r["dice_before"] + SMOOTH_DICE_MARGIN
    assert r["folding_pct"] < 1.0


def test_no_smooth_model_folds_more(scores):
    assert scores["brain2d-nosmooth"]["folding_pct"] > scores["brain2d-smooth"]["folding_pct"]
    assert scores["brain2d-nosmooth"]["dice_after"] > scores["brain2d-nosmooth"]["dice_before"]


def test_nearest_warping_keeps_the_label_values(data):
    labels = torch.as_tensor(data["val_labels"][:4].astype(np.int64))[:, None]
    gen = torch.Generator().manual_seed(0)
    # a rough field: large, non-smooth displacements, so that many voxels land between labels
    disp = torch.randn(4, 2, 12, 14, generator=gen) * 6
    disp = torch.nn.functional.interpolate(disp, size=(96, 112), mode="bilinear")
    disp = disp + torch.rand(4, 2, 96, 112, generator=gen) - 0.5
    moved = voxreg.warp(labels, disp, interp="nearest")
    assert moved.dtype == labels.dtype
    for k in range(4):
        assert set(moved[k].unique().tolist()) <= set(labels[k].unique().tolist())
        assert not torch.equal(moved[k], labels[k])
    # also a trained model's field (and the label maps as uint8)
    model = voxreg.load_model("brain2d-nosmooth", device="cpu")
    _, field = brain2d.register_pairs(model, data["val_images"], [[0, 1], [2, 3]])
    u8 = torch.as_tensor(data["val_labels"][[0, 2]])[:, None]
    out = voxreg.warp(u8, field, interp="nearest")
    assert out.dtype == torch.uint8
    for k in range(2):
        assert set(out[k].unique().tolist()) <= set(u8[k].unique().tolist())


def test_tiny_training_lowers_the_loss(data, tmp_path):
    # 16 slices at half resolution (48 x 56): the model takes its shape from the data
    small = {"train_images": np.ascontiguousarray(data["train_images"][:16, ::2, ::2])}
    features = [[8, 8, 8], [8, 8, 8, 8]]
    images = torch.as_tensor(small["train_images"])[:, None]
    moving, fixed = images[:8], images[8:16]

    def mse(model):
        with torch.no_grad():
            moved, _ = model(moving, fixed)
        return float(((moved - fixed) ** 2).mean())

    torch.manual_seed(0)
    # same seed: the untrained model of the run
    before = mse(brain2d.make_model(features, inshape=(48, 56)))
    model, history = brain2d.train_brain2d(
        tmp_path, 0.01, epochs=3, steps_per_epoch=8, seed=0, lr=1e-2, batch_size=4,
        nb_features=features, data=small, verbose=False,
    )
    assert len(history) == 3 and (tmp_path / "history.csv").is_file()
    after = mse(model)
    assert after < 0.95 * before
    assert history[-1]["loss"] < history[0]["loss"]


def test_evaluate_reports_the_numbers(data):
    model = voxreg.load_model("brain2d-smooth", device="cpu")
    r = brain2d.evaluate_brain2d(model, data["val_images"], data["val_labels"], 3, seed=5)
    assert len(r["pairs"]) == 3 and all(i != j for i, j in r["pairs"])
    assert r["seconds_per_pair"] > 0 and len(r["dice_after_per_pair"]) == 3
    assert 0 < r["dice_before"] < 1 and 0 < r["dice_after"] < 1
    # identity registration gives the "before" Dice
    class Identity(torch.nn.Module):
        def forward(self, moving, fixed, registration=False):
            return moving, torch.zeros(moving.shape[0], 2, *moving.shape[2:])

    same = brain2d.evaluate_brain2d(Identity(), data["val_images"], data["val_labels"],
                                    r["pairs"], timing=False)
    assert same["dice_after"] == pytest.approx(r["dice_before"])
    assert same["folding_pct"] == 0


def test_example_scores_the_shipped_models_and_draws(tmp_path):
    spec = importlib.util.spec_from_file_location("brain2d_example", EXAMPLES / "brain2d.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    numbers = example.main(["--out", str(tmp_path), "--eval-only", "--pairs", "4",
                            "--figure-pairs", "2"])
    assert set(numbers["results"]) == {"smooth", "nosmooth"}
    saved = json.loads((tmp_path / "brain2d.json").read_text())
    assert saved["results"]["smooth"]["dice_after"] == numbers["results"]["smooth"]["dice_after"]
    import matplotlib.image

    picture = matplotlib.image.imread(tmp_path / "brain2d.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 900 and picture.std() > 0.05
