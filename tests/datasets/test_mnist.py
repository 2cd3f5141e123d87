"""The MNIST tutorial and the shipped MNIST model, on real MNIST digits.

Tests that need the digits skip when MNIST cannot be found (``load_mnist`` raises
FileNotFoundError); the shipped-model file tests run without them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

import voxreg
from voxreg.apps import tutorial as tutorials
from voxreg.data import load_mnist, prepare_digits

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _mnist(split: str, digit: int) -> np.ndarray:
    try:
        images, _ = load_mnist(split=split, digits=digit)
    except FileNotFoundError as err:
        pytest.skip(f"MNIST not available: {err}")
    return images


@pytest.fixture(scope="module")
def tutorial_run(tmp_path_factory):
    """One short tutorial run (120 steps of 32 pairs, one torch thread), shared by the tests."""
    _mnist("test", 5)
    out = tmp_path_factory.mktemp("mnist_tutorial")
    results = tutorials.mnist_tutorial(out, epochs=4, steps_per_epoch=30, seed=0, progress=False,
                                       num_threads=1, examples=1, eval_pairs=300, verbose=False)
    return out, results


def test_short_training_lowers_validation_mse(tutorial_run):
    _, results = tutorial_run
    training = results["training"]
    assert training["steps"] == 120 and training["seconds"] < 60
    validation = results["cases"]["validation"]
    assert validation["pairs"] == 300  # of the 892 fives of the MNIST test split
    assert results["data"]["validation"] == {"split": "test", "digit": 5, "images": 892}
    assert validation["mse_after"] <= 0.7 * validation["mse_before"]
    assert validation["pairs_improved"] > 0.9
    history = training["final"]
    assert history["val_mse"] < 0.7 * validation["mse_before"]


def test_tutorial_writes_figures_and_results(tutorial_run):
    out, results = tutorial_run
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    assert set(saved["cases"]) == {"validation", "sevens", "fives_x5"}
    for case in saved["cases"].values():
        assert case["mse_before"] > 0 and 0 <= case["folding_percent"] <= 100
        for path in case["figures"].values():
            picture = matplotlib.image.imread(path)
            assert picture.shape[0] > 200 and picture.std() > 0.05
    for name in ("history.png", "loss.png", "history.csv", "model.safetensors"):
        assert (out / name).stat().st_size > 300
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 4  # header + epochs
    # the trained model is a normal checkpoint
    model = voxreg.load_model(results["model_file"])
    assert model.config == results["model"]["config"]
    # scaled intensities: the model, trained on [0, 1], registers them far worse
    x5 = saved["cases"]["fives_x5"]
    assert x5["mse_reduction"] < saved["cases"]["validation"]["mse_reduction"]


def test_shipped_model_registers_held_out_fives():
    fives = prepare_digits(_mnist("test", 5))[:400]
    model = voxreg.load_model("mnist", device="cpu")
    assert model.metadata["data"]["validation"]["split"] == "test"
    rng = np.random.default_rng(1)
    fixed = fives[rng.permutation(len(fives))]
    moved, disp = voxreg.register(model, fives[:, None], fixed[:, None])
    before = np.mean((fives - fixed) ** 2)
    after = np.mean((moved[:, 0] - fixed) ** 2)
    assert after <= 0.5 * before
    folding = voxreg.folding_fraction(torch.from_numpy(disp)).mean().item()
    assert folding < 0.01


def _digit_pair(shape=(32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """Two different digit-like images: MNIST fives when available, else shifted blobs."""
    try:
        images, _ = load_mnist(split="test", digits=5)
        a, b = prepare_digits(images[:2], pad_to=None)
    except FileNotFoundError:
        rows, cols = np.mgrid[0:28, 0:28]
        a = np.exp(-((rows - 13) ** 2 + (cols - 12) ** 2) / 30.0)
        b = np.exp(-((rows - 15) ** 2 + (cols - 15) ** 2) / 20.0)
    pad = [(0, shape[0] - 28), (0, shape[1] - 28)]
    return np.pad(a, pad).astype(np.float32), np.pad(b, pad).astype(np.float32)


def test_shipped_model_save_load_round_trip(tmp_path):
    model = voxreg.load_model("mnist", device="cpu")
    path = voxreg.save_model(model, tmp_path / "copy.safetensors", metadata=model.metadata)
    again = voxreg.load_model(path, device="cpu")
    assert again.config == model.config and again.metadata == model.metadata
    moving, fixed = _digit_pair()
    with torch.no_grad():
        args = (torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None])
        for a, b in zip(model(*args), again(*args)):
            assert torch.equal(a, b)


def test_shipped_model_odd_size():
    model = voxreg.load_model("mnist", device="cpu")
    moving, fixed = _digit_pair((29, 31))
    moved, disp = voxreg.register(model, moving, fixed)
    assert moved.shape == (29, 31) and disp.shape == (2, 29, 31)
    assert np.isfinite(disp).all()
    assert np.mean((moved - fixed) ** 2) < np.mean((moving - fixed) ** 2)


def test_example_uses_the_shipped_model(tmp_path):
    _mnist("test", 7)
    spec = importlib.util.spec_from_file_location("mnist_tutorial", EXAMPLES / "mnist_tutorial.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--out", str(tmp_path), "--use-shipped", "--no-progress",
                            "--threads", "1", "--examples", "1", "--eval-pairs", "250"])
    assert results["training"] is None and results["model"]["source"].endswith("mnist")
    assert (tmp_path / "results.json").is_file() and (tmp_path / "sevens.png").is_file()
    assert results["cases"]["validation"]["mse_reduction"] > 0.5
    assert results["cases"]["sevens"]["mse_reduction"] > 0.5
